package compressed

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
)

// counting counts the GETs and bytes read from the store it wraps.
type counting struct {
	store.Store
	gets, bytes atomic.Int64
}

func (c *counting) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	n, err := c.Store.GetRange(ctx, name, off, buf)
	c.gets.Add(1)
	c.bytes.Add(int64(n))
	return n, err
}

// cpuTime is the user + system CPU time of this process: on a loaded
// machine it tracks the work done much better than the wall clock.
func cpuTime(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkSegmentSize compares segment sizes and codecs on text-like
// data in 4 MiB objects (docs/ARCHITECTURE.md §19.3): stored ratio,
// compression CPU per GiB, and the bytes fetched and CPU time of a
// random 4 KiB read, a random 64 KiB read cache window, a random 256 KiB
// fetch span and a 1 MiB sequential read, with the index cached. Whole-chunk compression
// is the 4 MiB segment. It reports, never asserts:
//
//	go test -run '^$' -bench SegmentSize -benchtime 1x ./internal/store/compressed/
func BenchmarkSegmentSize(b *testing.B) {
	const (
		objSize = 4 << 20
		objects = 16
		reads   = 400
	)
	body := textLike(21, objSize*objects)
	for _, c := range []struct{ codec, level string }{{"zstd", "fastest"}, {"zstd", "default"}, {"s2", "default"}, {"lz4", "default"}} {
		for _, seg := range []int{16 << 10, 32 << 10, 64 << 10, 256 << 10, objSize} {
			b.Run(fmt.Sprintf("%s-%s/seg=%dKiB", c.codec, c.level, seg>>10), func(b *testing.B) {
				for range b.N {
					inner := &counting{Store: mem.New()}
					s := newStore(b, inner, Options{Codec: c.codec, Level: c.level, SegmentSize: seg})
					ctx := context.Background()
					start := cpuTime(b)
					for k := range objects {
						if err := s.Put(ctx, store.DataName(int64(k)), body[k*objSize:(k+1)*objSize], false); err != nil {
							b.Fatal(err)
						}
					}
					putSec := (cpuTime(b) - start).Seconds()
					stored := inner.Store.(*mem.Store).Bytes()
					// Warm the index cache: one read per object.
					one := make([]byte, 1)
					for k := range objects {
						if _, err := s.GetRange(ctx, store.DataName(int64(k)), 0, one); err != nil {
							b.Fatal(err)
						}
					}
					r := rand.New(rand.NewPCG(1, 2))
					// at: where read i of size bytes starts. Window reads
					// start 32 KiB in, where a full chunk's data area
					// begins (docs/ARCHITECTURE.md §3), so they are not
					// aligned to segments, as the read cache's are not.
					measure := func(size int, at func(i int) (int, int64)) (bytesPer, usPer float64) {
						buf := make([]byte, size)
						inner.bytes.Store(0)
						t0 := cpuTime(b)
						for i := range reads {
							k, off := at(i)
							if _, err := s.GetRange(ctx, store.DataName(int64(k)), off, buf); err != nil {
								b.Fatal(err)
							}
						}
						return float64(inner.bytes.Load()) / reads, float64((cpuTime(b) - t0).Microseconds()) / reads
					}
					random := func(size int, base int64) func(int) (int, int64) {
						return func(int) (int, int64) {
							return r.IntN(objects), base + int64(r.IntN((objSize-int(base))/size))*int64(size)
						}
					}
					f4, u4 := measure(4<<10, random(4<<10, 0))
					fw, uw := measure(64<<10, random(64<<10, 32<<10))
					fs, us := measure(256<<10, random(256<<10, 32<<10))
					fseq, useq := measure(1<<20, func(i int) (int, int64) { return (i / 4) % objects, int64(i%4) << 20 })
					b.ReportMetric(float64(stored)/float64(len(body))*100, "stored-%")
					b.ReportMetric(putSec/(float64(len(body))/(1<<30)), "compress-CPU-s/GiB")
					b.ReportMetric(f4, "fetched-B/4KiB-read")
					b.ReportMetric(u4, "CPU-µs/4KiB-read")
					b.ReportMetric(fw, "fetched-B/window-read")
					b.ReportMetric(uw, "CPU-µs/window-read")
					b.ReportMetric(fs, "fetched-B/span-read")
					b.ReportMetric(us, "CPU-µs/span-read")
					b.ReportMetric(fseq/(1<<20), "fetched-MiB/MiB-seq")
					b.ReportMetric(useq, "CPU-µs/MiB-seq")
				}
			})
		}
	}
}
