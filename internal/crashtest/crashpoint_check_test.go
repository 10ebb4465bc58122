package crashtest

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/mem"
)

// The crash-point suite decides with the crash suite's checker (tested in
// history_check_test.go) over histories it builds with cpHist, and with
// cpDiff. These tests give each rule cpHist adds a hand-made history and
// device state whose verdict follows from the guarantees, and then show
// that the whole suite reports engine bugs injected on purpose.

// cpScript builds a history through cpHist, as the suite's runs do.
type cpScript struct {
	h   *cpHist
	ops map[uint64]*op
	fl  map[string]*flushRec
}

func newCPScript() *cpScript {
	return &cpScript{h: newCPHist(), ops: map[uint64]*op{}, fl: map[string]*flushRec{}}
}

func (s *cpScript) write(eng int, id uint64, block, n int64) *cpScript {
	s.ops[id] = s.h.issue(eng, opWrite, id, block, n)
	return s
}

func (s *cpScript) zero(eng int, id uint64, block, n int64) *cpScript {
	s.ops[id] = s.h.issue(eng, opZero, id, block, n)
	return s
}

func (s *cpScript) ack(id uint64) *cpScript    { s.h.acked(s.ops[id], false); return s }
func (s *cpScript) ackFUA(id uint64) *cpScript { s.h.acked(s.ops[id], true); return s }

// flush starts a flush; durable says whether the engine runs with
// write.durable (a clean close is a flush with durable set).
func (s *cpScript) flush(eng int, name string, durable bool) *cpScript {
	s.fl[name] = s.h.flushStart(eng, durable)
	return s
}

func (s *cpScript) done(name string) *cpScript { s.h.flushDone(s.fl[name]); return s }

func TestCrashPointRules(t *testing.T) {
	zeros := func(int64) uint64 { return 0 }
	cases := []struct {
		name  string
		s     *cpScript
		base  func(int64) uint64
		got   map[int64]uint64
		wantN int
		want  string
	}{
		{
			name: "flush without write.durable promises nothing",
			s:    newCPScript().write(0, 1, 0, 1).ack(1).flush(0, "f", false).done("f"),
			base: zeros, got: map[int64]uint64{0: 0},
		},
		{
			name: "durable flush",
			s:    newCPScript().write(0, 1, 0, 1).ack(1).flush(0, "f", true).done("f"),
			base: zeros, got: map[int64]uint64{0: 0},
			wantN: 1, want: "made durable",
		},
		{
			name: "FUA write lost without write.durable",
			s:    newCPScript().write(0, 1, 0, 2).ackFUA(1),
			base: zeros, got: map[int64]uint64{0: 0, 1: 0},
			wantN: 2, want: "made durable",
		},
		{
			name: "FUA write kept, the write acknowledged before it lost",
			s:    newCPScript().write(0, 1, 4, 1).ack(1).write(0, 2, 0, 1).ackFUA(2),
			base: zeros, got: map[int64]uint64{0: 2, 4: 0},
			wantN: 1, want: "older than write 0x1",
		},
		{
			name: "write after a FUA write may be lost",
			s:    newCPScript().write(0, 1, 0, 1).ackFUA(1).write(0, 2, 4, 1).ack(2),
			base: zeros, got: map[int64]uint64{0: 1, 4: 0},
		},
		{
			name: "clean close keeps every write of the attach",
			s: newCPScript().write(0, 1, 0, 1).ack(1).flush(0, "close", true).done("close").
				write(1, 2, 9, 1).ack(2),
			base: zeros, got: map[int64]uint64{0: 0, 9: 0},
			wantN: 1, want: "made durable",
		},
		{
			name: "close that did not complete promises nothing",
			s:    newCPScript().write(0, 1, 0, 1).ack(1).flush(0, "close", true),
			base: zeros, got: map[int64]uint64{0: 0},
		},
		{
			name: "the next attach's write wins over the closed one's",
			s: newCPScript().write(0, 1, 0, 1).ack(1).flush(0, "close", true).done("close").
				write(1, 2, 0, 1).ack(2),
			base: zeros, got: map[int64]uint64{0: 2},
		},
		{
			name: "the closed attach's write resurfaces over a flushed write of the next",
			s: newCPScript().write(0, 1, 0, 1).ack(1).flush(0, "close", true).done("close").
				write(1, 2, 0, 1).ack(2).flush(1, "f", true).done("f"),
			base: zeros, got: map[int64]uint64{0: 1},
			wantN: 1, want: "older than write 0x2",
		},
		{
			// A missing key G and a present key G+1 both replayed: the
			// shape of an attach that treated a gap as a placeholder.
			name: "later chunk visible, earlier one lost, no durability",
			s:    newCPScript().write(0, 1, 3, 1).ack(1).flush(0, "f", false).done("f").write(0, 2, 9, 1).ack(2),
			base: zeros, got: map[int64]uint64{3: 0, 9: 2},
			wantN: 1, want: "not a prefix",
		},
		{
			name: "prefix holds in the second attach too",
			s: newCPScript().write(0, 1, 0, 1).ack(1).flush(0, "close", true).done("close").
				write(1, 2, 3, 1).ack(2).write(1, 3, 9, 1).ack(3),
			base: zeros, got: map[int64]uint64{0: 1, 3: 0, 9: 3},
			wantN: 1, want: "not a prefix",
		},
		{
			name: "discard lost behind a later write",
			s:    newCPScript().zero(0, 1, 5, 1).ack(1).write(0, 2, 9, 1).ack(2),
			base: func(b int64) uint64 {
				if b == 5 {
					return 0x77
				}
				return 0
			},
			got:   map[int64]uint64{5: 0x77, 9: 2},
			wantN: 1, want: "not a prefix",
		},
		{
			// Second level, the crashed recovery had attached: the state
			// it exposed (base) must stay, apart from its own writes.
			name: "exposed state changed under a crashed recovery",
			s:    newCPScript().write(0, 9, 6, 1).ack(9),
			base: func(b int64) uint64 {
				if b == 5 {
					return 0x1000000005
				}
				return 0
			},
			got:   map[int64]uint64{5: 0x1000000004, 6: 9},
			wantN: 1, want: "never issued",
		},
		{
			name: "exposed state kept, unflushed write of the recovery lost",
			s:    newCPScript().write(0, 9, 6, 1).ack(9),
			base: func(b int64) uint64 {
				if b == 5 {
					return 0x1000000005
				}
				return 0
			},
			got: map[int64]uint64{5: 0x1000000005, 6: 0},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := c.s.h.rec.history().check(c.base, c.got, c.s.h.rules())
			if len(f) != c.wantN {
				t.Fatalf("got %d findings, want %d:%s", len(f), c.wantN, summarize(f))
			}
			if c.wantN > 0 && !strings.Contains(f[0], c.want) {
				t.Fatalf("finding %q does not mention %q", f[0], c.want)
			}
		})
	}
}

