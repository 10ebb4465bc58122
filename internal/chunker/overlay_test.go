package chunker

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// The overlay against a per-block model: random writes (data and zeros)
// to a few chunks, and drops of whole chunks; after every step each block
// maps to its newest write, extents are ordered and disjoint, and lookups
// of any range see exactly the blocks inside it.
//
// It runs with the index's default leaves and with leaves of eight
// extents, which split and merge at almost every step.
func TestOverlayModel(t *testing.T) {
	for _, leafMax := range []int{ovLeafMax, 8} {
		t.Run(fmt.Sprintf("leaves-%d", leafMax), func(t *testing.T) { testOverlayModel(t, leafMax) })
	}
}

func testOverlayModel(t *testing.T, leafMax int) {
	const bs, blocks = 512, 300
	type ref struct {
		p   *pending
		off int64
	}
	for seed := uint64(0); seed < 20; seed++ {
		rng := rand.New(rand.NewPCG(seed, 9))
		o := newOverlayLeaves(bs, leafMax)
		model := make([]ref, blocks)
		ps := make([]*pending, 4)
		ends := make([]int64, len(ps)) // next data offset per chunk
		for i := range ps {
			ps[i] = &pending{}
		}
		for step := 0; step < 400; step++ {
			i := rng.IntN(len(ps))
			p := ps[i]
			if rng.IntN(8) == 0 {
				o.drop(p)
				for b := range model {
					if model[b].p == p {
						model[b] = ref{}
					}
				}
				ps[i] = &pending{}
				ends[i] = 0
			} else {
				n := 1 + rng.Int64N(12)
				start := rng.Int64N(blocks - n + 1)
				if rng.IntN(3) == 0 && step > 0 {
					// Continue a run, as sequential writes do.
					start = min(start, blocks-n)
				}
				off := int64(-1)
				if rng.IntN(5) != 0 {
					off = ends[i]
					ends[i] += n * bs
				}
				o.set(start, n, p, off)
				if k := len(p.runs); k > 0 && p.runs[k-1][0]+p.runs[k-1][1] == start {
					p.runs[k-1][1] += n
				} else {
					p.runs = append(p.runs, [2]int64{start, n})
				}
				for b := start; b < start+n; b++ {
					o := int64(-1)
					if off >= 0 {
						o = off + (b-start)*bs
					}
					model[b] = ref{p, o}
				}
			}
			checkIndex(t, o.t)
			// Whole range: ordered, disjoint, equal to the model.
			got := make([]ref, blocks)
			prevEnd := int64(-1)
			o.each(0, blocks, func(e ovExt) bool {
				if e.n <= 0 || e.start < prevEnd || e.p == nil {
					t.Fatalf("seed %d step %d: bad extent %+v after end %d", seed, step, e, prevEnd)
				}
				prevEnd = e.end()
				for b := e.start; b < e.end(); b++ {
					got[b] = ref{e.p, -1}
					if e.off >= 0 {
						got[b].off = e.off + (b-e.start)*bs
					}
				}
				return true
			})
			for b := range model {
				if got[b] != model[b] {
					t.Fatalf("seed %d step %d: block %d is %+v, want %+v", seed, step, b, got[b], model[b])
				}
			}
			// A random window sees only extents that overlap it.
			lo := rng.Int64N(blocks)
			hi := lo + 1 + rng.Int64N(blocks-lo)
			covered := int64(0)
			o.each(lo, hi, func(e ovExt) bool {
				if e.end() <= lo || e.start >= hi {
					t.Fatalf("seed %d step %d: extent %+v outside [%d,%d)", seed, step, e, lo, hi)
				}
				covered += min(e.end(), hi) - max(e.start, lo)
				return true
			})
			want := int64(0)
			for b := lo; b < hi; b++ {
				if model[b].p != nil {
					want++
				}
			}
			if covered != want {
				t.Fatalf("seed %d step %d: [%d,%d) covers %d blocks, want %d", seed, step, lo, hi, covered, want)
			}
		}
	}
}

