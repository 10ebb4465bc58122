package chunker

import (
	"context"
	"testing"

	"github.com/bs3/bs3/internal/store/mem"
)

// Once every chunk is applied the overlay is empty: reads go straight to
// the engine again.
func TestOverlayEmptyAfterDrain(t *testing.T) {
	r := newRig(t, mem.New(), false)
	ctx := context.Background()
	for i := int64(0); i < 40; i++ {
		if err := r.c.WriteAt(ctx, block(uint64(i), 256*1024), (i*37%200)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.c.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	r.c.mu.Lock()
	n := r.c.overlay.len()
	var left []ovExt
	r.c.overlay.each(0, 1<<40, func(e ovExt) bool { left = append(left, e); return true })
	r.c.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d overlay extents left after a drain: %+v", n, left)
	}
}
