package chunker

import (
	"context"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
)

// gatedStore holds every data-object Put until gate is closed.
type gatedStore struct {
	store.Store
	gate chan struct{}
}

func (g *gatedStore) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	if _, ok := store.ParseDataName(name); ok {
		select {
		case <-g.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return g.Store.Put(ctx, name, body, ifAbsent)
}

// TestBuffers: an open chunk and a chunk held by a slow upload use a
// buffer each; once everything is committed none is in use.
func TestBuffers(t *testing.T) {
	release := make(chan struct{})
	g := &gatedStore{Store: mem.New(), gate: make(chan struct{})}
	close(g.gate) // the attach writes its claim window
	r := newRig(t, g, false)
	if in, total := r.c.Buffers(); in != 0 || total != 8 {
		t.Fatalf("idle: %d of %d buffers in use, want 0 of 8", in, total)
	}
	g.gate = release
	ctx := context.Background()
	if err := r.c.WriteAt(ctx, block(1, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.c.Flush(ctx); err != nil { // closes it: its upload now waits
		t.Fatal(err)
	}
	if err := r.c.WriteAt(ctx, block(2, 4096), 4096, false); err != nil {
		t.Fatal(err)
	}
	if in, _ := r.c.Buffers(); in != 2 {
		t.Errorf("one chunk uploading and one open: %d buffers in use, want 2", in)
	}
	close(release)
	if err := r.c.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for in, _ := r.c.Buffers(); in != 0; in, _ = r.c.Buffers() {
		if time.Now().After(deadline) {
			t.Fatalf("after Drain %d buffers still in use", in)
		}
		time.Sleep(time.Millisecond)
	}
}
