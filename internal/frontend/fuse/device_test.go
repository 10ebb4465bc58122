package fuse

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/frontend"
)

// memStore is the content of a memDevice; it outlives a device so that a
// "restarted" device sees what the previous one wrote.
type memStore struct {
	mu   sync.Mutex
	data []byte
}

// memDevice is the reference Device for these tests: a byte slice behind a
// mutex that enforces the Device contract (whole blocks, inside the device)
// so that a frontend sending anything else fails the test, and counts the
// calls whose flags the tests check.
type memDevice struct {
	store *memStore
	bs    int64

	fuaWrites   atomic.Int64
	writes      atomic.Int64
	flushes     atomic.Int64
	discards    atomic.Int64 // Zero with discard
	writeZeroes atomic.Int64 // Zero without discard

	// slowReads makes every read take a little while, which widens the
	// window in which an unserialised read-modify-write loses a
	// concurrent write (a race trap, not a timing measurement).
	slowReads atomic.Bool
}

var _ frontend.Device = (*memDevice)(nil)

func newTestDevice(t *testing.T, size, blockSize int64) frontend.Device {
	t.Helper()
	if size <= 0 || blockSize <= 0 || size%blockSize != 0 {
		t.Fatalf("bad test device geometry: size %d, block size %d", size, blockSize)
	}
	return &memDevice{store: &memStore{data: make([]byte, size)}, bs: blockSize}
}

// reopen is a new device over the same content, as after a daemon restart.
func (d *memDevice) reopen() frontend.Device {
	return &memDevice{store: d.store, bs: d.bs}
}

func (d *memDevice) Size() int64      { return int64(len(d.store.data)) }
func (d *memDevice) BlockSize() int64 { return d.bs }

func (d *memDevice) check(off, length int64) error {
	if off < 0 || length < 0 || off%d.bs != 0 || length%d.bs != 0 || off+length > d.Size() {
		return frontend.ErrInvalid
	}
	return nil
}

func (d *memDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	if d.slowReads.Load() {
		time.Sleep(50 * time.Microsecond)
	}
	d.store.mu.Lock()
	defer d.store.mu.Unlock()
	copy(p, d.store.data[off:])
	return nil
}

func (d *memDevice) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	d.store.mu.Lock()
	defer d.store.mu.Unlock()
	copy(d.store.data[off:], p)
	d.writes.Add(1)
	if fua {
		d.fuaWrites.Add(1)
	}
	return nil
}

func (d *memDevice) Zero(ctx context.Context, off, length int64, discard, fua bool) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	d.store.mu.Lock()
	defer d.store.mu.Unlock()
	clear(d.store.data[off : off+length])
	if discard {
		d.discards.Add(1)
	} else {
		d.writeZeroes.Add(1)
	}
	return nil
}

func (d *memDevice) Flush(ctx context.Context) error {
	d.flushes.Add(1)
	return nil
}

// snapshot copies the whole device content.
func (d *memDevice) snapshot() []byte {
	d.store.mu.Lock()
	defer d.store.mu.Unlock()
	return append([]byte(nil), d.store.data...)
}
