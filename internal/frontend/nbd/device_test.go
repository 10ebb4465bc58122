package nbd

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/bs3/bs3/internal/frontend"
)

// memDevice is the in-memory reference frontend.Device of these tests: a
// byte slice under a lock, with counters of what reached it and an
// optional hook to delay or fail requests.
type memDevice struct {
	size, bs int64

	mu   sync.RWMutex
	data []byte

	reads, writes, fuaWrites atomic.Int64
	flushes                  atomic.Int64
	discards, writeZeroes    atomic.Int64 // Zero calls by discard flag
	fuaZeroes                atomic.Int64
	// invalid counts calls with out-of-range or misaligned arguments; the
	// server must filter those, so tests expect zero.
	invalid atomic.Int64

	// hook, if set, runs before every operation (outside the lock); it may
	// block, and a non-nil result is returned instead of doing the op.
	hook atomic.Pointer[func(op string, off, length int64) error]
}

// newTestDevice is the factory the client helpers are run against; the
// engine-backed tests provide their own frontend.Device instead.
func newTestDevice(t *testing.T, size, blockSize int64) frontend.Device {
	t.Helper()
	return newMemDevice(size, blockSize)
}

func newMemDevice(size, bs int64) *memDevice {
	return &memDevice{size: size, bs: bs, data: make([]byte, size)}
}

func (d *memDevice) setHook(h func(op string, off, length int64) error) {
	if h == nil {
		d.hook.Store(nil)
		return
	}
	d.hook.Store(&h)
}

func (d *memDevice) runHook(op string, off, length int64) error {
	if h := d.hook.Load(); h != nil {
		return (*h)(op, off, length)
	}
	return nil
}

func (d *memDevice) Size() int64      { return d.size }
func (d *memDevice) BlockSize() int64 { return d.bs }

func (d *memDevice) valid(off, n int64) bool {
	ok := off >= 0 && n >= 0 && off <= d.size && n <= d.size-off && off%d.bs == 0 && n%d.bs == 0
	if !ok {
		d.invalid.Add(1)
	}
	return ok
}

func (d *memDevice) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := d.runHook("read", off, int64(len(p))); err != nil {
		return err
	}
	if !d.valid(off, int64(len(p))) {
		return fmt.Errorf("read %d@%d: %w", len(p), off, frontend.ErrInvalid)
	}
	d.reads.Add(1)
	d.mu.RLock()
	copy(p, d.data[off:])
	d.mu.RUnlock()
	return nil
}

func (d *memDevice) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	if err := d.runHook("write", off, int64(len(p))); err != nil {
		return err
	}
	if !d.valid(off, int64(len(p))) {
		return fmt.Errorf("write %d@%d: %w", len(p), off, frontend.ErrInvalid)
	}
	d.writes.Add(1)
	if fua {
		d.fuaWrites.Add(1)
	}
	d.mu.Lock()
	copy(d.data[off:], p)
	d.mu.Unlock()
	return nil
}

func (d *memDevice) Zero(_ context.Context, off, length int64, discard, fua bool) error {
	if err := d.runHook("zero", off, length); err != nil {
		return err
	}
	if !d.valid(off, length) {
		return fmt.Errorf("zero %d@%d: %w", length, off, frontend.ErrInvalid)
	}
	if discard {
		d.discards.Add(1)
	} else {
		d.writeZeroes.Add(1)
	}
	if fua {
		d.fuaZeroes.Add(1)
	}
	d.mu.Lock()
	clear(d.data[off : off+length])
	d.mu.Unlock()
	return nil
}

func (d *memDevice) Flush(context.Context) error {
	if err := d.runHook("flush", 0, 0); err != nil {
		return err
	}
	d.flushes.Add(1)
	return nil
}

// snapshot copies n bytes at off.
func (d *memDevice) snapshot(off, n int64) []byte {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return append([]byte(nil), d.data[off:off+n]...)
}
