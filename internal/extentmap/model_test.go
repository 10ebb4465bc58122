package extentmap

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// ref is the reference model's entry for one block.
type ref struct {
	key, off int64
	seq      uint64
	zero     bool
}

// model is a deliberately naive block map: a Go map per block and per
// object, updated one block at a time.
type model struct {
	blocks int64
	e      map[int64]ref
	total  map[int64]int64 // tracked objects and their totals
	forgot int
	// liveCount is maintained per update; check() compares it with a
	// recount from the entries.
	liveCount map[int64]int64
}

func newModel(blocks int64) *model {
	return &model{blocks: blocks, e: map[int64]ref{}, total: map[int64]int64{}, liveCount: map[int64]int64{}}
}

func (md *model) update(block, n, key, off int64, zero bool, seq uint64) int64 {
	if _, ok := md.total[key]; !ok {
		md.total[key] = 0
	}
	var applied int64
	for i := int64(0); i < n; i++ {
		cur, ok := md.e[block+i]
		if ok && cur.seq > seq {
			continue
		}
		if ok {
			md.liveCount[cur.key]--
		}
		md.liveCount[key]++
		r := ref{key: key, seq: seq, zero: zero}
		if !zero {
			r.off = off + i
		}
		md.e[block+i] = r
		applied++
	}
	return applied
}

func (md *model) live() map[int64]int64 {
	l := map[int64]int64{}
	for _, r := range md.e {
		l[r.key]++
	}
	return l
}

func (md *model) sortedBlocks() []int64 {
	bs := make([]int64, 0, len(md.e))
	for b := range md.e {
		bs = append(bs, b)
	}
	slices.Sort(bs)
	return bs
}

// check compares every observable of m with the model.
func check(t *testing.T, m *Map, md *model) {
	t.Helper()
	if m.Blocks() != md.blocks {
		t.Fatalf("Blocks() = %d, want %d", m.Blocks(), md.blocks)
	}
	if got, want := m.WrittenBlocks(), int64(len(md.e)); got != want {
		t.Fatalf("WrittenBlocks() = %d, want %d", got, want)
	}
	checkInternals(t, m)
	bs := md.sortedBlocks()
	checkLookup(t, m, md, bs, 0, md.blocks)
	checkScan(t, m, md, bs, 0, md.blocks)
	checkObjects(t, m, md)
}

// checkLookup verifies that Lookup over [from, from+n) covers the range
// exactly, agrees with the model on every block, and coalesces maximally.
func checkLookup(t *testing.T, m *Map, md *model, bs []int64, from, n int64) {
	t.Helper()
	next := from
	bi, _ := slices.BinarySearch(bs, from)
	var prev *Extent
	var bad string
	m.Lookup(from, n, func(e Extent) {
		if bad != "" {
			return
		}
		if e.Block != next || e.N <= 0 {
			bad = fmt.Sprintf("extent %+v does not continue at %d", e, next)
			return
		}
		if prev != nil && prev.Key == e.Key && prev.Zero == e.Zero && (e.Key < 0 || e.Zero || prev.Off+prev.N == e.Off) {
			bad = fmt.Sprintf("extents %+v and %+v should have been coalesced", *prev, e)
			return
		}
		p := e
		prev = &p
		next = e.Block + e.N
		if e.Key < 0 {
			if e.Zero || e.Off != 0 {
				bad = fmt.Sprintf("unmapped extent %+v has Zero/Off set", e)
				return
			}
			if bi < len(bs) && bs[bi] < next {
				bad = fmt.Sprintf("unmapped extent %+v hides written block %d (%+v)", e, bs[bi], md.e[bs[bi]])
			}
			return
		}
		for b := e.Block; b < next; b++ {
			r, ok := md.e[b]
			if !ok || bi >= len(bs) || bs[bi] != b {
				bad = fmt.Sprintf("extent %+v maps unwritten block %d", e, b)
				return
			}
			bi++
			if r.key != e.Key || r.zero != e.Zero || (!r.zero && r.off != e.Off+b-e.Block) || (r.zero && e.Off != 0) {
				bad = fmt.Sprintf("extent %+v disagrees at block %d with model %+v", e, b, r)
				return
			}
		}
	})
	if bad != "" {
		t.Fatal(bad)
	}
	if next != from+n {
		t.Fatalf("Lookup(%d, %d) stopped at %d", from, n, next)
	}
}