func TestCrashPointDiff(t *testing.T) {
	same := map[int64]uint64{0: 1, 7: 2}
	if f := cpDiff(same, map[int64]uint64{0: 1, 7: 2}); len(f) != 0 {
		t.Fatalf("equal devices differ:%s", summarize(f))
	}
	f := cpDiff(same, map[int64]uint64{0: 1, 7: 3})
	if len(f) != 1 || !strings.Contains(f[0], "block 7") {
		t.Fatalf("one differing block: %v", f)
	}
	// A block undecodable in one read only is a difference too.
	if f := cpDiff(same, map[int64]uint64{0: 1}); len(f) != 1 {
		t.Fatalf("a block missing from one read: %v", f)
	}
	many := make(map[int64]uint64)
	for b := range int64(20) {
		many[b] = 5
	}
	if f := cpDiff(many, nil); len(f) != 9 || !strings.Contains(f[8], "20 blocks") {
		t.Fatalf("20 differing blocks: %d findings, last %q", len(f), f[len(f)-1])
	}
}

func TestCrashPointClassify(t *testing.T) {
	for f, want := range map[string]string{
		"block 3 holds zeros, older than write 0x1 (...) which the flush started at 4 and completed at 5 made durable":         "durable write lost (completed durable flush, FUA or clean close)",
		"block 3 holds ..., although write 0x2 issued after that at 9 is visible on block(s) from 9: not a prefix of the keys": "not a prefix of the acknowledged writes",
		"block 5 holds write 0x4, which was never issued in this run and is not what the block held before it (0x5)":           "stale or foreign data",
		"attach after the crash failed: volume state cannot be established":                                                    "attach after a crash refused",
		"re-attach differs: block 1 reads 0x1, the attach before it (crashed, no checkpoint) read 0x2":                         "re-attach reads a different device (roll-forward not repeatable)",
		"something else": "other",
	} {
		if got := cpClassify(f); got != want {
			t.Errorf("cpClassify(%q) = %q, want %q", f, got, want)
		}
	}
}

