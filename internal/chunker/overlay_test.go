package chunker

import (
	"math/rand/v2"
	"testing"
)

// The overlay against a per-block model: random writes (data and zeros)
// to a few chunks, and drops of whole chunks; after every step each block
// maps to its newest write, extents are ordered and disjoint, and lookups
// of any range see exactly the blocks inside it.
func TestOverlayModel(t *testing.T) {
	const bs, blocks = 512, 300
	type ref struct {
		p   *pending
		off int64
	}
	for seed := uint64(0); seed < 20; seed++ {
		rng := rand.New(rand.NewPCG(seed, 9))
		o := newOverlay(bs)
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