// checkScan walks the device like threshold GC, in steps of random size,
// and verifies the extents reproduce exactly the model's entries.
func checkScan(t *testing.T, m *Map, md *model, bs []int64, from, n int64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(n), 7))
	i := 0
	last := from - 1
	for b := from; b < from+n; {
		step := 1 + rng.Int64N(3*pageLen)
		var prev *Extent
		var prevSeq uint64
		m.Scan(b, step, func(e Extent, seq uint64) bool {
			if e.Block <= last || e.N <= 0 || e.Block < b || e.Block+e.N > b+step {
				t.Fatalf("Scan(%d, %d): extent %+v out of order or range (last %d)", b, step, e, last)
			}
			if prev != nil && prev.Block+prev.N == e.Block && prev.Key == e.Key && prevSeq == seq && prev.Zero == e.Zero && (e.Zero || prev.Off+prev.N == e.Off) {
				t.Fatalf("Scan: extents %+v and %+v (seq %d) should have been coalesced", *prev, e, seq)
			}
			for k := e.Block; k < e.Block+e.N; k++ {
				if i >= len(bs) || bs[i] != k {
					t.Fatalf("Scan: extent %+v reports block %d, model's next written block is index %d", e, k, i)
				}
				r := md.e[k]
				if r.key != e.Key || r.zero != e.Zero || r.seq != seq || (!r.zero && r.off != e.Off+k-e.Block) {
					t.Fatalf("Scan: extent %+v seq %d disagrees at block %d with model %+v", e, seq, k, r)
				}
				i++
			}
			last = e.Block + e.N - 1
			p := e
			prev, prevSeq = &p, seq
			return true
		})
		b += step
	}
	if i != len(bs) {
		t.Fatalf("Scan reported %d blocks, model has %d", i, len(bs))
	}
}

