package gc

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
	"github.com/bs3/bs3/internal/volume"
)

// lookup returns the map's extents of blocks [from, to), as a sequential
// read of them sees them.
func lookup(tb testing.TB, v *volume.Volume, from, to int64) []extentmap.Extent {
	tb.Helper()
	var out []extentmap.Extent
	err := v.MapDo(context.Background(), mapproxy.High, func(m *extentmap.Map) {
		m.Lookup(from, to-from, func(e extentmap.Extent) { out = append(out, e) })
	})
	if err != nil {
		tb.Fatalf("look up blocks [%d, %d): %v", from, to, err)
	}
	return out
}

// dataRuns counts the extents with data among es and the objects they
// are in.
func dataRuns(es []extentmap.Extent) (runs, objects int) {
	seen := make(map[int64]bool)
	for _, e := range es {
		if e.Key >= 0 && !e.Zero {
			runs++
			seen[e.Key] = true
		}
	}
	return runs, len(seen)
}

// checkBlockOrder asserts that every object of key minKey or above holds
// the data of the map's extents in device block order (offsets rise with
// blocks) and returns how many such objects hold more than one extent,
// so a test can tell it checked something.
func checkBlockOrder(tb testing.TB, v *volume.Volume, minKey int64) int {
	tb.Helper()
	byKey := make(map[int64][]extentmap.Extent)
	err := v.MapDo(context.Background(), mapproxy.High, func(m *extentmap.Map) {
		m.Scan(0, v.Size()/v.BlockSize(), func(e extentmap.Extent, _ uint64) bool {
			if !e.Zero && e.Key >= minKey {
				byKey[e.Key] = append(byKey[e.Key], e)
			}
			return true
		})
	})
	if err != nil {
		tb.Fatalf("scan the map: %v", err)
	}
	multi := 0
	for k, es := range byKey {
		slices.SortFunc(es, func(a, b extentmap.Extent) int { return int(a.Off - b.Off) })
		for i := 1; i < len(es); i++ {
			if es[i].Block < es[i-1].Block+es[i-1].N {
				tb.Errorf("object %d holds blocks %d+%d at offset %d before blocks %d+%d at offset %d: not in block order",
					k, es[i-1].Block, es[i-1].N, es[i-1].Off, es[i].Block, es[i].N, es[i].Off)
				break
			}
		}
		if len(es) > 1 {
			multi++
		}
	}
	return multi
}

// TestThresholdCopiesInBlockOrder compacts a working set overwritten at
// random and checks that the copies hold their blocks in device block
// order, not in the order of the objects they came from.
func TestThresholdCopiesInBlockOrder(t *testing.T) {
	e, m, st := churned(t)
	wm := e.Volume.Watermark()
	c := New(e.Volume, Options{Step: 100, LiveData: 1, Logger: testLogger(t)})
	s, err := c.Threshold(context.Background())
	if err != nil {
		t.Fatalf("threshold GC: %v", err)
	}
	if s.Compacted == 0 {
		t.Fatalf("nothing compacted: %s", describe(s))
	}
	if multi := checkBlockOrder(t, e.Volume, wm); multi == 0 {
		t.Fatalf("no copy holds more than one extent: the order check checked nothing")
	}
	m.verify(t, e.Dev, 2*mib/4096+64)
	checkBucket(t, c, st)
}

