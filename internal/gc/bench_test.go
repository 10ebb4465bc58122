package gc

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// envInt64 reads a positive integer from the environment, or def.
func envInt64(tb testing.TB, name string, def int64) int64 {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v <= 0 {
		tb.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return v
}

// latencies collects read latencies from several goroutines.
type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

func (l *latencies) pct(p float64) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.d) == 0 {
		return 0
	}
	s := slices.Clone(l.d)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

func (l *latencies) n() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.d)
}

// readLoad runs readers goroutines doing random 4 KiB reads of blocks
// [0, ws) until stop is closed or each has done max reads (max 0: no
// limit), recording latencies.
func readLoad(b *testing.B, read func(p []byte, off int64) error, ws int64, readers, max int, stop <-chan struct{}) *latencies {
	lat := &latencies{}
	var wg sync.WaitGroup
	var failed atomic.Bool
	for r := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 77))
			p := make([]byte, 4096)
			for i := 0; max == 0 || i < max; i++ {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				if err := read(p, rng.Int64N(ws)*4096); err != nil {
					if failed.CompareAndSwap(false, true) {
						b.Errorf("read: %v", err)
					}
					return
				}
				lat.add(time.Since(start))
			}
		}()
	}
	wg.Wait()
	return lat
}

// BenchmarkThresholdGC measures threshold GC on a working set overwritten
// several times with random 4 KiB writes (4 MiB chunks, real MinIO): the
// stored/live ratio before and after at live_data 0.3 and 0.5, GC traffic
// per byte reclaimed, and user 4 KiB read latency with and without a run
// going. It runs only with BS3_GC_BENCH=1; BS3_GC_BENCH_WS_MIB (default 64)
// sets the working set and BS3_GC_BENCH_PASSES (default 4) how many times
// its size is written in total (the scale: 2048 and 4);
// BS3_GC_BENCH_GAP_KIB (default 256) and BS3_GC_BENCH_GETS (default 4)
// override how much dead data one GET may read through and how many GETs
// a run keeps in flight.
func BenchmarkThresholdGC(b *testing.B) {
	if os.Getenv("BS3_GC_BENCH") != "1" {
		b.Skip("set BS3_GC_BENCH=1 to run the threshold GC benchmark (needs MinIO, takes minutes)")
	}
	wsMiB := envInt64(b, "BS3_GC_BENCH_WS_MIB", 64)
	passes := envInt64(b, "BS3_GC_BENCH_PASSES", 4)
	srv := minio.Start(b)
	const (
		bs      = 4096
		readers = 4
	)
	ws := wsMiB * mib / bs
	var report []string

	// The store alone: 4 KiB ranged GETs straight to MinIO, as a yardstick.
	{
		st := srv.Store(b, srv.Bucket(b))
		obj := make([]byte, 4*mib)
		if err := st.Put(context.Background(), "probe", obj, false); err != nil {
			b.Fatalf("put probe: %v", err)
		}
		lat := readLoad(b, func(p []byte, off int64) error {
			_, err := st.GetRange(context.Background(), "probe", off%(4*mib), p)
			return err
		}, 1024, readers, 500, nil)
		report = append(report, fmt.Sprintf("raw MinIO 4 KiB GET (%d readers): p50 %v p99 %v", readers, lat.pct(0.5), lat.pct(0.99)))
	}

	for _, liveData := range []float64{0.3, 0.5} {
		b.Run(fmt.Sprintf("live_data=%.1f", liveData), func(b *testing.B) {
			ctx := context.Background()
			st := srv.Store(b, srv.Bucket(b))
			e := enginetest.Open(b, st, enginetest.Options{Size: 2 * ws * bs, BlockSize: bs, ChunkSize: 4 * mib})
			m := newModel(bs)
			// Fill, then random 4 KiB overwrites up to passes × ws.
			fill(b, e, m, ws)
			rng := rand.New(rand.NewPCG(1, 2))
			for i := int64(0); i < (passes-1)*ws; i++ {
				m.write(b, e.Dev, rng.Int64N(ws), 1)
			}
			drain(b, e)
			c := New(e.Volume, Options{LiveData: liveData, Logger: testLogger(b)})
			if g := envInt64(b, "BS3_GC_BENCH_GETS", 0); g > 0 {
				c.gets = int(g)
			}
			if g := os.Getenv("BS3_GC_BENCH_GAP_KIB"); g != "" {
				kb, err := strconv.ParseInt(g, 10, 64)
				if err != nil || kb < 0 {
					b.Fatalf("BS3_GC_BENCH_GAP_KIB=%q: want a number of KiB >= 0", g)
				}
				c.gap = kb * kib
			}
			if _, err := c.CollectDead(ctx); err != nil {
				b.Fatalf("dead GC: %v", err)
			}
			live := m.liveBytes()
			before := listData(b, st).bytes()
			read := func(p []byte, off int64) error { return e.Dev.ReadAt(ctx, p, off) }

			idle := readLoad(b, read, ws, readers, 500, nil)

			b.ResetTimer()
			stop := make(chan struct{})
			var busy *latencies
			done := make(chan struct{})
			go func() {
				busy = readLoad(b, read, ws, readers, 0, stop)
				close(done)
			}()
			start := time.Now()
			s, err := c.Threshold(ctx)
			took := time.Since(start)
			close(stop)
			<-done
			b.StopTimer()
			if err != nil {
				b.Fatalf("threshold GC: %v", err)
			}
			after := listData(b, st).bytes()
			reclaimed := before - after
			m.verify(b, e.Dev, ws)

			b.ReportMetric(float64(before)/float64(live), "stored/live-before")
			b.ReportMetric(float64(after)/float64(live), "stored/live-after")
			if reclaimed > 0 {
				b.ReportMetric(float64(s.BytesRead+s.BytesWritten)/float64(reclaimed), "gc-bytes/reclaimed-byte")
			}
			b.ReportMetric(float64(idle.pct(0.5).Microseconds()), "idle-read-p50-µs")
			b.ReportMetric(float64(idle.pct(0.99).Microseconds()), "idle-read-p99-µs")
			b.ReportMetric(float64(busy.pct(0.5).Microseconds()), "gc-read-p50-µs")
			b.ReportMetric(float64(busy.pct(0.99).Microseconds()), "gc-read-p99-µs")
			report = append(report,
				fmt.Sprintf("live_data %.1f: working set %d MiB, %d MiB written; live %d MiB", liveData, wsMiB, passes*wsMiB, live>>20),
				fmt.Sprintf("  stored/live before %.2f (%d MiB), after %.2f (%d MiB); reclaimed %d MiB",
					float64(before)/float64(live), before>>20, float64(after)/float64(live), after>>20, reclaimed>>20),
				fmt.Sprintf("  run %v (gap %d KiB, %d GETs in flight): examined %d, compacted %d, read %d MiB, wrote %d MiB, deleted %d, emptied %d; GC bytes per byte reclaimed %.3f",
					took.Round(time.Millisecond), c.gap/kib, c.gets, s.Examined, s.Compacted, s.BytesRead>>20, s.BytesWritten>>20, s.Reclaimed, s.Placeholders,
					float64(s.BytesRead+s.BytesWritten)/float64(max(reclaimed, 1))),
				fmt.Sprintf("  user 4 KiB reads (%d readers): idle p50 %v p99 %v (%d reads); during the run p50 %v p99 %v (%d reads)",
					readers, idle.pct(0.5), idle.pct(0.99), idle.n(), busy.pct(0.5), busy.pct(0.99), busy.n()))
		})
	}
	// Printed, not logged: the report is the point of the run.
	fmt.Printf("threshold GC report:\n%s\n", strings.Join(report, "\n"))
}
