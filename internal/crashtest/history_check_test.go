package crashtest

import (
	"strings"
	"testing"
)

// The checker decides every crash test, so it is tested on its own: each
// case is a hand-made history and device state whose verdict follows from
// the rules, not from the checker's code.

// script builds a history from a compact event list.
type script struct {
	r   *recorder
	ops map[uint64]*op
	fl  map[string]*flushRec
}

func newScript() *script {
	return &script{r: newRecorder(), ops: map[uint64]*op{}, fl: map[string]*flushRec{}}
}

func (s *script) write(eng int, id uint64, block, n int64) *script {
	s.ops[id] = s.r.issue(eng, opWrite, id, block, n)
	return s
}

func (s *script) zero(eng int, id uint64, block, n int64) *script {
	s.ops[id] = s.r.issue(eng, opZero, id, block, n)
	return s
}

func (s *script) ack(id uint64) *script { s.r.acked(s.ops[id]); return s }

func (s *script) flush(eng int, name string) *script {
	s.fl[name] = s.r.flushStart(eng)
	return s
}

func (s *script) done(name string) *script { s.r.flushDone(s.fl[name]); return s }

func allFlushes(*flushRec) bool { return true }

func TestCheckRules(t *testing.T) {
	zeroBase := func(int64) uint64 { return 0 }
	base7 := func(b int64) uint64 {
		if b == 7 {
			return 0x700
		}
		return 0
	}
	durable := rules{durable: allFlushes, prefix: map[int]bool{0: true}}
	nondurable := rules{prefix: map[int]bool{0: true}}
	cases := []struct {
		name  string
		s     *script
		base  func(int64) uint64
		got   map[int64]uint64
		r     rules
		wantN int    // number of findings
		want  string // substring of the first finding
	}{
		{
			name: "flushed write lost",
			s:    newScript().write(0, 1, 0, 2).ack(1).flush(0, "f").done("f"),
			base: zeroBase, got: map[int64]uint64{0: 1, 1: 0}, r: durable,
			wantN: 1, want: "made durable",
		},
		{
			name: "flushed write kept",
			s:    newScript().write(0, 1, 0, 2).ack(1).flush(0, "f").done("f"),
			base: zeroBase, got: map[int64]uint64{0: 1, 1: 1}, r: durable,
		},
		{
			name: "unflushed write may be lost when durable",
			s:    newScript().write(0, 1, 0, 1).ack(1).flush(0, "f").write(0, 2, 0, 1).ack(2).done("f"),
			base: zeroBase, got: map[int64]uint64{0: 1}, r: durable,
		},
		{
			name: "flush not completed promises nothing",
			s:    newScript().write(0, 1, 0, 1).ack(1).flush(0, "f"),
			base: zeroBase, got: map[int64]uint64{0: 0}, r: durable,
		},
		{
			name: "older write resurfaces over a flushed one",
			s:    newScript().write(0, 1, 0, 1).ack(1).write(0, 2, 0, 1).ack(2).flush(0, "f").done("f"),
			base: zeroBase, got: map[int64]uint64{0: 1}, r: durable,
			wantN: 1, want: "older than write 0x2",
		},
		{
			name: "concurrent writes may land in either order",
			s:    newScript().write(0, 1, 0, 1).write(0, 2, 0, 1).ack(2).ack(1).flush(0, "f").done("f"),
			base: zeroBase, got: map[int64]uint64{0: 2}, r: durable,
		},
		{
			name: "write concurrent with the flush may win",
			s:    newScript().write(0, 1, 0, 1).ack(1).write(0, 2, 0, 1).flush(0, "f").done("f"),
			base: zeroBase, got: map[int64]uint64{0: 2}, r: durable,
		},
		{
			name: "not a prefix: later write visible, earlier one lost",
			s:    newScript().write(0, 1, 3, 1).ack(1).write(0, 2, 9, 1).ack(2),
			base: zeroBase, got: map[int64]uint64{3: 0, 9: 2}, r: nondurable,
			wantN: 1, want: "not a prefix",
		},
		{
			name: "prefix: both or neither",
			s:    newScript().write(0, 1, 3, 1).ack(1).write(0, 2, 9, 1).ack(2),
			base: zeroBase, got: map[int64]uint64{3: 1, 9: 0}, r: nondurable,
		},
		{
			name: "prefix applies per engine",
			s:    newScript().write(0, 1, 3, 1).ack(1).write(1, 2, 9, 1).ack(2),
			base: zeroBase, got: map[int64]uint64{3: 0, 9: 2}, r: rules{prefix: map[int]bool{0: true, 1: true}},
		},
		{
			name: "zeros where data was and nothing zeroed it",
			s:    newScript().write(0, 1, 3, 1),
			base: base7, got: map[int64]uint64{7: 0}, r: nondurable,
			wantN: 1, want: "reads zeros",
		},
		{
			name: "zeros from a discard",
			s:    newScript().zero(0, 5, 6, 2).ack(5).flush(0, "f").done("f"),
			base: base7, got: map[int64]uint64{6: 0, 7: 0}, r: durable,
		},
		{
			name: "flushed discard lost",
			s:    newScript().zero(0, 5, 6, 2).ack(5).flush(0, "f").done("f"),
			base: base7, got: map[int64]uint64{7: 0x700}, r: durable,
			wantN: 1, want: "older than zeroing 0x5",
		},
		{
			name: "data never issued",
			s:    newScript().write(0, 1, 0, 1).ack(1),
			base: zeroBase, got: map[int64]uint64{0: 0x99}, r: nondurable,
			wantN: 1, want: "never issued",
		},
		{
			name: "data issued to another block",
			s:    newScript().write(0, 1, 0, 2).ack(1),
			base: zeroBase, got: map[int64]uint64{4: 1}, r: nondurable,
			wantN: 1, want: "issued to blocks 0+2",
		},
		{
			name: "data of an engine that must not show",
			s:    newScript().write(1, 1, 0, 1).ack(1),
			base: zeroBase, got: map[int64]uint64{0: 1}, r: rules{visible: func(o *op) bool { return o.eng == 0 }},
			wantN: 1, want: "must not be visible",
		},
		{
			name: "another engine's flush does not cover",
			s:    newScript().write(0, 1, 0, 1).ack(1).flush(1, "f").done("f"),
			base: zeroBase, got: map[int64]uint64{0: 0}, r: durable,
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := c.s.r.history().check(c.base, c.got, c.r)
			if len(f) != c.wantN {
				t.Fatalf("got %d findings, want %d:%s", len(f), c.wantN, summarize(f))
			}
			if c.wantN > 0 && !strings.Contains(f[0], c.want) {
				t.Fatalf("finding %q does not mention %q", f[0], c.want)
			}
		})
	}
}

