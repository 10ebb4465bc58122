package extentmap

import (
	"errors"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"
)

func mustNew(t testing.TB, blocks int64) *Map {
	t.Helper()
	m, err := New(blocks)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func mustUpdate(t testing.TB, m *Map, block, n, key, off int64, seq uint64, want int64) {
	t.Helper()
	got, err := m.Update(block, n, key, off, seq)
	if err != nil {
		t.Fatalf("Update(%d, %d, key %d, off %d, seq %d): %v", block, n, key, off, seq, err)
	}
	if got != want {
		t.Fatalf("Update(%d, %d, key %d, off %d, seq %d) applied %d, want %d", block, n, key, off, seq, got, want)
	}
}

func mustZero(t testing.TB, m *Map, block, n, key int64, seq uint64, want int64) {
	t.Helper()
	got, err := m.UpdateZero(block, n, key, seq)
	if err != nil {
		t.Fatalf("UpdateZero(%d, %d, key %d, seq %d): %v", block, n, key, seq, err)
	}
	if got != want {
		t.Fatalf("UpdateZero(%d, %d, key %d, seq %d) applied %d, want %d", block, n, key, seq, got, want)
	}
}

func lookup(m *Map, block, n int64) []Extent {
	var es []Extent
	m.Lookup(block, n, func(e Extent) { es = append(es, e) })
	return es
}

func wantLive(t *testing.T, m *Map, key, live, total int64) {
	t.Helper()
	l, tot, ok := m.Live(key)
	if !ok || l != live || tot != total {
		t.Fatalf("Live(%d) = %d, %d, %v; want %d, %d, true", key, l, tot, ok, live, total)
	}
}

func TestLookupUnwritten(t *testing.T) {
	m := mustNew(t, 10000)
	got := lookup(m, 100, 9000)
	want := []Extent{{Block: 100, N: 9000, Key: -1}}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
	// Past the device end: reported unmapped, still covering the range.
	got = lookup(m, 9990, 20)
	want = []Extent{{Block: 9990, N: 20, Key: -1}}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup past end = %+v, want %+v", got, want)
	}
	if got := lookup(m, 5, 0); len(got) != 0 {
		t.Fatalf("Lookup of 0 blocks = %+v", got)
	}
	if m.WrittenBlocks() != 0 || m.Seq(5) != 0 {
		t.Fatal("unwritten map reports written blocks")
	}
}

func TestOverlapAndCoalescing(t *testing.T) {
	m := mustNew(t, 3*pageLen)
	// Object 1 holds blocks 4090..4109 (crossing a page boundary) at
	// offsets 0..19; object 2 then overwrites 4095..4099 at offsets 7..11.
	mustUpdate(t, m, 4090, 20, 1, 0, 10, 20)
	mustUpdate(t, m, 4095, 5, 2, 7, 11, 5)
	// Object 3 writes 4100..4101 at offsets 20..21, continuing nothing.
	mustUpdate(t, m, 4100, 2, 3, 20, 12, 2)
	// Object 4 discards 4104..4105.
	mustZero(t, m, 4104, 2, 4, 13, 2)
	got := lookup(m, 4085, 30)
	want := []Extent{
		{Block: 4085, N: 5, Key: -1},
		{Block: 4090, N: 5, Key: 1, Off: 0},
		{Block: 4095, N: 5, Key: 2, Off: 7},
		{Block: 4100, N: 2, Key: 3, Off: 20},
		{Block: 4102, N: 2, Key: 1, Off: 12},
		{Block: 4104, N: 2, Key: 4, Zero: true},
		{Block: 4106, N: 4, Key: 1, Off: 16},
		{Block: 4110, N: 5, Key: -1},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup =\n%+v\nwant\n%+v", got, want)
	}
	wantLive(t, m, 1, 20-5-2-2, 0)
	wantLive(t, m, 2, 5, 0)
	wantLive(t, m, 3, 2, 0)
	wantLive(t, m, 4, 2, 0)
	if m.WrittenBlocks() != 20 {
		t.Fatalf("WrittenBlocks = %d, want 20", m.WrittenBlocks())
	}
	// Same object but non-contiguous offsets must not coalesce.
	mustUpdate(t, m, 0, 1, 5, 3, 1, 1)
	mustUpdate(t, m, 1, 1, 5, 5, 1, 1)
	got = lookup(m, 0, 2)
	want = []Extent{{Block: 0, N: 1, Key: 5, Off: 3}, {Block: 1, N: 1, Key: 5, Off: 5}}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
}

