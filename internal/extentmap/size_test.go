package extentmap

import (
	"math/rand/v2"
	"runtime"
	"testing"
)

// The map's size targets (docs/ARCHITECTURE.md §8), measured on the map
// alone as the volume applies chunks: 4 KiB blocks, 4 MiB chunks (1024
// blocks per object), one item per request, one seqno per item.
const (
	sizeBlock      = 4096
	sizeChunk      = 4 << 20 / sizeBlock // blocks per object
	sizeReq        = 1 << 20 / sizeBlock // blocks per 1 MiB request
	tib            = 1 << 40 / sizeBlock // blocks in 1 TiB
	seqTargetPerTi = 64 << 20            // bytes of map per TiB written sequentially
)

// seqWriter applies sequential 1 MiB writes as the volume would: items of
// sizeReq blocks packed into objects of sizeChunk blocks.
type seqWriter struct {
	m     *Map
	items int64 // items applied so far; also the last seqno
}

// write applies n blocks (a multiple of sizeReq) from block on.
func (w *seqWriter) write(t testing.TB, block, n int64) {
	for b := block; b < block+n; b += sizeReq {
		key := w.items * sizeReq / sizeChunk
		off := w.items * sizeReq % sizeChunk
		w.items++
		if _, err := w.m.Update(b, sizeReq, key, off, uint64(w.items)); err != nil {
			t.Fatal(err)
		}
		if off+sizeReq == sizeChunk {
			if err := w.m.AddObject(key, sizeChunk); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// randomWrite applies n random 4 KiB writes to m, each its own item.
func randomWrite(t testing.TB, m *Map, n int64, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 1))
	for i := int64(0); i < n; i++ {
		if _, err := m.Update(rng.Int64N(m.Blocks()), 1, i/sizeChunk, i%sizeChunk, uint64(i+1)); err != nil {
			t.Fatal(err)
		}
	}
}

// mapSize reports the map's estimated heap bytes, the heap measured by the
// runtime (rough: other allocations count too) and the checkpoint body
// bytes, per written block.
type mapSize struct {
	heap, measured, ckpt float64
	// ckptAlloc is what MarshalBinary allocated, per written block.
	ckptAlloc float64
}

func measure(t testing.TB, build func() *Map) mapSize {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	m := build()
	runtime.GC()
	runtime.ReadMemStats(&after)
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	data, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&m1)
	w := float64(m.WrittenBlocks())
	s := mapSize{
		heap:      float64(m.HeapBytes()) / w,
		measured:  (float64(after.HeapAlloc) - float64(before.HeapAlloc)) / w,
		ckpt:      float64(len(data)) / w,
		ckptAlloc: float64(m1.TotalAlloc-m0.TotalAlloc) / w,
	}
	runtime.KeepAlive(m)
	return s
}

func (s mapSize) log(t testing.TB, what string) {
	t.Helper()
	t.Logf("%s: map %.3f B/block (runtime heap %.3f), checkpoint %.3f B/block (encoding allocates %.3f); per TiB: map %.1f MiB, checkpoint %.1f MiB",
		what, s.heap, s.measured, s.ckpt, s.ckptAlloc, s.heap*tib/(1<<20), s.ckpt*tib/(1<<20))
}

// bounded checks the sequential target on the map, the checkpoint, and
// what encoding the checkpoint allocates.
func (s mapSize) bounded(t testing.TB, what string) {
	t.Helper()
	if s.heap*tib > seqTargetPerTi || s.ckpt*tib > seqTargetPerTi || s.ckptAlloc*tib > seqTargetPerTi {
		t.Errorf("%s: per TiB map %.1f MiB, checkpoint %.1f MiB, encoding allocates %.1f MiB; want each <= %d MiB",
			what, s.heap*tib/(1<<20), s.ckpt*tib/(1<<20), s.ckptAlloc*tib/(1<<20), seqTargetPerTi>>20)
	}
}

// TestSequentialMapSize is the target of the runs form: at most 64 MiB of
// map, and of checkpoint, per TiB written sequentially in 1 MiB requests.
// It measures 8 GiB written whole, and 1 TiB extrapolated from a sparse
// run: 16 MiB (one page) written sequentially every 256 MiB of a 1 TiB
// device, which allocates the whole directory, so per block it is an upper
// bound for the device written whole.
func TestSequentialMapSize(t *testing.T) {
	const gib8 = 8 << 30 / sizeBlock
	s := measure(t, func() *Map {
		w := seqWriter{m: mustNew(t, gib8)}
		w.write(t, 0, gib8)
		return w.m
	})
	s.log(t, "8 GiB sequential, 1 MiB requests")
	s.bounded(t, "8 GiB sequential")
	const stride = 256 << 20 / sizeBlock
	s = measure(t, func() *Map {
		w := seqWriter{m: mustNew(t, tib)}
		for b := int64(0); b < tib; b += stride {
			w.write(t, b, pageLen)
		}
		return w.m
	})
	s.log(t, "1 TiB extrapolated from 16 MiB every 256 MiB")
	s.bounded(t, "1 TiB sequential (extrapolated)")
}

// TestSequentialMapSize1TiB writes 1 TiB sequentially, for real: a million
// updates, too slow under the race detector.
func TestSequentialMapSize1TiB(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("short or race: TestSequentialMapSize extrapolates instead")
	}
	s := measure(t, func() *Map {
		w := seqWriter{m: mustNew(t, tib)}
		w.write(t, 0, tib)
		return w.m
	})
	s.log(t, "1 TiB sequential, 1 MiB requests")
	s.bounded(t, "1 TiB sequential")
}

// TestRandomMapSize checks that random 4 KiB writes still cost about 16
// bytes of map per block: at 1/16 density (sparse pages) and with an 8 GiB
// device written over once (random writes with repeats: ~63% of the blocks,
// mostly sparse pages near the dense threshold).
func TestRandomMapSize(t *testing.T) {
	const gib8 = 8 << 30 / sizeBlock
	for _, c := range []struct {
		name   string
		writes int64
	}{{"1/16 density", gib8 / 16}, {"8 GiB written once", gib8}} {
		if (testing.Short() || raceEnabled) && c.writes > gib8/16 {
			continue
		}
		s := measure(t, func() *Map {
			m := mustNew(t, gib8)
			randomWrite(t, m, c.writes, 5)
			return m
		})
		s.log(t, "random 4 KiB, "+c.name)
		// 16 bytes an entry plus the sparse form's slack (at most 1/8);
		// before the runs form: 17.71 and 18.46.
		if s.heap > 19 {
			t.Errorf("random %s: %.2f B/block, want <= 19", c.name, s.heap)
		}
	}
}