func checkObjects(t *testing.T, m *Map, md *model) {
	t.Helper()
	live := md.live()
	keys := make([]int64, 0, len(md.total))
	for k := range md.total {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var got []int64
	m.Objects(func(key, l, total int64) bool {
		got = append(got, key)
		if l != live[key] || total != md.total[key] {
			t.Fatalf("Objects: key %d live %d total %d, want %d %d", key, l, total, live[key], md.total[key])
		}
		return true
	})
	if !slices.Equal(got, keys) {
		t.Fatalf("Objects keys = %v, want %v", got, keys)
	}
	if m.TrackedObjects() != int64(len(keys)) {
		t.Fatalf("TrackedObjects = %d, want %d", m.TrackedObjects(), len(keys))
	}
	for _, k := range keys {
		l, total, ok := m.Live(k)
		if !ok || l != live[k] || total != md.total[k] {
			t.Fatalf("Live(%d) = %d, %d, %v; want %d, %d, true", k, l, total, ok, live[k], md.total[k])
		}
	}
	for k, l := range live {
		if _, ok := md.total[k]; !ok || md.liveCount[k] != l {
			t.Fatalf("model bug: key %d live %d, counted %d, tracked %v", k, l, md.liveCount[k], ok)
		}
	}
	if len(keys) > 0 {
		below := keys[len(keys)/2] + 1
		var want []int64
		for _, k := range keys {
			if k < below && live[k] == 0 {
				want = append(want, k)
			}
		}
		if got := m.Dead(below); !slices.Equal(got, want) {
			t.Fatalf("Dead(%d) = %v, want %v", below, got, want)
		}
	}
}

// geometry is a device size as a volume of a given block size would have.
type geometry struct {
	name   string
	blocks int64
}

var geometries = []geometry{
	{"odd-small", 3*pageLen + 777},
	{"4GiB-512B", 4 << 30 / 512},
	{"4GiB-4KiB", 4 << 30 / 4096},
}

// randomOps applies ops random operations to m and md. Writes cluster in a
// few hot windows (so some pages turn dense) and scatter over the device.
func randomOps(t testing.TB, rng *rand.Rand, m *Map, md *model, ops int, nextKey *int64) {
	t.Helper()
	hot := []int64{rng.Int64N(md.blocks), rng.Int64N(md.blocks), 0, md.blocks - 1}
	for op := 0; op < ops; op++ {
		var block, n int64
		switch r := rng.IntN(32); {
		case r < 20: // near a hot spot, mostly single blocks, sometimes runs
			h := hot[rng.IntN(len(hot))]
			block = max(0, min(md.blocks-1, h+rng.Int64N(2*pageLen)-pageLen))
			n = 1
			if rng.IntN(3) == 0 {
				n = 1 + rng.Int64N(300)
			}
		case r < 31:
			block = rng.Int64N(md.blocks)
			n = 1 + rng.Int64N(8)
		default: // long runs crossing pages
			block = rng.Int64N(md.blocks)
			n = 1 + rng.Int64N(2*pageLen+100)
		}
		n = min(n, md.blocks-block)
		key := *nextKey
		switch rng.IntN(8) {
		case 0: // an older chunk's upload completing late
			key = max(0, key-1-rng.Int64N(5))
		default:
			*nextKey++
		}
		// Seqnos from a small range: older, equal and newer all happen.
		seq := uint64(rng.IntN(64))
		var got, want int64
		var err error
		if rng.IntN(6) == 0 {
			got, err = m.UpdateZero(block, n, key, seq)
			want = md.update(block, n, key, 0, true, seq)
		} else {
			off := rng.Int64N(MaxOff + 2 - n)
			got, err = m.Update(block, n, key, off, seq)
			want = md.update(block, n, key, off, false, seq)
		}
		if err != nil {
			t.Fatalf("op %d: %v", op, err)
		}
		if got != want {
			t.Fatalf("op %d: [%d,+%d) key %d seq %d applied %d, model %d", op, block, n, key, seq, got, want)
		}
		switch rng.IntN(10) {
		case 0:
			total := rng.Int64N(1000)
			if err := m.AddObject(key, total); err != nil {
				t.Fatal(err)
			}
			md.total[key] = total
		case 1:
			live := md.liveCount
			for k := range md.total {
				if live[k] == 0 {
					if err := m.Forget(k); err != nil {
						t.Fatalf("Forget dead key %d: %v", k, err)
					}
					delete(md.total, k)
					md.forgot++
				} else if err := m.Forget(k); err == nil {
					t.Fatalf("Forget(%d) with %d live blocks succeeded", k, live[k])
				}
				break
			}
		}
	}
}

func TestRandomAgainstModel(t *testing.T) {
	for _, g := range geometries {
		t.Run(g.name, func(t *testing.T) {
			seeds := 8
			if testing.Short() || raceEnabled {
				seeds = 2
			}
			var sawDense, sawSparse, sawRuns bool
			for seed := 0; seed < seeds; seed++ {
				rng := rand.New(rand.NewPCG(uint64(seed), uint64(g.blocks)))
				m, err := New(g.blocks)
				if err != nil {
					t.Fatal(err)
				}
				md := newModel(g.blocks)
				var nextKey int64
				for round := 0; round < 4; round++ {
					randomOps(t, rng, m, md, 400, &nextKey)
					if round == 1 {
						scatterPage(t, rng, m, md, &nextKey)
					}
					check(t, m, md)
					sawDense = sawDense || m.dense > 0
					sawSparse = sawSparse || m.pages > m.dense+m.runPages
					sawRuns = sawRuns || m.runPages > 0
					bs := md.sortedBlocks()
					for i := 0; i < 20; i++ {
						b := rng.Int64N(g.blocks)
						checkLookup(t, m, md, bs, b, 1+rng.Int64N(min(g.blocks-b, 2*pageLen)))
						if got, want := m.Seq(b), md.e[b].seq; got != want {
							t.Fatalf("Seq(%d) = %d, want %d", b, got, want)
						}
					}
				}
				// The serialized map must decode to the same observables.
				m2 := reload(t, m)
				check(t, m2, md)
				// And keep working after decoding.
				randomOps(t, rng, m2, md, 200, &nextKey)
				check(t, m2, md)
			}
			if !sawDense || !sawSparse || !sawRuns {
				t.Fatalf("test did not exercise all page forms (dense %v, sparse %v, runs %v)", sawDense, sawSparse, sawRuns)
			}
		})
	}
}

// scatterPage writes every block of a random page, one block at a time in
// random order at random offsets and mostly newer seqnos: the page ends
// dense whatever form it had, and later long runs over it may turn it back
// to runs.
func scatterPage(t testing.TB, rng *rand.Rand, m *Map, md *model, nextKey *int64) {
	t.Helper()
	first := rng.Int64N((md.blocks+pageLen-1)/pageLen) * pageLen
	for _, i := range rng.Perm(int(min(pageLen, md.blocks-first))) {
		b := first + int64(i)
		key, off, seq := *nextKey, rng.Int64N(MaxOff+1), uint64(60+rng.IntN(8))
		*nextKey++
		got, err := m.Update(b, 1, key, off, seq)
		if err != nil {
			t.Fatal(err)
		}
		if want := md.update(b, 1, key, off, false, seq); got != want {
			t.Fatalf("scatter block %d: applied %d, model %d", b, got, want)
		}
	}
}

// checkInternals verifies the map's running counters against its pages.
func checkInternals(t *testing.T, m *Map) {
	t.Helper()
	var pages, dense, sparseCap, written, runPages, runCap int64
	for _, c := range m.dir {
		if c == nil {
			continue
		}
		for _, p := range c {
			if p == nil {
				continue
			}
			pages++
			n := 0
			if p.rn != nil && (p.d != nil || p.sp != nil) {
				t.Fatal("page in two forms")
			}
			if p.rn != nil {
				runPages++
				rs := p.rn.r
				runCap += int64(cap(rs))
				for i, r := range rs {
					if r.n < 1 || r.end() > pageLen {
						t.Fatalf("run %d %+v out of the page", i, r)
					}
					if i > 0 && rs[i-1].end() > int(r.idx) {
						t.Fatalf("runs %d and %d overlap or are not sorted: %+v %+v", i-1, i, rs[i-1], r)
					}
					if i > 0 && continues(rs[i-1], r) {
						t.Fatalf("runs %d and %d not merged: %+v %+v", i-1, i, rs[i-1], r)
					}
					if !r.zero() && r.off()+int64(r.n)-1 > MaxOff {
						t.Fatalf("run %d %+v past MaxOff", i, r)
					}
					n += int(r.n)
				}
			} else if p.d != nil {
				dense++
				for _, e := range p.d {
					if e.loc != 0 {
						n++
					}
				}
			} else {
				sparseCap += int64(cap(p.sp))
				n = len(p.sp)
				for i := 1; i < len(p.sp); i++ {
					if p.sp[i-1].idx >= p.sp[i].idx {
						t.Fatalf("sparse page not sorted at %d", i)
					}
				}
			}
			if n != int(p.n) || n == 0 {
				t.Fatalf("page holds %d entries, counts %d", n, p.n)
			}
			written += int64(n)
		}
	}
	if pages != m.pages || dense != m.dense || sparseCap != m.sparseCap || written != m.written ||
		runPages != m.runPages || runCap != m.runCap {
		t.Fatalf("counters pages %d dense %d sparseCap %d written %d runPages %d runCap %d; pages hold %d %d %d %d %d %d",
			m.pages, m.dense, m.sparseCap, m.written, m.runPages, m.runCap, pages, dense, sparseCap, written, runPages, runCap)
	}
}

// TestRunsAgainstModel drives the runs form through its life against the
// model: sequential 1 MiB items (one run each), overwrites and trims in the
// middle of runs, late uploads of older seqnos, GC copies with the original
// seqno, random writes that turn pages sparse and dense, sequential writes
// that turn them back to runs, and checkpoint round trips.
func TestRunsAgainstModel(t *testing.T) {
	const pages = 8
	const blocks = pages*pageLen + 300
	m := mustNew(t, blocks)
	md := newModel(blocks)
	rng := rand.New(rand.NewPCG(11, 12))
	var seq uint64
	var key int64
	apply := func(block, n, k, off int64, zero bool, s uint64) {
		t.Helper()
		n = min(n, blocks-block)
		var got int64
		var err error
		if zero {
			got, err = m.UpdateZero(block, n, k, s)
		} else {
			got, err = m.Update(block, n, k, off, s)
		}
		if err != nil {
			t.Fatal(err)
		}
		if want := md.update(block, n, k, off, zero, s); got != want {
			t.Fatalf("[%d,+%d) key %d seq %d: applied %d, model %d", block, n, k, s, got, want)
		}
	}
	sequential := func(from, to int64) {
		for b := from; b < to; b += 256 {
			seq++
			apply(b, 256, key, int64(seq%4)*256, false, seq)
			if seq%4 == 3 {
				key++
			}
		}
		key++
	}
	roundTrip := func() {
		t.Helper()
		check(t, m, md)
		check(t, reload(t, m), md)
	}

	sequential(0, blocks)
	check(t, m, md)
	if m.runPages != m.pages {
		t.Fatalf("sequential map: %d of %d pages in runs form", m.runPages, m.pages)
	}
	if p := m.page(1); len(p.rn.r) != pageLen/256 {
		t.Fatalf("page of 1 MiB items holds %d runs, want %d", len(p.rn.r), pageLen/256)
	}
	roundTrip()

	// Overwrites and trims inside runs, an older upload arriving late, a
	// GC copy of a run with its original seqno into a new object.
	for i := 0; i < 40; i++ {
		b := rng.Int64N(blocks - 600)
		switch i % 4 {
		case 0:
			seq++
			apply(b, 1+rng.Int64N(20), key, rng.Int64N(1000), false, seq)
			key++
		case 1:
			seq++
			apply(b, 1+rng.Int64N(600), key, 0, true, seq)
			key++
		case 2:
			apply(b, 1+rng.Int64N(600), key, rng.Int64N(1000), false, seq-uint64(rng.IntN(int(seq))))
			key++
		case 3:
			// Copy the extents Scan reports, as threshold GC does.
			var es []Extent
			var seqs []uint64
			m.Scan(b, 300, func(e Extent, s uint64) bool {
				es, seqs = append(es, e), append(seqs, s)
				return true
			})
			for j, e := range es {
				if e.N > MaxOff+1 {
					continue
				}
				apply(e.Block, e.N, key, 0, e.Zero, seqs[j])
				key++
			}
		}
	}
	roundTrip()

	// Random single blocks on two pages: they leave the runs form.
	for _, pi := range []int64{2, 5} {
		for i := 0; i < 3000; i++ {
			seq++
			apply(pi*pageLen+rng.Int64N(pageLen), 1, key, rng.Int64N(MaxOff+1), false, seq)
			key++
		}
		if p := m.page(pi); p.rn != nil {
			t.Fatalf("page %d still in runs form after random writes (%d runs)", pi, len(p.rn.r))
		}
	}
	roundTrip()

	// Sequential writes over them again: runs once more.
	sequential(2*pageLen, 3*pageLen)
	sequential(5*pageLen, 6*pageLen)
	for _, pi := range []int64{2, 5} {
		if p := m.page(pi); p.rn == nil || len(p.rn.r) != pageLen/256 {
			t.Fatalf("page %d not back in runs form after a sequential overwrite", pi)
		}
	}
	roundTrip()
}

// FuzzUpdatesAgainstModel applies updates decoded from the input to a
// small map and the model: 7 bytes an update (block, length, key, offset,
// seqno, kind), lengths long enough to make runs and cross pages, seqnos
// from a small range so that older, equal and newer writes meet. The map
// must agree with the model, before and after a checkpoint round trip.
func FuzzUpdatesAgainstModel(f *testing.F) {
	const blocks = 3*pageLen + 50
	f.Add([]byte{0, 0, 1, 0, 0, 1, 0, 0, 8, 2, 0, 0, 2, 1})
	f.Add([]byte{10, 3, 40, 1, 5, 9, 0, 200, 10, 255, 2, 7, 3, 2, 11, 0, 12, 3, 0, 3, 3})
	f.Fuzz(func(t *testing.T, ops []byte) {
		m := mustNew(t, blocks)
		md := newModel(blocks)
		for len(ops) >= 7 {
			op := ops[:7]
			ops = ops[7:]
			block := (int64(op[0])<<8 | int64(op[1])) * blocks >> 16
			var n int64
			switch op[6] % 4 {
			case 0:
				n = 1
			case 1:
				n = 1 + int64(op[2])
			default:
				n = 1 + int64(op[2])*int64(op[2]) // up to 65,026: crosses pages
			}
			n = min(n, blocks-block, MaxOff+1)
			key := int64(op[3] % 16)
			off := int64(op[4]) * 256 % (MaxOff + 2 - n)
			seq := uint64(op[5] % 8)
			var got, want int64
			var err error
			if op[6]%8 >= 6 {
				got, err = m.UpdateZero(block, n, key, seq)
				want = md.update(block, n, key, 0, true, seq)
			} else {
				got, err = m.Update(block, n, key, off, seq)
				want = md.update(block, n, key, off, false, seq)
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Fatalf("[%d,+%d) key %d seq %d: applied %d, model %d", block, n, key, seq, got, want)
			}
		}
		check(t, m, md)
		check(t, reload(t, m), md)
	})
}
