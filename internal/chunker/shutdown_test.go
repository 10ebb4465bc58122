package chunker

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunk"
)

// gatedEngine is an Engine whose commits wait while the gate is shut (an
// object store that does not answer), or until their context ends.
type gatedEngine struct {
	layout chunk.Layout
	size   int64
	next   atomic.Int64

	mu        sync.Mutex
	open      chan struct{} // closed: commits go through
	committed []int64
}

func newGatedEngine() *gatedEngine {
	e := &gatedEngine{layout: chunk.Layout{ChunkSize: 64 << 10, BlockSize: 4096}, size: 16 << 20, open: make(chan struct{})}
	close(e.open)
	return e
}

func (e *gatedEngine) shut() {
	e.mu.Lock()
	e.open = make(chan struct{})
	e.mu.Unlock()
}

func (e *gatedEngine) release() {
	e.mu.Lock()
	select {
	case <-e.open:
	default:
		close(e.open)
	}
	e.mu.Unlock()
}

func (e *gatedEngine) Size() int64          { return e.size }
func (e *gatedEngine) BlockSize() int64     { return e.layout.BlockSize }
func (e *gatedEngine) Layout() chunk.Layout { return e.layout }
func (e *gatedEngine) NextKey() int64       { return e.next.Add(1) - 1 }

func (e *gatedEngine) Commit(ctx context.Context, key int64, buf []byte, items int) error {
	e.mu.Lock()
	gate := e.open
	e.mu.Unlock()
	select {
	case <-gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	e.mu.Lock()
	e.committed = append(e.committed, key)
	e.mu.Unlock()
	return nil
}

func (e *gatedEngine) Read(ctx context.Context, block, n int64, buf []byte) error {
	clear(buf)
	return nil
}

func (e *gatedEngine) Mapped(ctx context.Context, block, n int64, fn func(block, n int64)) error {
	return nil
}

func newGatedChunker(e *gatedEngine, durable bool) *Chunker {
	return New(e, Options{Durable: durable, Buffers: 4, CollisionArea: 1 << 20, MaxAge: time.Hour, Logger: zerolog.Nop()})
}

// shutdownWithin runs c.Shutdown(ctx) and fails the test if it does not
// return within limit.
func shutdownWithin(t *testing.T, c *Chunker, ctx context.Context, limit time.Duration) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- c.Shutdown(ctx) }()
	select {
	case err := <-done:
		return err
	case <-time.After(limit):
		t.Fatalf("Shutdown did not return within %v", limit)
		return nil
	}
}

// With the store not answering, Shutdown gives up when its context ends
// and names every acknowledged write it could not store (durable =
// false: those writes are lost).
func TestShutdownGivesUpAndReportsAcknowledgedWrites(t *testing.T) {
	e := newGatedEngine()
	c := newGatedChunker(e, false)
	e.shut()
	defer e.release()
	ctx := context.Background()
	// Three requests: 8 KiB, 16 KiB, and 96 KiB, which spans two chunks
	// of 64 KiB; a flush in between closes the first chunk (key 0).
	if err := c.WriteAt(ctx, make([]byte, 8192), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, make([]byte, 16384), 1<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, make([]byte, 96<<10), 2<<20, false); err != nil {
		t.Fatal(err)
	}

	sctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := shutdownWithin(t, c, sctx, 10*time.Second)
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Shutdown took %v with a 200 ms context", took)
	}
	var ns *NotStoredError
	if !errors.As(err, &ns) {
		t.Fatalf("Shutdown = %v, want a *NotStoredError", err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown error %v does not wrap the context's error", err)
	}
	u := ns.Unstored
	const bytes = 8192 + 16384 + 96<<10
	if u.Chunks != 3 || u.FirstKey != 0 || u.LastKey != 2 {
		t.Errorf("chunks %d keys %d..%d, want 3 chunks, keys 0..2", u.Chunks, u.FirstKey, u.LastKey)
	}
	if u.Writes != 3 || u.Acked != 3 || u.Bytes != bytes || u.AckedBytes != bytes {
		t.Errorf("writes %d (acked %d), bytes %d (acked %d); want 3 writes and %d bytes, all acknowledged", u.Writes, u.Acked, u.Bytes, u.AckedBytes, bytes)
	}
	if u.FirstByte != 0 || u.EndByte != 2<<20+96<<10 {
		t.Errorf("byte range %d..%d, want 0..%d", u.FirstByte, u.EndByte, 2<<20+96<<10)
	}
	want := "3 acknowledged writes (122880 bytes) were not stored"
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
	// Once the store answers again, a second Shutdown finds it all done.
	e.release()
	if err := shutdownWithin(t, c, ctx, 10*time.Second); err != nil {
		t.Fatalf("second Shutdown after the store came back: %v", err)
	}
}

