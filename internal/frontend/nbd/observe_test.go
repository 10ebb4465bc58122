package nbd

import (
	"context"
	"slices"
	"sync"
	"testing"
)

// observeDevice is a memDevice that observes reads (frontend.ReadObserver):
// it records the offsets in the order ObserveRead saw them, and counts the
// reads whose context does not carry their own observation.
type observeDevice struct {
	*memDevice

	mu       sync.Mutex
	observed []int64
	unmarked int
}

type observedOff struct{}

func (d *observeDevice) ObserveRead(ctx context.Context, off, length int64) context.Context {
	d.mu.Lock()
	d.observed = append(d.observed, off)
	d.mu.Unlock()
	return context.WithValue(ctx, observedOff{}, off)
}

func (d *observeDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	if o, ok := ctx.Value(observedOff{}).(int64); !ok || o != off {
		d.mu.Lock()
		d.unmarked++
		d.mu.Unlock()
	}
	return d.memDevice.ReadAt(ctx, p, off)
}

// Reads are observed in the order they arrive, before they are served
// concurrently, and each is served with the context its observation
// returned: a device that detects streams sees the client's order, not
// the order the serving goroutines happen to run in.
func TestReadsObservedInArrivalOrder(t *testing.T) {
	const bs, reads, size = 4096, 64, 64 << 10
	dev := &observeDevice{memDevice: newMemDevice(reads*size, bs)}
	srv := startServer(t, dev, Options{})
	c := connect(t, srv.Addr(), "bs3")
	var sent []int64
	for i := range reads {
		off := int64(i) * size
		c.send(0, 0, uint64(i), uint64(off), size, nil)
		sent = append(sent, off)
	}
	for range reads {
		if errno, _ := c.recvReply(); errno != 0 {
			t.Fatalf("read failed: errno %d", errno)
		}
		c.readN(size)
	}
	c.disconnect()
	dev.mu.Lock()
	defer dev.mu.Unlock()
	if !slices.Equal(dev.observed, sent) {
		t.Errorf("reads observed at offsets %v, want the order they were sent in %v", dev.observed, sent)
	}
	if dev.unmarked != 0 {
		t.Errorf("%d reads were served without the context of their observation", dev.unmarked)
	}
}
