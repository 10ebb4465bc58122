package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/testutil/minio"
	"github.com/bs3/bs3/internal/volume"
)

func recoveryOptions(st store.Store, size int64) engine.Options {
	return engine.Options{
		Store: st,
		Proxy: objproxy.Options{Uploaders: 16, Downloaders: 32},
		Volume: volume.Options{
			Size: size, BlockSize: 4096, ChunkSize: 4 * mib, ConditionalWrites: true,
			CheckpointInterval: time.Hour, CheckpointObjects: 1 << 40, MaxInflight: 32,
			MapIdleTimeout: 200 * time.Millisecond,
		},
		Logger: zerolog.Nop(),
	}
}

// commitRandom commits n objects of perChunk random 4 KiB writes each,
// 16 at a time.
func commitRandom(b *testing.B, v *volume.Volume, n int, perChunk int64) {
	l := v.Layout()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	data := make([]byte, 4096)
	for c := 0; c < n; c++ {
		buf := make([]byte, l.BufferSize())
		bl := chunk.NewBuilder(l, buf)
		for i := int64(0); i < perChunk; i++ {
			blk := rand.Int64N(v.Size() / 4096)
			bl.Add(chunk.Item{Sector: uint64(blk * 8), Length: 8, Seqno: uint64(c)*uint64(perChunk) + uint64(i) + 1, Flag: chunk.OpWrite}, data)
		}
		key := v.NextKey()
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := v.Commit(context.Background(), key, buf, int(perChunk)); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
}

// BenchmarkRecovery reports the attach time after a crash with 1, 1,000
// and 10,000 objects after the newest checkpoint, and the checkpoint size
// and write time for 1 GiB of random 4 KiB writes.
func BenchmarkRecovery(b *testing.B) {
	ctx := context.Background()
	srv := minio.Start(b)
	fmt.Println()
	for _, n := range []int{1, 1000, 10000} {
		st := srv.Store(b, srv.Bucket(b))
		o := recoveryOptions(st, 8*gib)
		e, err := engine.Open(ctx, o)
		if err != nil {
			b.Fatal(err)
		}
		v := e.Volume
		commitRandom(b, v, 100, 1)
		if err := v.Checkpoint(ctx); err != nil {
			b.Fatal(err)
		}
		commitRandom(b, v, n, 1)
		e.Proxy.Close() // crash: no final checkpoint

		start := time.Now()
		e2, err := engine.Open(ctx, o)
		if err != nil {
			b.Fatal(err)
		}
		took := time.Since(start)
		s := e2.Proxy.Stats()
		fmt.Printf("recovery with %5d objects after the checkpoint: %8v  (GETs %d, HEADs %d)\n", n, took.Round(time.Millisecond), s.Get.Attempts, s.Size.Attempts)
		b.ReportMetric(took.Seconds(), fmt.Sprintf("s/recovery-%d", n))
		if err := e2.Close(ctx); err != nil {
			b.Error(err)
		}
	}

	// Checkpoint size for 1 GiB of random 4 KiB writes over an 8 GiB device.
	st := srv.Store(b, srv.Bucket(b))
	e, err := engine.Open(ctx, recoveryOptions(st, 8*gib))
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close(ctx)
	v := e.Volume
	total := scaled(1 * gib)
	const perChunk = 1024
	commitRandom(b, v, int(total/4096/perChunk), perChunk)
	start := time.Now()
	if err := v.Checkpoint(ctx); err != nil {
		b.Fatal(err)
	}
	took := time.Since(start)
	var size int64
	if err := st.List(ctx, store.CheckpointPrefix, func(_ string, sz int64) error { size = max(size, sz); return nil }); err != nil {
		b.Fatal(err)
	}
	blocks := total / 4096
	fmt.Printf("checkpoint for %d MiB of random 4 KiB writes: %d bytes (%.2f bytes per written block), written in %v\n",
		total/mib, size, float64(size)/float64(blocks), took.Round(time.Millisecond))
	b.ReportMetric(float64(size)/float64(blocks), "ckpt-bytes/block")
}