func TestStamps(t *testing.T) {
	blk := stamped(0xabc, 41, 1)
	if id, err := decodeBlock(blk, 41); err != nil || id != 0xabc {
		t.Fatalf("intact stamp decodes as %#x, %v", id, err)
	}
	if _, err := decodeBlock(blk, 42); err == nil || !strings.Contains(err.Error(), "misplaced") {
		t.Fatalf("stamp read at the wrong block: %v, want a misplaced-data error", err)
	}
	torn := append([]byte(nil), blk...)
	copy(torn[2048:], make([]byte, 2048))
	if _, err := decodeBlock(torn, 41); err == nil || !strings.Contains(err.Error(), "torn") {
		t.Fatalf("half-zeroed block: %v, want a torn-data error", err)
	}
	if id, err := decodeBlock(make([]byte, blockSize), 3); err != nil || id != 0 {
		t.Fatalf("zero block decodes as %#x, %v", id, err)
	}
	other := stamped(0xabd, 41, 1)
	if string(other[16:]) == string(blk[16:]) {
		t.Fatal("two writes stamp the same block body")
	}
	junk := make([]byte, blockSize)
	junk[100] = 1
	if _, err := decodeBlock(junk, 0); err == nil {
		t.Fatal("a block of zeros with one stray byte decodes without error")
	}
}