// With durable = true, a write covered by a completed flush is never in
// the report, and the report says so; writes after the flush (one of them
// a FUA write still waiting, so never acknowledged) are listed as
// unflushed.
func TestShutdownDurableReportsUnflushedWrites(t *testing.T) {
	e := newGatedEngine()
	c := newGatedChunker(e, true)
	ctx := context.Background()
	if err := c.WriteAt(ctx, make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	e.shut()
	defer e.release()
	if err := c.WriteAt(ctx, make([]byte, 8192), 4096, false); err != nil {
		t.Fatal(err)
	}
	fua := make(chan error, 1)
	go func() { fua <- c.WriteAt(ctx, make([]byte, 4096), 1<<20, true) }()
	// Wait until the FUA write is in a chunk (its chunk gets a key).
	deadline := time.Now().Add(5 * time.Second)
	for c.Unstored().Writes < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the FUA write never reached a chunk")
		}
		time.Sleep(5 * time.Millisecond)
	}

	sctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	err := shutdownWithin(t, c, sctx, 10*time.Second)
	var ns *NotStoredError
	if !errors.As(err, &ns) {
		t.Fatalf("Shutdown = %v, want a *NotStoredError", err)
	}
	u := ns.Unstored
	if u.Writes != 2 || u.Acked != 1 || u.Bytes != 12288 || u.Flushed != 0 {
		t.Errorf("writes %d, acked %d, bytes %d, flushed %d; want 2, 1, 12288, 0", u.Writes, u.Acked, u.Bytes, u.Flushed)
	}
	want := "no flushed write is lost; 2 unflushed writes (12288 bytes) were not stored"
	if got := u.Summary(); got != want {
		t.Errorf("summary %q, want %q", got, want)
	}
	select {
	case err := <-fua:
		t.Fatalf("the FUA write returned (%v) although its chunk is not stored", err)
	default:
	}
	e.release()
	if err := <-fua; err != nil {
		t.Fatalf("FUA write after the store came back: %v", err)
	}
}

// The report checks the durable promise instead of assuming it: a chunk
// that a completed flush waited for but that is not committed shows up as
// flushed writes lost.
func TestUnstoredCountsFlushedChunks(t *testing.T) {
	e := newGatedEngine()
	c := newGatedChunker(e, true)
	defer c.Close()
	ctx := context.Background()
	e.shut()
	defer e.release()
	if err := c.WriteAt(ctx, make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.closeLocked()
	c.durableThrough = 0 // as if a flush had returned for key 0
	c.mu.Unlock()
	u := c.Unstored()
	if u.Flushed != 1 || u.FlushedBytes != 4096 {
		t.Fatalf("flushed %d (%d bytes), want 1 (4096 bytes)", u.Flushed, u.FlushedBytes)
	}
	if !strings.Contains(u.Summary(), "covered by a completed flush are lost") {
		t.Fatalf("summary %q hides the lost flushed write", u.Summary())
	}
}

// Without a deadline Shutdown keeps the old Close semantics: it waits
// until everything is committed, and writes after it are refused.
func TestShutdownCommitsEverything(t *testing.T) {
	e := newGatedEngine()
	c := newGatedChunker(e, false)
	ctx := context.Background()
	e.shut()
	for i := int64(0); i < 3; i++ {
		if err := c.WriteAt(ctx, make([]byte, 48<<10), i<<20, false); err != nil {
			t.Fatal(err)
		}
	}
	time.AfterFunc(100*time.Millisecond, e.release)
	if err := shutdownWithin(t, c, ctx, 10*time.Second); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	e.mu.Lock()
	n := len(e.committed)
	e.mu.Unlock()
	if n != 3 {
		t.Fatalf("%d chunks committed, want 3", n)
	}
	if err := c.WriteAt(ctx, make([]byte, 4096), 0, false); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after Shutdown: %v, want ErrClosed", err)
	}
}
