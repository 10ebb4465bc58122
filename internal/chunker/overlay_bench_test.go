package chunker

import (
	"math/rand/v2"
	"testing"
)

// BenchmarkOverlaySet: what noting one write costs with the overlay of a
// random 4 KiB write load (34 chunks of 1,024 blocks pending: ~35,000
// extents over a 4 GiB device), and of sequential 1 MiB writes.
func BenchmarkOverlaySet(b *testing.B) {
	const bs = 4096
	b.Run("random-4k", func(b *testing.B) {
		o := newOverlay(bs)
		rng := rand.New(rand.NewPCG(1, 2))
		ps := make([]*pending, 34) // a ring: the oldest chunk is dropped (committed) for a new one
		for i := range ps {
			ps[i] = &pending{}
		}
		const blocks = 1 << 20 // 4 GiB
		set := func(i int) {
			if i%1024 == 0 {
				k := i / 1024 % len(ps)
				o.drop(ps[k])
				ps[k] = &pending{}
			}
			p, start := ps[i/1024%len(ps)], rng.Int64N(blocks)
			o.set(start, 1, p, int64(i%1024)*bs)
			p.runs = append(p.runs, [2]int64{start, 1})
		}
		for i := range len(ps) * 1024 {
			set(i)
		}
		for i := len(ps) * 1024; b.Loop(); i++ {
			set(i)
		}
		b.ReportMetric(float64(o.len()), "extents")
	})
	b.Run("sequential-1m", func(b *testing.B) {
		o := newOverlay(bs)
		p := &pending{}
		for i := 0; b.Loop(); i++ {
			if i%4 == 0 {
				p = &pending{}
			}
			o.set(int64(i)*256%(1<<20), 256, p, int64(i%4)*256*bs)
		}
	})
}

// BenchmarkOverlayEach: a 1 MiB read's lookup in the random-write
// overlay above.
func BenchmarkOverlayEach(b *testing.B) {
	const bs = 4096
	o := newOverlay(bs)
	rng := rand.New(rand.NewPCG(1, 2))
	p := &pending{}
	const blocks = 1 << 20
	for i := range 34 * 1024 {
		o.set(rng.Int64N(blocks), 1, p, int64(i)*bs)
	}
	n := 0
	for b.Loop() {
		s := rng.Int64N(blocks - 256)
		o.each(s, s+256, func(ovExt) bool { n++; return true })
	}
}