// TestDefragRangeInBlockOrder fills a device, overwrites it with random
// 4 KiB writes, then defragments its middle: the range must read back as
// one run per object, in few objects, with the same content (also after
// a restart), and the blocks outside the range must not move.
func TestDefragRangeInBlockOrder(t *testing.T) {
	ctx := context.Background()
	st := mem.New()
	const (
		bs     = 4096
		filled = 16 * mib / bs
		from   = 4 * mib / bs
		to     = 12 * mib / bs
	)
	eo := enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 1 * mib}
	e := enginetest.Open(t, st, eo)
	m := newModel(bs)
	fill(t, e, m, filled)
	rng := rand.New(rand.NewPCG(5, 5))
	for range 4 * mib / bs {
		m.write(t, e.Dev, rng.Int64N(filled), 1)
	}
	drain(t, e)
	// The newest object is left alone: keep range data out of it.
	m.write(t, e.Dev, filled+100, 1)
	drain(t, e)

	beforeRuns, beforeObjs := dataRuns(lookup(t, e.Volume, from, to))
	outside := [][2]int64{{0, from}, {to, filled + 128}}
	var outBefore [][]extentmap.Extent
	for _, r := range outside {
		outBefore = append(outBefore, lookup(t, e.Volume, r[0], r[1]))
	}
	wm := e.Volume.Watermark()

	c := New(e.Volume, Options{Step: 300, Logger: testLogger(t)})
	s, err := c.Defrag(ctx, Range{Offset: from * bs, Length: (to - from) * bs})
	if err != nil {
		t.Fatalf("defragment: %v", err)
	}
	if s.Compacted == 0 || s.BytesWritten == 0 {
		t.Fatalf("nothing defragmented: %s", describe(s))
	}
	m.verify(t, e.Dev, filled+128)

	check := func(when string) {
		t.Helper()
		es := lookup(t, e.Volume, from, to)
		runs, objs := dataRuns(es)
		l := e.Volume.Layout()
		perChunk := min(l.ChunkSize/bs, l.MaxItems())
		maxObjs := int((to-from+perChunk-1)/perChunk) + 1
		t.Logf("%s: blocks [%d, %d): %d runs in %d objects before, %d runs in %d objects after (at most %d objects allowed)",
			when, from, to, beforeRuns, beforeObjs, runs, objs, maxObjs)
		if runs != objs || objs > maxObjs {
			t.Errorf("%s: the range reads as %d runs in %d objects, want one run per object and at most %d objects", when, runs, objs, maxObjs)
		}
		for _, e := range es {
			if e.Key >= 0 && e.Key < wm {
				t.Errorf("%s: blocks %d+%d still in object %d, which predates the run", when, e.Block, e.N, e.Key)
				break
			}
		}
		for i, r := range outside {
			if got := lookup(t, e.Volume, r[0], r[1]); !slices.Equal(got, outBefore[i]) {
				t.Errorf("%s: blocks [%d, %d) outside the range moved", when, r[0], r[1])
			}
		}
	}
	if beforeRuns < 10*int(to-from)/int(mib/bs) {
		t.Fatalf("the range was not fragmented before: %d runs", beforeRuns)
	}
	check("after defragmentation")
	checkBlockOrder(t, e.Volume, wm)
	checkBucket(t, c, st)

	e.Close(t)
	e = enginetest.Open(t, st, eo)
	m.verify(t, e.Dev, filled+128)
	check("after restart")
}

// TestDefragRangeBounds checks that a range is widened to whole blocks and
// clipped to the device, and that a range past the end is refused.
func TestDefragRangeBounds(t *testing.T) {
	const size, bs = 1 << 20, 4096
	for _, tc := range []struct {
		r        Range
		from, to int64
		bad      bool
	}{
		{Range{}, 0, 256, false},
		{Range{Offset: 4096, Length: 4096}, 1, 2, false},
		{Range{Offset: 4095, Length: 2}, 0, 2, false},
		{Range{Offset: 8192, Length: 1 << 30}, 2, 256, false},
		{Range{Offset: size - 1}, 255, 256, false},
		{Range{Offset: size}, 0, 0, true},
		{Range{Offset: -1}, 0, 0, true},
		{Range{Length: -1}, 0, 0, true},
	} {
		from, to, err := tc.r.blocks(size, bs)
		if tc.bad != (err != nil) || (!tc.bad && (from != tc.from || to != tc.to)) {
			t.Errorf("%+v: blocks [%d, %d), %v; want [%d, %d), error %v", tc.r, from, to, err, tc.from, tc.to, tc.bad)
		}
	}
}