// checkIndex fails unless x's structure is consistent: no empty or
// overfull leaf, keys equal to the extents' starts and strictly
// increasing across leaves, each leaf's first key in firsts, and the
// count right.
func checkIndex(t *testing.T, x *ovIndex) {
	t.Helper()
	if len(x.firsts) != len(x.leaves) {
		t.Fatalf("%d firsts for %d leaves", len(x.firsts), len(x.leaves))
	}
	n, prev := 0, int64(-1)
	for li, l := range x.leaves {
		if len(l.e) == 0 || len(l.e) > x.leafMax || len(l.keys) != len(l.e) {
			t.Fatalf("leaf %d: %d extents, %d keys (at most %d)", li, len(l.e), len(l.keys), x.leafMax)
		}
		if x.firsts[li] != l.e[0].start {
			t.Fatalf("leaf %d: first key %d, extent starts at %d", li, x.firsts[li], l.e[0].start)
		}
		for i, e := range l.e {
			if l.keys[i] != e.start || e.start <= prev {
				t.Fatalf("leaf %d entry %d: key %d, start %d after %d", li, i, l.keys[i], e.start, prev)
			}
			prev = e.start
		}
		n += len(l.e)
	}
	if n != x.len() {
		t.Fatalf("%d extents in leaves, len says %d", n, x.len())
	}
}

// The index alone against a sorted set: random inserts and deletes of
// keys with small leaves (splits, merges and emptied leaves at every
// turn), its structure checked after every step and seek and floor
// checked against the model.
func TestOVIndexModel(t *testing.T) {
	for _, leafMax := range []int{4, 8, ovLeafMax} {
		rng := rand.New(rand.NewPCG(uint64(leafMax), 3))
		x := newOVIndex(leafMax)
		model := map[int64]bool{}
		const keys = 600
		for step := 0; step < 20000; step++ {
			k := rng.Int64N(keys)
			// Grow for a while, then shrink, then mix: leaves fill and empty.
			insert := rng.IntN(10) < []int{8, 2, 5}[step/4000%3]
			p, found := x.find(k)
			if found != model[k] {
				t.Fatalf("leaves %d step %d: find(%d) = %v, model %v", leafMax, step, k, found, model[k])
			}
			switch {
			case insert && !found:
				x.insertAt(x.seek(k), ovExt{start: k, n: 1})
				model[k] = true
			case !insert && found:
				x.deleteAt(p)
				delete(model, k)
			}
			checkIndex(t, x)
			if x.len() != len(model) {
				t.Fatalf("leaves %d step %d: len %d, model %d", leafMax, step, x.len(), len(model))
			}
			// seek: the smallest key >= q; floor: the largest <= q.
			q := rng.Int64N(keys+2) - 1
			want, wantFloor := int64(-1), int64(-1)
			for k := range model {
				if k >= q && (want < 0 || k < want) {
					want = k
				}
				if k <= q && k > wantFloor {
					wantFloor = k
				}
			}
			got := int64(-1)
			if s := x.seek(q); x.valid(s) {
				got = x.at(s).start
			}
			// floor as overlay.each finds it: the entry seek lands on if
			// it starts at q, else the one before.
			gotFloor := int64(-1)
			if s := x.seek(q); x.valid(s) && x.at(s).start == q {
				gotFloor = q
			} else if f, ok := x.prev(s); ok {
				gotFloor = x.at(f).start
			}
			if got != want || gotFloor != wantFloor {
				t.Fatalf("leaves %d step %d: seek(%d) = %d, floor %d; want %d, %d", leafMax, step, q, got, gotFloor, want, wantFloor)
			}
		}
		if leafMax < ovLeafMax && len(x.leaves) < 2 {
			t.Fatalf("leaves %d: the index never had two leaves", leafMax)
		}
	}
}