func TestSeqOrdering(t *testing.T) {
	m := mustNew(t, 100)
	mustUpdate(t, m, 10, 4, 7, 0, 50, 4)
	// An older write arriving later (its chunk uploaded late) loses.
	mustUpdate(t, m, 8, 8, 6, 100, 49, 4) // only 8,9,14,15 are older/unwritten
	got := lookup(m, 8, 8)
	want := []Extent{
		{Block: 8, N: 2, Key: 6, Off: 100},
		{Block: 10, N: 4, Key: 7, Off: 0},
		{Block: 14, N: 2, Key: 6, Off: 106},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
	// An equal seqno replaces: a GC copy of the same write.
	mustUpdate(t, m, 11, 2, 9, 40, 50, 2)
	if s := m.Seq(11); s != 50 {
		t.Fatalf("Seq(11) = %d, want 50", s)
	}
	got = lookup(m, 10, 4)
	want = []Extent{
		{Block: 10, N: 1, Key: 7, Off: 0},
		{Block: 11, N: 2, Key: 9, Off: 40},
		{Block: 13, N: 1, Key: 7, Off: 3},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
	wantLive(t, m, 7, 2, 0)
	wantLive(t, m, 6, 4, 0)
	wantLive(t, m, 9, 2, 0)
	// The newest write wins regardless of key order.
	mustUpdate(t, m, 10, 1, 2, 0, 51, 1)
	wantLive(t, m, 7, 1, 0)
	if got := lookup(m, 10, 1); got[0].Key != 2 {
		t.Fatalf("block 10 = %+v, want key 2", got[0])
	}
}

func TestTombstones(t *testing.T) {
	m := mustNew(t, 1000)
	mustZero(t, m, 100, 50, 3, 20, 50)
	// An older data write that arrives after the discard must not undo it.
	mustUpdate(t, m, 90, 20, 2, 0, 19, 10)
	got := lookup(m, 90, 60)
	want := []Extent{
		{Block: 90, N: 10, Key: 2, Off: 0},
		{Block: 100, N: 50, Key: 3, Zero: true},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
	// The tombstones keep the discarding object live.
	wantLive(t, m, 3, 50, 0)
	if d := m.Dead(100); len(d) != 0 {
		t.Fatalf("Dead = %v, want none", d)
	}
	// Newer data replaces a tombstone; tombstones of another object do not
	// coalesce with key 3's.
	mustUpdate(t, m, 120, 1, 4, 9, 21, 1)
	mustZero(t, m, 121, 2, 5, 22, 2)
	got = lookup(m, 118, 6)
	want = []Extent{
		{Block: 118, N: 2, Key: 3, Zero: true},
		{Block: 120, N: 1, Key: 4, Off: 9},
		{Block: 121, N: 2, Key: 5, Zero: true},
		{Block: 123, N: 1, Key: 3, Zero: true},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
	wantLive(t, m, 3, 47, 0)
	var scanned []Extent
	var seqs []uint64
	m.Scan(0, 1000, func(e Extent, seq uint64) bool {
		scanned = append(scanned, e)
		seqs = append(seqs, seq)
		return true
	})
	wantScan := []Extent{
		{Block: 90, N: 10, Key: 2, Off: 0},
		{Block: 100, N: 20, Key: 3, Zero: true},
		{Block: 120, N: 1, Key: 4, Off: 9},
		{Block: 121, N: 2, Key: 5, Zero: true},
		{Block: 123, N: 27, Key: 3, Zero: true},
	}
	if !slices.Equal(scanned, wantScan) || !slices.Equal(seqs, []uint64{19, 20, 21, 22, 20}) {
		t.Fatalf("Scan = %+v %v, want %+v", scanned, seqs, wantScan)
	}
}

func TestScanSplitsBySeqAndStops(t *testing.T) {
	m := mustNew(t, 5*pageLen)
	mustUpdate(t, m, 10, 4, 1, 0, 5, 4)
	mustUpdate(t, m, 12, 2, 1, 2, 6, 2) // same key, contiguous, newer seq
	mustUpdate(t, m, 4*pageLen+3, 1, 2, 0, 1, 1)
	var got []Extent
	var seqs []uint64
	m.Scan(0, 5*pageLen, func(e Extent, seq uint64) bool {
		got = append(got, e)
		seqs = append(seqs, seq)
		return true
	})
	want := []Extent{
		{Block: 10, N: 2, Key: 1, Off: 0},
		{Block: 12, N: 2, Key: 1, Off: 2},
		{Block: 4*pageLen + 3, N: 1, Key: 2},
	}
	if !slices.Equal(got, want) || !slices.Equal(seqs, []uint64{5, 6, 1}) {
		t.Fatalf("Scan = %+v %v, want %+v [5 6 1]", got, seqs, want)
	}
	calls := 0
	m.Scan(0, 5*pageLen, func(Extent, uint64) bool { calls++; return false })
	if calls != 1 {
		t.Fatalf("Scan called fn %d times after it returned false", calls)
	}
	// A step boundary cuts extents.
	got = got[:0]
	m.Scan(11, 2, func(e Extent, _ uint64) bool { got = append(got, e); return true })
	want = []Extent{{Block: 11, N: 1, Key: 1, Off: 1}, {Block: 12, N: 1, Key: 1, Off: 2}}
	if !slices.Equal(got, want) {
		t.Fatalf("Scan(11, 2) = %+v, want %+v", got, want)
	}
}

func TestObjectsDeadForget(t *testing.T) {
	m := mustNew(t, 1000)
	for k := int64(0); k < 4; k++ {
		if err := m.AddObject(k, 10); err != nil {
			t.Fatal(err)
		}
		mustUpdate(t, m, 0, 10, k, 0, uint64(k+1), 10)
	}
	// An empty placeholder.
	if err := m.AddObject(4, 0); err != nil {
		t.Fatal(err)
	}
	wantLive(t, m, 3, 10, 10)
	wantLive(t, m, 0, 0, 10)
	if got := m.Dead(3); !slices.Equal(got, []int64{0, 1, 2}) {
		t.Fatalf("Dead(3) = %v, want [0 1 2]", got)
	}
	if got := m.Dead(100); !slices.Equal(got, []int64{0, 1, 2, 4}) {
		t.Fatalf("Dead(100) = %v, want [0 1 2 4]", got)
	}
	if err := m.Forget(3); err == nil {
		t.Fatal("Forget of a live object succeeded")
	}
	if err := m.Forget(1); err != nil {
		t.Fatal(err)
	}
	if err := m.Forget(1); err == nil {
		t.Fatal("Forget of an untracked object succeeded")
	}
	if _, _, ok := m.Live(1); ok {
		t.Fatal("forgotten object still tracked")
	}
	if got := m.Dead(100); !slices.Equal(got, []int64{0, 2, 4}) {
		t.Fatalf("Dead(100) = %v, want [0 2 4]", got)
	}
	var keys []int64
	m.Objects(func(key, live, total int64) bool { keys = append(keys, key); return true })
	if !slices.Equal(keys, []int64{0, 2, 3, 4}) {
		t.Fatalf("Objects = %v, want [0 2 3 4]", keys)
	}
	// Forgetting everything releases the counters; keys far apart are
	// tracked without the span in between costing per-key memory.
	for _, k := range []int64{0, 2, 4} {
		if err := m.Forget(k); err != nil {
			t.Fatal(err)
		}
	}
	mustUpdate(t, m, 0, 10, 1<<20, 0, 100, 10)
	if err := m.Forget(3); err != nil {
		t.Fatal(err)
	}
	if m.TrackedObjects() != 1 || m.objs.heapBytes() > 16384 {
		t.Fatalf("tracked %d, counters hold %d bytes", m.TrackedObjects(), m.objs.heapBytes())
	}
	// A key below the lowest tracked one (an old chunk applied late).
	mustUpdate(t, m, 20, 1, 5, 0, 1, 1)
	wantLive(t, m, 5, 1, 0)
	wantLive(t, m, 1<<20, 10, 0)
	if _, err := m.Update(30, 1, 1<<20+maxKeySpan, 0, 1); !errors.Is(err, ErrRange) {
		t.Fatalf("key beyond the tracked span: err = %v, want ErrRange", err)
	}
}

func TestRangeErrors(t *testing.T) {
	m := mustNew(t, 100)
	for _, c := range []struct {
		block, n, key, off int64
	}{
		{-1, 1, 0, 0}, {99, 2, 0, 0}, {0, -1, 0, 0}, {0, 1, -1, 0},
		{0, 1, MaxKey + 1, 0}, {0, 1, 0, -1}, {0, 1, 0, MaxOff + 1}, {0, 2, 0, MaxOff},
	} {
		if _, err := m.Update(c.block, c.n, c.key, c.off, 1); !errors.Is(err, ErrRange) {
			t.Errorf("Update(%+v): err = %v, want ErrRange", c, err)
		}
	}
	if _, err := m.UpdateZero(50, 51, 0, 1); !errors.Is(err, ErrRange) {
		t.Errorf("UpdateZero past end: err = %v", err)
	}
	if m.WrittenBlocks() != 0 || m.TrackedObjects() != 0 {
		t.Fatal("failed updates changed the map")
	}
	// The largest valid key and offset work.
	mustUpdate(t, m, 99, 1, MaxKey, MaxOff, 1, 1)
	if got := lookup(m, 99, 1); got[0] != (Extent{Block: 99, N: 1, Key: MaxKey, Off: MaxOff}) {
		t.Fatalf("Lookup = %+v", got)
	}
	if _, err := New(-1); err == nil {
		t.Fatal("New(-1) succeeded")
	}
	if _, err := New(MaxBlocks + 1); err == nil {
		t.Fatal("New(MaxBlocks+1) succeeded")
	}
	if err := m.AddObject(1, -1); err == nil {
		t.Fatal("AddObject with negative total succeeded")
	}
	if err := m.Grow(99); err == nil {
		t.Fatal("Grow shrinking the map succeeded")
	}
}

func TestGrow(t *testing.T) {
	m := mustNew(t, 1000)
	mustUpdate(t, m, 990, 10, 1, 0, 1, 10)
	if _, err := m.Update(1000, 1, 1, 10, 1); err == nil {
		t.Fatal("write past the end succeeded")
	}
	// Grow across a directory chunk boundary.
	blocks := int64(3 * dirLen * pageLen)
	if err := m.Grow(blocks); err != nil {
		t.Fatal(err)
	}
	if m.Blocks() != blocks {
		t.Fatalf("Blocks = %d", m.Blocks())
	}
	mustUpdate(t, m, blocks-5, 5, 2, 0, 1, 5)
	got := lookup(m, 985, 20)
	want := []Extent{{Block: 985, N: 5, Key: -1}, {Block: 990, N: 10, Key: 1}, {Block: 1000, N: 5, Key: -1}}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
	got = lookup(m, blocks-6, 6)
	want = []Extent{{Block: blocks - 6, N: 1, Key: -1}, {Block: blocks - 5, N: 5, Key: 2}}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
}

func TestSparseToDense(t *testing.T) {
	m := mustNew(t, 2*pageLen)
	rng := rand.New(rand.NewPCG(1, 2))
	md := newModel(2 * pageLen)
	order := rng.Perm(pageLen)
	for i, b := range order {
		key := int64(i / 100)
		seq := uint64(i)
		got, _ := m.Update(int64(b), 1, key, int64(i%100), seq)
		if want := md.update(int64(b), 1, key, int64(i%100), false, seq); got != want {
			t.Fatalf("write %d applied %d, want %d", i, got, want)
		}
		p := m.page(0)
		if dense := p.d != nil; dense != (i+1 > sparseMax) {
			t.Fatalf("after %d entries dense = %v", i+1, dense)
		}
		if i%512 == 0 || i == sparseMax || i == sparseMax-1 {
			check(t, m, md)
		}
	}
	check(t, m, md)
	// A full dense page costs 16 bytes per block.
	if hb := m.HeapBytes(); hb < pageLen*16 || hb > pageLen*16+16384 {
		t.Fatalf("HeapBytes = %d for one full page", hb)
	}
	// A single run over a fresh page is one entry of the runs form, and
	// Lookup sees one extent.
	mustUpdate(t, m, pageLen, pageLen, 99, 0, 1<<40, pageLen)
	if p := m.page(1); p.rn == nil || len(p.rn.r) != 1 {
		t.Fatal("page written by one run is not a single run")
	}
	if got := lookup(m, pageLen, pageLen); len(got) != 1 || got[0] != (Extent{Block: pageLen, N: pageLen, Key: 99}) {
		t.Fatalf("Lookup = %+v", got)
	}
}

func TestSparseRebase(t *testing.T) {
	m := mustNew(t, 100)
	// The page's key base is set around the first key; keys that move on
	// by more than 2^32 over the volume's life must still fit. Written
	// block by block, the page starts sparse.
	for b := int64(0); b < 10; b++ {
		mustUpdate(t, m, b, 1, 0, b, 1, 1)
	}
	if p := m.page(0); p.rn != nil || p.d != nil {
		t.Fatal("page written block by block is not sparse")
	}
	k1 := int64(1<<31 - 10)
	mustUpdate(t, m, 0, 5, k1, 0, 2, 5)
	mustUpdate(t, m, 5, 5, k1, 5, 2, 5)
	if err := m.Forget(0); err != nil {
		t.Fatal(err)
	}
	k2 := int64(1<<32 - 1000)
	mustUpdate(t, m, 0, 10, k2, 0, 3, 10)
	if err := m.Forget(k1); err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, m, 2, 10, k2, 50, 2, 2) // blocks 2..9 hold newer data
	k3 := int64(1<<32 + 50)
	mustUpdate(t, m, 3, 2, k3, 7, 4, 2)
	if p := m.page(0); p.d != nil || p.rn != nil {
		t.Fatal("page changed form instead of rebasing")
	}
	got := lookup(m, 0, 13)
	want := []Extent{
		{Block: 0, N: 3, Key: k2, Off: 0},
		{Block: 3, N: 2, Key: k3, Off: 7},
		{Block: 5, N: 5, Key: k2, Off: 5},
		{Block: 10, N: 2, Key: k2, Off: 58},
		{Block: 12, N: 1, Key: -1},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
	wantLive(t, m, k2, 10, 0)
	wantLive(t, m, k3, 2, 0)
	// Keys more than 2^32 apart cannot share a sparse page: it turns to
	// runs, which hold whole keys.
	k4 := k3 + 1<<33
	mustUpdate(t, m, 20, 1, k4, 1, 5, 1)
	if m.page(0).rn == nil {
		t.Fatal("page with a key span over 2^32 is not in runs form")
	}
	want = append(want[:4], Extent{Block: 12, N: 8, Key: -1}, Extent{Block: 20, N: 1, Key: k4, Off: 1}, Extent{Block: 21, N: 79, Key: -1})
	if got := lookup(m, 0, 100); !slices.Equal(got, want) {
		t.Fatalf("Lookup = %+v, want %+v", got, want)
	}
	m2 := reload(t, m)
	if got := lookup(m2, 0, 100); !slices.Equal(got, want) || m2.page(0).rn == nil {
		t.Fatalf("decoded Lookup = %+v, want %+v (runs)", got, want)
	}
}

// TestUnwrittenCostsLittle checks that a map's memory follows what was
// written: a 1 TiB device of 512-byte blocks (2^31 blocks) starts at a few
// KiB, and 1 GiB of scattered 4 KiB writes on a 1 TiB device costs far less
// than the 32 bytes per device block of a flat table.
func TestUnwrittenCostsLittle(t *testing.T) {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	m := mustNew(t, 1<<40/512)
	runtime.ReadMemStats(&after)
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 64<<10 {
		t.Fatalf("empty 1 TiB map allocated %d bytes", alloc)
	}
	if hb := m.HeapBytes(); hb > 16<<10 {
		t.Fatalf("empty 1 TiB map HeapBytes = %d", hb)
	}
	if testing.Short() {
		t.Skip("short: skipping the 1 GiB scattered write part")
	}
	m = mustNew(t, 1<<40/4096)
	rng := rand.New(rand.NewPCG(3, 4))
	const writes = 1 << 30 / 4096
	for i := int64(0); i < writes; i++ {
		if _, err := m.Update(rng.Int64N(m.Blocks()), 1, i/1024, i%1024, uint64(i+1)); err != nil {
			t.Fatal(err)
		}
	}
	// 4 entries per page on average: page and directory overhead dominate,
	// but it must stay within a small multiple of the 16-byte entry.
	if per := float64(m.HeapBytes()) / float64(m.WrittenBlocks()); per > 48 {
		t.Fatalf("%.1f heap bytes per written block at 1/1024 density", per)
	}
}

// TestRandomDensityMemory checks the memory target on a scaled-down version
// of the benchmark: 4 KiB random writes at 1/16 density.
func TestRandomDensityMemory(t *testing.T) {
	const blocks = 1 << 30 / 4096 // 1 GiB device
	m := mustNew(t, blocks)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := int64(0); i < blocks/16; i++ {
		if _, err := m.Update(rng.Int64N(blocks), 1, i/1024, i%1024, uint64(i+1)); err != nil {
			t.Fatal(err)
		}
	}
	if per := float64(m.HeapBytes()) / float64(m.WrittenBlocks()); per > 20 {
		t.Fatalf("%.1f heap bytes per written block at 1/16 density, want <= 20", per)
	}
}

// TestDenseRunEdges checks run detection in dense pages where packed
// locations are adjacent without the data being contiguous: a tombstone of
// key k next to data of key k+1 at offset 0, and data at the last offset
// next to a tombstone of the same key.
func TestDenseRunEdges(t *testing.T) {
	m := mustNew(t, pageLen)
	for b := int64(0); b < pageLen; b++ { // block by block: sparse, then dense
		mustUpdate(t, m, b, 1, 1, b, 1, 1)
	}
	mustZero(t, m, 10, 1, 7, 2, 1)
	mustUpdate(t, m, 11, 2, 8, 0, 2, 2)
	mustUpdate(t, m, 20, 1, 9, MaxOff, 2, 1)
	mustZero(t, m, 21, 1, 9, 2, 1)
	mustZero(t, m, 22, 1, 9, 2, 1)
	if m.page(0).d == nil {
		t.Fatal("page is not dense")
	}
	got := lookup(m, 9, 15)
	want := []Extent{
		{Block: 9, N: 1, Key: 1, Off: 9},
		{Block: 10, N: 1, Key: 7, Zero: true},
		{Block: 11, N: 2, Key: 8, Off: 0},
		{Block: 13, N: 7, Key: 1, Off: 13},
		{Block: 20, N: 1, Key: 9, Off: MaxOff},
		{Block: 21, N: 2, Key: 9, Zero: true},
		{Block: 23, N: 1, Key: 1, Off: 23},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Lookup =\n%+v\nwant\n%+v", got, want)
	}
}