// TestDefragAndThresholdExclusive holds a threshold run inside its first
// copy: a defragmentation is refused meanwhile, and the other way round.
func TestDefragAndThresholdExclusive(t *testing.T) {
	e, m, _ := churned(t)
	c := New(e.Volume, Options{Step: 1024, LiveData: 1, Logger: testLogger(t)})
	for _, first := range []string{"threshold", "defrag"} {
		t.Run(first, func(t *testing.T) {
			inside := make(chan struct{})
			release := make(chan struct{})
			// Only the first caller waits: a second run let in by mistake
			// must get through and fail the test, not hang it.
			var entered atomic.Bool
			c.hook = func(s string) {
				if s == "read" && entered.CompareAndSwap(false, true) {
					close(inside)
					<-release
				}
			}
			res := make(chan error, 1)
			go func() {
				var err error
				if first == "threshold" {
					_, err = c.Threshold(context.Background())
				} else {
					_, err = c.Defrag(context.Background(), Range{})
				}
				res <- err
			}()
			<-inside
			if _, err := c.Defrag(context.Background(), Range{}); !errors.Is(err, ErrBusy) {
				t.Errorf("Defrag during a %s run: %v, want ErrBusy", first, err)
			}
			if c.TriggerDefrag(Range{}) {
				t.Errorf("TriggerDefrag during a %s run started another one", first)
			}
			if _, err := c.Threshold(context.Background()); !errors.Is(err, ErrBusy) {
				t.Errorf("Threshold during a %s run: %v, want ErrBusy", first, err)
			}
			close(release)
			if err := <-res; err != nil {
				t.Fatalf("%s run: %v", first, err)
			}
			c.hook = nil
		})
	}
	if !c.TriggerDefrag(Range{}) {
		t.Fatalf("TriggerDefrag refused with no run going")
	}
	c.Stop() // waits for the triggered run
	if _, err := c.Defrag(context.Background(), Range{}); !errors.Is(err, ErrStopped) {
		t.Errorf("Defrag after Stop: %v, want ErrStopped", err)
	}
	m.verify(t, e.Dev, 1024)
}

func defragAll(c *Collector, ctx context.Context) (Stats, error) { return c.Defrag(ctx, Range{}) }

// TestDefragCopyLosesToWritesAroundCommit is TestCopyLosesToWritesAroundCommit
// for a defragmentation.
func TestDefragCopyLosesToWritesAroundCommit(t *testing.T) {
	copyLosesAroundCommit(t, defragAll)
}

// TestDefragUserWritesWin is TestUserWritesWinDuringCompaction for a
// defragmentation of the whole device, on MinIO.
func TestDefragUserWritesWin(t *testing.T) {
	srv := minio.Start(t)
	for _, seed := range []uint64{1, 2} {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			st := srv.Store(t, srv.Bucket(t))
			userWritesWin(t, st, seed, defragAll)
		})
	}
}

// TestDefragOnMinIO defragments a range of a device churned with random
// writes and discards on MinIO: same content, copies in block order,
// bucket invariants, and the same content after a restart.
func TestDefragOnMinIO(t *testing.T) {
	ctx := context.Background()
	srv := minio.Start(t)
	st := srv.Store(t, srv.Bucket(t))
	const (
		bs     = 4096
		filled = 16 * mib / bs
	)
	eo := enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: 1 * mib}
	e := enginetest.Open(t, st, eo)
	m := newModel(bs)
	fill(t, e, m, filled)
	workload(t, e, m, rand.New(rand.NewPCG(9, 9)), 0, filled, 16*mib)
	m.write(t, e.Dev, filled+10, 1)
	drain(t, e)
	wm := e.Volume.Watermark()
	c := New(e.Volume, Options{Step: 1000, Logger: testLogger(t)})
	s, err := c.Defrag(ctx, Range{Offset: 2 * mib, Length: 10 * mib})
	if err != nil {
		t.Fatalf("defragment: %v", err)
	}
	if s.Compacted == 0 || s.BytesWritten == 0 {
		t.Fatalf("nothing defragmented: %s", describe(s))
	}
	t.Logf("defragmentation: %s", describe(s))
	m.verify(t, e.Dev, filled+16)
	if multi := checkBlockOrder(t, e.Volume, wm); multi == 0 {
		t.Errorf("no copy holds more than one extent: the order check checked nothing")
	}
	checkBucket(t, c, st)
	e.Close(t)
	e = enginetest.Open(t, st, eo)
	m.verify(t, e.Dev, filled+16)
}

