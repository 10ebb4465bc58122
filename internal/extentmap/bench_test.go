package extentmap

import (
	"math/rand/v2"
	"runtime"
	"testing"
)

const (
	benchDevice  = 8 << 30 / 4096   // 8 GiB device of 4 KiB blocks
	benchWritten = 512 << 20 / 4096 // 512 MiB written
	chunkBlocks  = 4 << 20 / 4096   // 4 MiB chunks: blocks per object
)

// fill writes benchWritten single-block writes, as 4 KiB writes packed into
// 4 MiB chunks would be applied: key = write / chunkBlocks, offset = write %
// chunkBlocks, seqnos increasing.
func fill(b *testing.B, random bool, seed uint64) *Map {
	m, err := New(benchDevice)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	for i := int64(0); i < benchWritten; i++ {
		block := i
		if random {
			block = rng.Int64N(benchDevice)
		}
		if _, err := m.Update(block, 1, i/chunkBlocks, i%chunkBlocks, uint64(i+1)); err != nil {
			b.Fatal(err)
		}
		if i%chunkBlocks == chunkBlocks-1 {
			if err := m.AddObject(i/chunkBlocks, chunkBlocks); err != nil {
				b.Fatal(err)
			}
		}
	}
	return m
}

// heapPerBlock measures the live heap a freshly built map holds, per
// written block, with the GC run before and after.
func heapPerBlock(b *testing.B, random bool) (measured, estimated float64) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	m := fill(b, random, 42)
	runtime.GC()
	runtime.ReadMemStats(&after)
	w := float64(m.WrittenBlocks())
	measured = (float64(after.HeapAlloc) - float64(before.HeapAlloc)) / w
	estimated = float64(m.HeapBytes()) / w
	runtime.KeepAlive(m)
	return measured, estimated
}

// BenchmarkRandomWrite4K applies 512 MiB of 4 KiB writes to an 8 GiB
// device (1/16 density when random) and reports the heap bytes per written
// block and the time per block update.
func BenchmarkRandomWrite4K(b *testing.B) {
	for _, c := range []struct {
		name   string
		random bool
	}{{"random", true}, {"sequential", false}} {
		b.Run(c.name, func(b *testing.B) {
			seed := uint64(0)
			for b.Loop() {
				seed++
				fill(b, c.random, seed)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchWritten, "ns/block")
			measured, estimated := heapPerBlock(b, c.random)
			b.ReportMetric(measured, "heapB/block")
			b.ReportMetric(estimated, "estB/block")
		})
	}
}

// BenchmarkLookup measures Lookup of random ranges on the maps of
// BenchmarkRandomWrite4K.
func BenchmarkLookup(b *testing.B) {
	maps := map[bool]*Map{true: fill(b, true, 7), false: fill(b, false, 7)}
	for _, c := range []struct {
		name   string
		random bool
		n      int64
	}{
		{"random-map/4KiB", true, 1},
		{"random-map/128KiB", true, 32},
		{"sequential-map/4KiB", false, 1},
		{"sequential-map/128KiB", false, 32},
		{"sequential-map/1MiB", false, 256},
	} {
		b.Run(c.name, func(b *testing.B) {
			m := maps[c.random]
			span := int64(benchDevice)
			if !c.random {
				span = benchWritten // read where the data is
			}
			rng := rand.New(rand.NewPCG(1, 2))
			extents := 0
			fn := func(Extent) { extents++ }
			for b.Loop() {
				m.Lookup(rng.Int64N(span-c.n), c.n, fn)
			}
			b.ReportMetric(float64(extents)/float64(b.N), "extents/op")
		})
	}
}

// BenchmarkSequentialWrite1MiB applies 512 MiB of sequential 1 MiB writes
// (one Update of 256 blocks each, 4 MiB chunks) to an 8 GiB device: the
// runs form makes it one entry per write, in time as in memory.
func BenchmarkSequentialWrite1MiB(b *testing.B) {
	build := func() *Map {
		w := seqWriter{m: mustNew(b, benchDevice)}
		w.write(b, 0, benchWritten)
		return w.m
	}
	for b.Loop() {
		build()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchWritten, "ns/block")
	s := measure(b, build)
	b.ReportMetric(s.heap, "estB/block")
	b.ReportMetric(s.measured, "heapB/block")
	b.ReportMetric(s.ckpt, "ckptB/block")
}
