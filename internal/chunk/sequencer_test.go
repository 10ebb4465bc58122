package chunk_test

import (
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/bs3/bs3/internal/chunk"
)

type piece struct {
	off, length int64
	seq         uint64
}

func split(s *chunk.Sequencer, off, length int64) []piece {
	var ps []piece
	s.Split(off, length, func(o, l int64, seq uint64) { ps = append(ps, piece{o, l, seq}) })
	return ps
}

func TestSequencerSplitsAtAreas(t *testing.T) {
	const mi = 1 << 20
	s := chunk.NewSequencer(10*mi+mi/2, mi) // 11 areas, the last half wide

	got := split(s, mi/2, 2*mi)
	want := []piece{{mi / 2, mi / 2, 1}, {mi, mi, 1}, {2 * mi, mi / 2, 1}}
	if !slices.Equal(got, want) {
		t.Fatalf("split: %v, want %v", got, want)
	}
	// Area 1 has seen one write; area 5 none.
	if got := split(s, mi+4096, 4096); !slices.Equal(got, []piece{{mi + 4096, 4096, 2}}) {
		t.Fatalf("second write to area 1: %v", got)
	}
	if got := split(s, 5*mi, 4096); !slices.Equal(got, []piece{{5 * mi, 4096, 1}}) {
		t.Fatalf("first write to area 5: %v", got)
	}
	// Exactly one area, and the short last one.
	if got := split(s, 2*mi, mi); !slices.Equal(got, []piece{{2 * mi, mi, 2}}) {
		t.Fatalf("whole area 2: %v", got)
	}
	if got := split(s, 10*mi, mi/2); !slices.Equal(got, []piece{{10 * mi, mi / 2, 1}}) {
		t.Fatalf("last area: %v", got)
	}
	if got := split(s, 3*mi, 0); len(got) != 0 {
		t.Fatalf("empty range: %v", got)
	}

	whole := chunk.NewSequencer(8*mi, 0)
	if got := split(whole, 0, 8*mi); !slices.Equal(got, []piece{{0, 8 * mi, 1}}) {
		t.Fatalf("area 0 means one area: %v", got)
	}
}

func TestSequencerOutOfRangePanics(t *testing.T) {
	s := chunk.NewSequencer(1<<20, 4096)
	defer func() {
		if recover() == nil {
			t.Fatal("no panic for a range past the device")
		}
	}()
	s.Split(1<<20-4096, 8192, func(int64, int64, uint64) {})
}

// TestSequencerConcurrent checks that the counters are shared by all
// callers: each area hands out 1..n exactly once, n being the number of
// pieces that fell into it.
func TestSequencerConcurrent(t *testing.T) {
	const dev, area = 1 << 20, 64 << 10
	s := chunk.NewSequencer(dev, area)
	var mu sync.Mutex
	seen := make(map[int64][]uint64) // area -> seqnos handed out
	want := make(map[int64]int)      // area -> pieces, computed from the ranges
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range 500 {
				off := r.Int64N(dev/512) * 512
				length := min(r.Int64N(200<<10)+512, dev-off) / 512 * 512
				var local []piece
				s.Split(off, length, func(o, l int64, seq uint64) { local = append(local, piece{o, l, seq}) })
				mu.Lock()
				for a := off / area; a <= (off+length-1)/area; a++ {
					want[a]++
				}
				for _, p := range local {
					if p.off/area != (p.off+p.length-1)/area {
						t.Errorf("piece %+v crosses an area boundary", p)
					}
					seen[p.off/area] = append(seen[p.off/area], p.seq)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for a, n := range want {
		got := seen[a]
		slices.Sort(got)
		for i, seq := range got {
			if seq != uint64(i+1) {
				t.Fatalf("area %d: seqnos %v..., want 1..%d each once", a, got[:min(len(got), 10)], n)
			}
		}
		if len(got) != n {
			t.Fatalf("area %d: %d pieces, want %d", a, len(got), n)
		}
	}
}