// TestDefragLeavesNewestObject defragments a range whose newest data is
// in the newest object: that object keeps its blocks and stays in the
// bucket, older ones are compacted.
func TestDefragLeavesNewestObject(t *testing.T) {
	st := mem.New()
	e := enginetest.Open(t, st, enginetest.Options{Size: 16 * mib, BlockSize: 4096, ChunkSize: 1 * mib})
	m := newModel(4096)
	m.write(t, e.Dev, 0, 64)
	drain(t, e)
	old := newestKey(e)
	m.write(t, e.Dev, 64, 64)
	drain(t, e)
	newest := newestKey(e)
	c := New(e.Volume, Options{Logger: testLogger(t)})
	s, err := c.Defrag(context.Background(), Range{})
	if err != nil {
		t.Fatalf("defragment: %v", err)
	}
	state, _, _ := mapState(t, e.Volume, []int64{old, newest})
	if s.Compacted != 1 || state[old].live != 0 {
		t.Errorf("older object %d not compacted alone: %+v, %s", old, state[old], describe(s))
	}
	if state[newest].live != 64 {
		t.Errorf("newest object %d lost blocks to the defragmentation: %+v", newest, state[newest])
	}
	if size, ok := objectSize(t, st, newest); !ok || size == 0 {
		t.Errorf("newest object %d is gone or emptied (size %d, present %t)", newest, size, ok)
	}
	m.verify(t, e.Dev, 256)
}

// TestBatchGetSpansChunks plans one GET for two adjacent blocks of an
// object whose copies go to two chunks of a batch, at offsets that would
// line up if both were in one buffer: each chunk must get its own block.
func TestBatchGetSpansChunks(t *testing.T) {
	ctx := context.Background()
	e := enginetest.Open(t, mem.New(), enginetest.Options{Size: 16 * mib, BlockSize: 4096, ChunkSize: 1 * mib})
	m := newModel(4096)
	// Object K: block 100 at offset 0, block 200 at offset 1. Object J:
	// block 150.
	m.write(t, e.Dev, 100, 1)
	m.write(t, e.Dev, 200, 1)
	drain(t, e)
	m.write(t, e.Dev, 150, 1)
	drain(t, e)
	m.write(t, e.Dev, 1000, 1)
	drain(t, e)
	var ps []piece
	err := e.Volume.MapDo(ctx, mapproxy.High, func(mp *extentmap.Map) {
		mp.Scan(0, 1000, func(x extentmap.Extent, seq uint64) bool {
			ps = append(ps, piece{block: x.Block, n: x.N, key: x.Key, off: x.Off, seq: seq})
			return true
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 3 || ps[0].key != ps[2].key || ps[0].off+1 != ps[2].off {
		t.Fatalf("unexpected layout %+v", ps)
	}
	c := New(e.Volume, Options{Logger: testLogger(t)})
	r := newCopier(c, ctx)
	// Chunk 0: block 100 at md; chunk 1: block 150 at md, block 200 at
	// md+block: from K, one GET of offsets 0–1 whose second block would
	// land at md+block of chunk 0's buffer if read straight.
	if err := r.lookUpStarts([]int64{ps[0].key, ps[1].key}); err != nil {
		t.Fatal(err)
	}
	r.batch = [][]piece{{ps[0]}, {ps[1], ps[2]}}
	r.flushBatch()
	if err := r.wait(); err != nil {
		t.Fatalf("copy: %v", err)
	}
	m.verify(t, e.Dev, 1024)
	if got := lookup(t, e.Volume, 200, 201); got[0].Key == ps[2].key {
		t.Fatalf("block 200 was not copied: %+v", got)
	}
}
