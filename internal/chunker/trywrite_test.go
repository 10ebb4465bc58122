package chunker

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/testutil"
)

// TryWriteAt takes writes while the open chunk or a free buffer can hold
// them, and once every buffer waits for the store it declines, changing
// nothing (no write counted, the block still reads as before), where
// WriteAt waits. Every write it took reads back. When the store answers
// again it takes writes again, also one that crosses a collision area
// (two items).
func TestTryWriteAt(t *testing.T) {
	e := newGatedEngine() // 64 KiB chunks of 4 KiB blocks
	c := newGatedChunker(e, false)
	defer c.Close()
	e.shut()
	defer e.release()
	ctx := context.Background()
	const w = 8192 // 8 writes per chunk, 4 buffers
	taken := 0
	for ; ; taken++ {
		ok, err := c.TryWriteAt(block(uint64(taken+1), w), int64(taken)*w)
		if err != nil {
			t.Fatalf("write %d: %v", taken, err)
		}
		if !ok {
			break
		}
		if taken > 100 {
			t.Fatal("TryWriteAt never declined with the store not answering")
		}
	}
	if taken != 4*8 {
		t.Fatalf("TryWriteAt took %d writes with 4 buffers of 8, want 32", taken)
	}
	before := c.Unstored()
	next := int64(taken) * w
	if ok, err := c.TryWriteAt(block(999, w), next); ok || err != nil {
		t.Fatalf("TryWriteAt with every buffer busy = %v, %v; want false, nil", ok, err)
	}
	if after := c.Unstored(); after != before {
		t.Fatalf("a declined write changed the chunker: %+v, was %+v", after, before)
	}
	got := make([]byte, w)
	if err := c.ReadAt(ctx, got, next); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, w)) {
		t.Fatal("a declined write is visible")
	}
	for i := range taken {
		if err := c.ReadAt(ctx, got, int64(i)*w); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, block(uint64(i+1), w)) {
			t.Fatalf("write %d taken by TryWriteAt does not read back", i)
		}
	}
	// WriteAt waits for a buffer where TryWriteAt declined.
	done := make(chan error, 1)
	go func() { done <- c.WriteAt(ctx, block(1000, w), next, false) }()
	select {
	case err := <-done:
		t.Fatalf("WriteAt returned (%v) with every buffer busy", err)
	case <-time.After(50 * time.Millisecond):
	}
	// Too large, or invalid: declined, or refused as WriteAt would.
	if ok, _ := c.TryWriteAt(make([]byte, MaxTryWrite+4096), 0); ok {
		t.Fatal("TryWriteAt took a write over MaxTryWrite")
	}
	if ok, err := c.TryWriteAt(make([]byte, 100), 0); !ok || !errors.Is(err, frontend.ErrInvalid) {
		t.Fatalf("misaligned TryWriteAt = %v, %v; want true and ErrInvalid", ok, err)
	}

	e.release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	cross := int64(1<<20 - 4096) // one block on each side of the 1 MiB area boundary
	testutil.WaitFor(t, "TryWriteAt to take a write again", func() bool {
		ok, err := c.TryWriteAt(block(2000, w), cross)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	})
	if err := c.ReadAt(ctx, got, cross); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, block(2000, w)) {
		t.Fatal("a write across a collision area does not read back")
	}
	if err := c.Drain(ctx); err != nil {
		t.Fatal(err)
	}
}
