package nbd

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/frontend"
)

// tryDevice is a memDevice that also takes small writes through
// TryWriteAt, as the chunker does (§20). decline decides, per call,
// whether it would have to wait (nil: never); took and declined count the
// calls.
type tryDevice struct {
	*memDevice
	decline        atomic.Pointer[func(off int64) bool]
	took, declined atomic.Int64
}

var _ frontend.TryWriter = (*tryDevice)(nil)

func newTryDevice(size, bs int64) *tryDevice { return &tryDevice{memDevice: newMemDevice(size, bs)} }

func (d *tryDevice) setDecline(f func(off int64) bool) { d.decline.Store(&f) }

// TryWriteAt never runs the hook: it must not block.
func (d *tryDevice) TryWriteAt(p []byte, off int64) (bool, error) {
	if f := d.decline.Load(); f != nil && (*f)(off) {
		d.declined.Add(1)
		return false, nil
	}
	if !d.valid(off, int64(len(p))) {
		return true, fmt.Errorf("write %d@%d: %w", len(p), off, frontend.ErrInvalid)
	}
	d.took.Add(1)
	d.writes.Add(1)
	d.mu.Lock()
	copy(d.data[off:], p)
	d.mu.Unlock()
	return true, nil
}

// Pipelined writes and reads on several connections, with about half of
// the small writes taken on the reader's goroutine and the rest (declined,
// or too large) by workers completing in shuffled order: every request
// gets exactly one reply with its handle, and every read sees the data.
// A reply of an inline write that were never flushed would hang pipeline
// until its deadline.
func TestInlineWritesPipelined(t *testing.T) {
	const (
		bs        = 4096
		conns     = 4
		perConn   = 100
		region    = 16 << 20
		maxBlocks = 40 // up to 160 KiB: some writes are over inlineWriteMax
	)
	dev := newTryDevice(conns*region, bs)
	var mu sync.Mutex
	rng := rand.New(rand.NewPCG(1, 2))
	dev.setDecline(func(int64) bool {
		mu.Lock()
		defer mu.Unlock()
		return rng.IntN(2) == 0
	})
	shuffleCompletions(dev.memDevice)
	srv := startServer(t, dev, Options{})
	pipelineConns(t, srv, conns, region, perConn, maxBlocks, bs)
	if dev.took.Load() == 0 || dev.declined.Load() == 0 {
		t.Fatalf("inline writes taken %d, declined %d: the test must exercise both paths", dev.took.Load(), dev.declined.Load())
	}
	if n := dev.invalid.Load(); n != 0 {
		t.Fatalf("%d invalid requests reached the device", n)
	}
}

// The reply of a write taken inline goes out before the reader waits for
// the next request, and while a read is held in the device: it is never
// held back until more requests arrive.
func TestInlineWriteReplyNotHeld(t *testing.T) {
	const bs = 4096
	dev := newTryDevice(8<<20, bs)
	entered, release := make(chan struct{}), make(chan struct{})
	dev.setHook(func(op string, _, _ int64) error {
		if op == "read" {
			close(entered)
			<-release
		}
		return nil
	})
	srv := startServer(t, dev, Options{})
	c := connect(t, srv.Addr(), "bs3")
	w := pattern(bs, 3)
	c.send(1, 0, 1, 0, bs, w) // alone: the reader then waits for the socket
	if e, h := c.recvReply(); e != 0 || h != 1 {
		t.Fatalf("reply: handle %d error %d, want 1 and 0", h, e)
	}
	c.send(0, 0, 2, 1<<20, bs, nil) // held in the device
	<-entered
	w2 := pattern(2*bs, 4)
	c.send(1, 0, 3, 2<<20, 2*bs, w2)
	if e, h := c.recvReply(); e != 0 || h != 3 {
		t.Fatalf("reply while the read is held: handle %d error %d, want 3 and 0", h, e)
	}
	close(release)
	if e, h := c.recvReply(); e != 0 || h != 2 {
		t.Fatalf("last reply: handle %d error %d, want 2 and 0", h, e)
	}
	c.readN(bs)
	if got := dev.took.Load(); got != 2 {
		t.Fatalf("%d writes taken inline, want 2", got)
	}
	if !bytes.Equal(dev.snapshot(0, bs), w) || !bytes.Equal(dev.snapshot(2<<20, 2*bs), w2) {
		t.Fatal("inline writes not on the device")
	}
	c.disconnect()
}

// A write of whole blocks that arrives while a read-modify-write of a
// partial block in the same blocks is running must not be taken inline
// past the partial write's lock: it lands after it, so the block ends
// with the whole-block write's bytes. Taken inline without the lock, the
// partial write would put back the block as it read it before, losing the
// acknowledged whole-block write.
func TestInlineWriteWaitsForPartialWrite(t *testing.T) {
	const bs = 4096
	for _, name := range []string{"inline-device", "worker-only"} {
		t.Run(name, func(t *testing.T) {
			dev := newTryDevice(8<<20, bs)
			if name == "worker-only" {
				dev.setDecline(func(int64) bool { return true })
			}
			entered, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			dev.setHook(func(op string, off, _ int64) error {
				if op == "read" && off == 1<<20 {
					once.Do(func() {
						close(entered)
						<-release
					})
				}
				return nil
			})
			srv := startServer(t, dev, Options{})
			c := connect(t, srv.Addr(), "bs3")
			// Bytes 100..199 of the block at 1 MiB: read-modify-write,
			// held after its read.
			c.send(1, 0, 1, 1<<20+100, 100, pattern(100, 5))
			<-entered
			whole := pattern(bs, 6)
			c.send(1, 0, 2, 1<<20, bs, whole)
			// Give the reader time to take the second write (it must
			// wait for the stripe, whichever path it takes).
			time.Sleep(50 * time.Millisecond)
			if got := dev.took.Load(); got != 0 {
				t.Fatalf("%d writes taken inline while a partial write held their blocks", got)
			}
			close(release)
			seen := map[uint64]bool{}
			for range 2 {
				e, h := c.recvReply()
				if e != 0 {
					t.Fatalf("reply %d: error %d", h, e)
				}
				seen[h] = true
			}
			if !seen[1] || !seen[2] {
				t.Fatalf("replies %v, want 1 and 2", seen)
			}
			if got := dev.snapshot(1<<20, bs); !bytes.Equal(got, whole) {
				t.Fatal("the whole-block write was lost under the partial write")
			}
			c.disconnect()
		})
	}
}

// The protocol abuse suite passes unchanged over a device that takes
// small writes inline.
func TestProtocolAbuseInline(t *testing.T) {
	for _, bs := range []int64{512, 4096} {
		t.Run("bs"+strconv.FormatInt(bs, 10), func(t *testing.T) {
			dev := newTryDevice(16<<20, bs)
			srv := startServer(t, dev, Options{MaxRequest: 1 << 20})
			runProtocolAbuse(t, srv, dev.memDevice)
			if n := dev.invalid.Load(); n != 0 {
				t.Fatalf("%d invalid requests reached the device; the server must reject them", n)
			}
			if dev.took.Load() == 0 {
				t.Fatal("no write was taken inline")
			}
		})
	}
}
