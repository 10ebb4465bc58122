package bench

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/compressed"
	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/testutil/minio"
	"github.com/bs3/bs3/internal/testutil/textlike"
)

// BenchmarkCompressionCPU measures the CPU the bs3 process spends per GiB
// written, through the production stack (object proxy → compression →
// sealing → S3 store with the probed payload checksum) to MinIO on
// loopback: plain beside compression, encryption and both, on text-like
// 4 MiB objects, and zstd on random (incompressible) data as its worst
// case (docs/ARCHITECTURE.md §19.3). It also reports the bytes stored per
// byte written. It reports, never asserts. One variant:
// -bench 'CompressionCPU/zstd-sealed$'.
func BenchmarkCompressionCPU(b *testing.B) {
	const (
		objSize     = 4 * mib
		concurrency = 16
		names       = 64
	)
	srv := minio.Start(b)
	text := textlike.Bytes(7, 4*objSize)
	random := make([]byte, 4*objSize)
	r := rand.New(rand.NewPCG(7, 8))
	for i := range random {
		random[i] = byte(r.Uint32())
	}
	objects := scaled(1*gib) / objSize
	type variant struct {
		name, codec, level string
		seal               bool
		body               []byte
	}
	variants := []variant{
		{"plain", "none", "", false, text},
		{"zstd", "zstd", "fastest", false, text},
		{"zstd-default", "zstd", "default", false, text},
		{"lz4", "lz4", "fastest", false, text},
		{"s2", "s2", "fastest", false, text},
		{"sealed", "none", "", true, text},
		{"zstd-sealed", "zstd", "fastest", true, text},
		{"zstd-random", "zstd", "fastest", false, random},
	}
	type result struct {
		name           string
		mbps, cpu, pct float64
	}
	var results []result
	for _, v := range variants {
		b.Run(v.name, func(b *testing.B) {
			o := srv.Options(b, srv.Bucket(b))
			o.PayloadChecksum = s3.PayloadAuto
			o.MaxConns = concurrency
			raw := srv.StoreWith(b, o)
			ctx := context.Background()
			if _, err := raw.ProbePayloadChecksum(ctx, "probe"); err != nil {
				b.Fatal(err)
			}
			var st store.Store = raw
			var err error
			if v.seal {
				if st, err = sealed.New(raw, bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 16)); err != nil {
					b.Fatal(err)
				}
			}
			if st, err = compressed.Open(ctx, st, compressed.Options{Codec: v.codec, Level: v.level}); err != nil {
				b.Fatal(err)
			}
			p := objproxy.New(st, objproxy.Options{Uploaders: concurrency, Downloaders: 1, Logger: zerolog.Nop()})
			b.Cleanup(p.Close)
			put := func(i int64, prefix string) error {
				k := int(i % 4)
				return p.Put(ctx, objproxy.High, fmt.Sprintf("%s%d", prefix, i%names), v.body[k*objSize:(k+1)*objSize], false)
			}
			if _, err := parallel(concurrency, concurrency, func(_ int, i int64) error { return put(i, "warm/") }); err != nil {
				b.Fatal(err)
			}
			runtime.GC()
			cpu := startCPU()
			b.ResetTimer()
			d, err := parallel(concurrency, objects, func(_ int, i int64) error { return put(i, "obj/") })
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			c := cpu.perGiB(objects * objSize)
			var stored, n int64
			if err := raw.List(ctx, "obj/", func(_ string, size int64) error { stored += size; n++; return nil }); err != nil {
				b.Fatal(err)
			}
			res := result{v.name, mbps(objects*objSize, d), c[0] + c[1], 100 * float64(stored) / float64(n*objSize)}
			results = append(results, res)
			b.ReportMetric(res.mbps, "MB/s")
			b.ReportMetric(res.cpu, "CPU-s/GiB")
			b.ReportMetric(res.pct, "stored-%")
		})
	}
	if len(results) == 0 {
		return
	}
	base := results[0].cpu
	fmt.Println()
	fmt.Printf("write CPU with compression (MinIO on loopback, %d x %d MiB PUTs at concurrency %d through the object proxy, %d CPUs; CPU = bs3 process user+sys)\n",
		objects, objSize/mib, concurrency, runtime.NumCPU())
	fmt.Printf("%-14s %9s %10s %9s %9s\n", "variant", "MB/s", "CPU-s/GiB", "÷ plain", "stored %")
	for _, r := range results {
		fmt.Printf("%-14s %9.1f %10.3f %9s %9.1f\n", r.name, r.mbps, r.cpu, ratio(r.cpu, base), r.pct)
	}
}
