package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/testutil/minio"
	"github.com/bs3/bs3/internal/volume"
)

// BenchmarkDefrag measures what defragmentation buys a fragmented region:
// a region written sequentially (256 MiB), then overwritten with random
// 4 KiB writes (64 MiB worth), is read sequentially in 1 MiB reads by 8
// readers before and after gc.Collector.Defrag of the region, beside raw
// MinIO 1 MiB ranged GETs at the same concurrency in the same run. No read
// cache. BS3_BENCH_SCALE scales the region and the overwrites.
//
//	go test -run '^$' -bench Defrag -benchtime 1x ./internal/bench/
func BenchmarkDefrag(b *testing.B) {
	ctx := context.Background()
	srv := minio.Start(b)
	const readers = 8
	region := scaled(256 * mib)
	randBytes := region / 4

	// Raw MinIO: 1 MiB ranged GETs of 4 MiB objects.
	raw := srv.Store(b, srv.Bucket(b))
	body := make([]byte, 4*mib)
	for i := range body {
		body[i] = byte(i * 7)
	}
	rawObjects := region / (4 * mib)
	if _, err := parallel(uploaders, rawObjects, func(_ int, i int64) error {
		return raw.Put(ctx, fmt.Sprintf("raw/%d", i), body, false)
	}); err != nil {
		b.Fatal(err)
	}
	rawGet := func() float64 {
		n := rawObjects * 4
		d, err := parallel(readers, n, func(_ int, i int64) error {
			buf := make([]byte, mib)
			_, err := raw.GetRange(ctx, fmt.Sprintf("raw/%d", i/4), (i%4)*mib, buf)
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		return mbps(n*mib, d)
	}

	// bs3: a 1 GiB device, 4 MiB chunks, on its own bucket.
	st := srv.Store(b, srv.Bucket(b))
	const devSize = 1 * gib
	e, err := engine.Open(ctx, engine.Options{
		Store: st,
		Proxy: objproxy.Options{Uploaders: uploaders, Downloaders: downloaders},
		Volume: volume.Options{
			Size: devSize, BlockSize: 4096, ChunkSize: 4 * mib, ConditionalWrites: true,
			CheckpointInterval: time.Hour, CheckpointObjects: 1 << 30, MaxInflight: 64,
			MapIdleTimeout: 200 * time.Millisecond,
		},
		Chunker: &chunker.Options{Buffers: uploaders + 2, MaxInflight: uploaders + 2, CollisionArea: mib},
		Logger:  zerolog.Nop(),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close(ctx)
	v, dev := e.Volume, e.Chunker

	// Fill the region with 128 KiB writes, then overwrite random blocks.
	buf := make([]byte, 128*kib)
	for i := range buf {
		buf[i] = byte(i)
	}
	for off := int64(0); off < region; off += int64(len(buf)) {
		if err := dev.WriteAt(ctx, buf, off, false); err != nil {
			b.Fatal(err)
		}
	}
	blocks := region / (4 * kib)
	if _, err := parallel(8, randBytes/(4*kib), func(_ int, _ int64) error {
		return dev.WriteAt(ctx, buf[:4*kib], rand.Int64N(blocks)*4*kib, false)
	}); err != nil {
		b.Fatal(err)
	}
	// A write past the region, so that the newest object, which GC leaves
	// alone, holds none of it.
	if err := dev.WriteAt(ctx, buf[:4*kib], region, false); err != nil {
		b.Fatal(err)
	}
	if err := drain(ctx, dev); err != nil {
		b.Fatal(err)
	}

	seqRead := func() float64 {
		n := region / mib
		d, err := parallel(readers, n, func(_ int, i int64) error {
			buf := make([]byte, mib)
			return dev.ReadAt(ctx, buf, i*mib)
		})
		if err != nil {
			b.Fatal(err)
		}
		return mbps(n*mib, d)
	}
	layout := func() (runs, objects int) {
		seen := make(map[int64]bool)
		err := v.MapDo(ctx, mapproxy.Low, func(m *extentmap.Map) {
			m.Lookup(0, blocks, func(e extentmap.Extent) {
				if e.Key >= 0 && !e.Zero {
					runs++
					seen[e.Key] = true
				}
			})
		})
		if err != nil {
			b.Fatal(err)
		}
		return runs, len(seen)
	}

	rawBefore := rawGet()
	runsBefore, objsBefore := layout()
	before := seqRead()

	c := gc.New(v, gc.Options{Logger: zerolog.Nop()})
	defer c.Stop()
	b.ResetTimer()
	s, err := c.Defrag(ctx, gc.Range{Length: region})
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	runsAfter, objsAfter := layout()
	after := seqRead()
	rawAfter := rawGet()
	rawMBps := (rawBefore + rawAfter) / 2

	fmt.Println()
	fmt.Printf("bs3 defragmentation bench (MinIO on loopback, scale %.2f): %d MiB region written sequentially, %d MiB of random 4 KiB overwrites\n",
		scale(), region/mib, randBytes/mib)
	fmt.Printf("raw MinIO 1 MiB ranged GET, %d readers: %.1f MB/s before, %.1f MB/s after (mean %.1f)\n", readers, rawBefore, rawAfter, rawMBps)
	fmt.Println(result{name: fmt.Sprintf("seq read 1 MiB, %d readers, fragmented", readers), mbps: before, rawMBps: rawMBps})
	fmt.Println(result{name: fmt.Sprintf("seq read 1 MiB, %d readers, defragmented", readers), mbps: after, rawMBps: rawMBps})
	fmt.Printf("region layout: %d runs in %d objects before, %d runs in %d objects after\n", runsBefore, objsBefore, runsAfter, objsAfter)
	fmt.Printf("defragmentation: %v, read %d MiB, wrote %d MiB, %d objects compacted, %d deleted, %d emptied (%.1f MB/s of region)\n",
		s.Duration.Round(time.Millisecond), s.BytesRead/mib, s.BytesWritten/mib, s.Compacted, s.Reclaimed, s.Placeholders, mbps(region, s.Duration))
	b.ReportMetric(before/rawMBps, "ratio:fragmented")
	b.ReportMetric(after/rawMBps, "ratio:defragmented")
	b.ReportMetric(float64(runsBefore), "runs-before")
	b.ReportMetric(float64(runsAfter), "runs-after")
}