func TestCrashPointCaseString(t *testing.T) {
	for _, c := range []cpCase{
		{seed: 7, durable: true, n: 12},
		{seed: 1 << 60, random: true, lease: true, n: 3, applied: true, m: 9, mApp: true},
		{seed: 2, n: 37, call: "delete:0000001b/00000000#1", m: 12, mCall: "put:0000001b/00000000#2"},
	} {
		got, err := parseCPCase(c.String())
		if err != nil || got != c {
			t.Fatalf("parse(%q) = %+v, %v; want %+v", c.String(), got, err, c)
		}
	}
	for _, bad := range []string{"seed=1,bogus=2", "seed=1,call=put:x", "seed=x"} {
		if _, err := parseCPCase(bad); err == nil {
			t.Errorf("%q parses", bad)
		}
	}
}

// The suite finds engine bugs: here, a store that acknowledges one data
// upload without storing it (a lost write, as a buggy engine that
// acknowledged a flush before its chunk was stored would cause). With no
// crash, or a crash late in the life, the durably flushed data of that
// chunk is gone, and the run must report it.
func TestCrashPointDetectsLostUpload(t *testing.T) {
	s := newCPSuite(t)
	s.quiet = true
	s.wrap = func(b store.Store) store.Store {
		f := faulty.New(b)
		f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Drop: true, Count: 1, Match: func(name string) bool {
			k, ok := store.ParseDataName(name)
			return ok && k == 30 // a chunk of the first workload (the first attach claims keys 0..23)
		}})
		return f
	}
	c := cpCase{seed: 1, durable: true}
	for _, n := range []int64{0, 150} {
		c.n = n
		before := s.stats.violations
		s.level1(c, false)
		if s.stats.violations == before {
			t.Errorf("[%s] a data upload acknowledged but never stored went unnoticed", c)
		}
	}
	// Depending on whether a checkpoint covers the lost key, its blocks
	// cannot be read, or recovery stops at it and loses flushed writes.
	if s.cats["durable write lost (completed durable flush, FUA or clean close)"] == nil && s.cats["device read failed"] == nil {
		t.Errorf("neither a lost durable write nor a failed read reported; categories: %v", s.catNames())
	}
	t.Logf("reported: %v", s.catNames())
}

// The suite finds a recovery that resurrects data: the bucket is changed
// after the crash so that a key past the first gap of the crashed writer
// becomes replayable (its gap is filled with an empty placeholder, as an
// attach that treated the gap as a collected object would do). The next
// attach then shows a later chunk without an earlier one, which the
// checker must report as a prefix violation for at least one crash point
// that left such a shape.
func TestCrashPointDetectsResurrection(t *testing.T) {
	s := newCPSuite(t)
	s.quiet = true
	var shaped atomic.Int64
	s.tamper = func(b *mem.Store) {
		gap, past, _, err := cpGapShape(context.Background(), b)
		if err != nil {
			t.Fatal(err)
		}
		if past == 0 {
			return
		}
		// Fill every hole from the gap to the last key with an empty
		// object, so that roll-forward replays the keys past the gap.
		last := gap
		if err := b.List(context.Background(), "", func(name string, _ int64) error {
			if k, ok := store.ParseDataName(name); ok {
				last = max(last, k)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		for k := gap; k < last; k++ {
			if _, err := b.Size(context.Background(), store.DataName(k)); err != nil {
				if err := b.Put(context.Background(), store.DataName(k), nil, true); err != nil {
					t.Fatal(err)
				}
			}
		}
		shaped.Add(1)
	}
	c := cpCase{seed: 2, durable: false}
	total, err := s.cleanCount(c, nil, cpLife(c))
	if err != nil {
		t.Fatal(err)
	}
	for n := int64(1); n <= total && s.cats["not a prefix of the acknowledged writes"] == nil; n++ {
		c.n = n
		s.level1(c, false)
	}
	if shaped.Load() == 0 {
		t.Fatalf("no crash point of %d left keys past a gap; the test needs another seed", total)
	}
	if s.cats["not a prefix of the acknowledged writes"] == nil {
		t.Fatalf("%d crash points left keys past a gap, the gaps were filled, and no prefix violation was reported; categories: %v", shaped.Load(), s.catNames())
	}
	t.Logf("%d shapes filled; reported: %v", shaped.Load(), s.catNames())
}
