package chunker

import (
	"context"
	"math/rand/v2"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/volume"
)

// sinkStore keeps everything but data objects, whose bodies it only
// counts: a write-path benchmark measures the engine, not a store that
// holds gigabytes in memory.
type sinkStore struct {
	*mem.Store
	objects, bytes atomic.Int64
}

func (s *sinkStore) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	if _, ok := store.ParseDataName(name); ok && len(body) > 0 {
		s.objects.Add(1)
		s.bytes.Add(int64(len(body)))
		return nil
	}
	return s.Store.Put(ctx, name, body, ifAbsent)
}

// BenchmarkWritePath measures the engine's CPU and allocations per write
// through the chunker (chunk building, overlay, commit, map apply), with
// a store that discards data, and the bytes stored per byte written:
// "flush" closes a chunk after every write, as fio --fsync=1 does.
func BenchmarkWritePath(b *testing.B) {
	for _, bc := range []struct {
		name    string
		size    int64
		bs      int64
		random  bool
		flush   bool
		compact bool
	}{
		{"4k-random", 4096, 4096, true, false, false},
		{"128k-seq", 128 << 10, 4096, false, false, false},
		{"1m-seq", 1 << 20, 4096, false, false, false},
		{"1m-seq-512", 1 << 20, 512, false, false, false},
		{"4k-flush", 4096, 4096, true, true, false},
		{"4k-flush-compact", 4096, 4096, true, true, true},
		{"16k-flush-512", 16 << 10, 512, true, true, false},
		{"16k-flush-512-compact", 16 << 10, 512, true, true, true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			st := &sinkStore{Store: mem.New()}
			objs := objproxy.New(st, objproxy.Options{Uploaders: 8, Downloaders: 8, Logger: zerolog.Nop()})
			defer objs.Close()
			const dev = 1 << 30
			vol, err := volume.Open(ctx, objs, volume.Options{
				Size: dev, BlockSize: bc.bs, ChunkSize: 4 << 20, ConditionalWrites: true,
				CheckpointInterval: time.Hour, CheckpointObjects: 1 << 30, MaxInflight: 32,
				MapIdleTimeout: 50 * time.Millisecond, CompactChunks: bc.compact, Logger: zerolog.Nop(),
			})
			if err != nil {
				b.Fatal(err)
			}
			defer vol.Close(ctx)
			c := New(vol, Options{Buffers: 16, MaxInflight: 32, CollisionArea: 1 << 20, MaxAge: time.Hour, Logger: zerolog.Nop()})
			defer c.Close()
			data := make([]byte, bc.size)
			for i := range data {
				data[i] = byte(i * 7)
			}
			rng := rand.New(rand.NewPCG(1, 2))
			slots := dev / bc.size
			b.SetBytes(bc.size)
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime(b)
			for i := 0; i < b.N; i++ {
				off := int64(i) % slots * bc.size
				if bc.random {
					off = rng.Int64N(slots) * bc.size
				}
				if err := c.WriteAt(ctx, data, off, false); err != nil {
					b.Fatal(err)
				}
				if bc.flush {
					if err := c.Flush(ctx); err != nil {
						b.Fatal(err)
					}
				}
			}
			if err := c.Drain(ctx); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
			written := float64(b.N) * float64(bc.size)
			b.ReportMetric(float64(st.bytes.Load())/written, "stored/written")
			b.ReportMetric(float64(st.bytes.Load())/float64(max(st.objects.Load(), 1)), "B/object")
		})
	}
}

// cpuTime is the CPU time (user and system) the process used so far: on a
// shared machine wall time per write says little about the engine's cost.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
