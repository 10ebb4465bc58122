package crashtest

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/testutil/minio"
)

// TestMinIOOutage kills MinIO for 10 s under a durable writer: a stream of
// sequential stamped writes with a flush after every fourth. It asserts:
//
//   - no write or flush returns an error (the object proxy retries
//     through the outage instead of failing the device);
//   - no flush reports success while MinIO is down: every completed flush
//     that covers a write issued after the kill completed after the
//     restart began (a probe write and flush issued right after the kill
//     make sure there is at least one);
//   - the stream resumes: ten more flushes complete after the restart;
//   - the proxy counted retried uploads and no upload gave up;
//   - the engine closes cleanly, and a new engine attached afterwards reads
//     every block back as the last write to it.
func TestMinIOOutage(t *testing.T) {
	srv := minio.Start(t)
	st := srv.Store(t, srv.Bucket(t))
	ctx := context.Background()
	const size = 32 << 20
	devBlocks := int64(size / blockSize)
	probeBlock := devBlocks - 16 // the stream stays below it
	var logs logBuffer
	e, err := openEngine(ctx, st, engineOpts{size: size, durable: true, log: zerolog.New(&logs).Level(zerolog.InfoLevel)})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			e.close() //nolint:errcheck // the test failed already
		}
	}()

	rec := newRecorder()
	want := make(map[int64]uint64) // block → last write; guarded by wantMu
	var wantMu sync.Mutex
	write := func(id uint64, block, n int64) error {
		o := rec.issue(0, opWrite, id, block, n)
		wantMu.Lock()
		for b := block; b < block+n; b++ {
			want[b] = id
		}
		wantMu.Unlock()
		if err := e.dev.WriteAt(ctx, stamped(id, block, n), block*blockSize, false); err != nil {
			return err
		}
		rec.acked(o)
		return nil
	}
	flush := func() error {
		f := rec.flushStart(0)
		if err := e.dev.Flush(ctx); err != nil {
			return err
		}
		rec.flushDone(f)
		return nil
	}

	var flushed atomic.Int64
	stop := make(chan struct{})
	streamErr := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(1, 2))
		next := int64(0)
		for id := uint64(1); ; id++ {
			select {
			case <-stop:
				streamErr <- nil
				return
			default:
			}
			n := 1 + rng.Int64N(32)
			if next+n > probeBlock {
				next = 0
			}
			if err := write(id, next, n); err != nil {
				streamErr <- err
				return
			}
			next += n
			if id%4 == 0 {
				if err := flush(); err != nil {
					streamErr <- err
					return
				}
				flushed.Add(1)
			}
		}
	}()
	waitFlushes := func(n int64, what string) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Minute)
		for flushed.Load() < n {
			select {
			case err := <-streamErr:
				t.Fatalf("%s: the stream stopped: %v", what, err)
			case <-time.After(20 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: only %d of %d flushes completed within two minutes", what, flushed.Load(), n)
			}
		}
	}
	waitFlushes(10, "before the outage")

	srv.Kill()
	killed := rec.mark()
	probeErr := make(chan error, 1)
	go func() {
		if err := write(1<<62, probeBlock, 16); err != nil {
			probeErr <- err
			return
		}
		probeErr <- flush()
	}()
	time.Sleep(10 * time.Second) // the outage; nothing below depends on its length
	restarting := rec.mark()
	srv.Restart(t)
	waitFlushes(flushed.Load()+10, "after the restart")
	close(stop)
	if err := <-streamErr; err != nil {
		t.Fatalf("stream: %v", err)
	}
	if err := <-probeErr; err != nil {
		t.Fatalf("probe write and flush after the kill: %v", err)
	}
	stats := e.objs.Stats()
	closed = true
	if err := e.close(); err != nil {
		t.Fatalf("clean close after the outage: %v", err)
	}

	h := rec.history()
	stalled := 0
	for _, f := range h.flushes {
		covers := false
		for _, o := range h.ops {
			if o.issue > killed && o.ack < f.start {
				covers = true
				break
			}
		}
		if !covers || f.done == never {
			continue
		}
		if f.start < restarting {
			stalled++
		}
		if f.done < restarting {
			t.Errorf("a flush started at %d completed at %d, while MinIO was down (killed at %d, restarted at %d), though it covers writes issued after the kill", f.start, f.done, killed, restarting)
		}
	}
	if stalled == 0 {
		t.Errorf("no flush covering a write issued during the outage was started during it: the outage was not exercised")
	}
	if stats.Put.Retries == 0 {
		t.Errorf("object proxy stats %+v: no upload was retried during a 10 s outage", stats.Put)
	}
	if stats.Put.Failures != 0 {
		t.Errorf("object proxy stats %+v: an upload gave up", stats.Put)
	}
	t.Logf("outage: %d flushes started during it and completed after it; proxy put stats %+v, get %+v", stalled, stats.Put, stats.Get)

	e2, err := openEngine(ctx, st, engineOpts{size: size, durable: true, log: zerolog.Nop()})
	if err != nil {
		t.Fatalf("attach after the outage: %v", err)
	}
	defer func() {
		if err := e2.close(); err != nil {
			t.Errorf("close the second engine: %v", err)
		}
	}()
	expectExactly(t, e2, want)
}

// expectExactly reads the blocks of want through e and requires each to
// hold exactly the write want names (0: zeros).
func expectExactly(t *testing.T, e *engine, want map[int64]uint64) {
	t.Helper()
	blocks := make([]int64, 0, len(want))
	for b := range want {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	got, bad, err := readBlocks(context.Background(), e.dev, blocks)
	if err != nil {
		t.Fatalf("read back: %v", err)
	}
	wrong := 0
	for _, b := range blocks {
		if err := bad[b]; err != nil {
			t.Errorf("block %d: %v", b, err)
			continue
		}
		if got[b] != want[b] {
			if wrong < 10 {
				t.Errorf("block %d holds write %#x, want %#x", b, got[b], want[b])
			}
			wrong++
		}
	}
	if wrong > 0 {
		t.Errorf("%d of %d blocks do not hold their last acknowledged write", wrong, len(blocks))
	}
}
