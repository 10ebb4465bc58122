package fuse

import (
	"context"
	"fmt"
	"math/bits"
	"sync"
	"syscall"

	"github.com/bs3/bs3/internal/frontend"
)

// Stripe geometry of the read-modify-write lock. A stripe unit is a byte
// range of the device; unit u is guarded by stripe u % numStripes. 64 KiB
// is a multiple of both block sizes, so a block never spans two units.
const (
	numStripes = 64 // fits a uint64 bit mask
	stripeUnit = 64 << 10
)

// blockIO turns byte-granular file requests into whole-block Device calls.
//
// Requests not aligned to the block size read the enclosing blocks, and
// writes merge into them (read-modify-write). An RMW must not interleave
// with any other write to the same blocks, or one of the two is lost, so
// every write holds the stripes covering its enclosing blocks: shared for
// aligned writes (they may run in parallel with each other; the Device
// orders them), exclusive for RMW.
type blockIO struct {
	dev     frontend.Device
	size    int64
	bs      int64
	stripes [numStripes]sync.RWMutex
}

func newBlockIO(dev frontend.Device) *blockIO {
	return &blockIO{dev: dev, size: dev.Size(), bs: dev.BlockSize()}
}

func (b *blockIO) alignDown(x int64) int64 { return x - x%b.bs }

func (b *blockIO) alignUp(x int64) int64 {
	if r := x % b.bs; r != 0 {
		return x + b.bs - r
	}
	return x
}

// lockRange locks the stripes covering the device bytes [off, end) and
// returns the function that unlocks them. Stripes are taken in ascending
// index order so that two multi-stripe writers cannot deadlock.
func (b *blockIO) lockRange(off, end int64, exclusive bool) func() {
	var mask uint64
	first, last := off/stripeUnit, (end-1)/stripeUnit
	if last-first+1 >= numStripes {
		mask = ^uint64(0)
	} else {
		for u := first; u <= last; u++ {
			mask |= 1 << uint(u%numStripes)
		}
	}
	for m := mask; m != 0; m &= m - 1 {
		s := &b.stripes[bits.TrailingZeros64(m)]
		if exclusive {
			s.Lock()
		} else {
			s.RLock()
		}
	}
	return func() {
		for m := mask; m != 0; m &= m - 1 {
			s := &b.stripes[bits.TrailingZeros64(m)]
			if exclusive {
				s.Unlock()
			} else {
				s.RUnlock()
			}
		}
	}
}

// read fills p from off and returns the number of bytes read, which is
// short only at the end of the device (0 at or past it, like EOF).
func (b *blockIO) read(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= b.size || len(p) == 0 {
		return 0, nil
	}
	end := min(off+int64(len(p)), b.size)
	p = p[:end-off]
	a, e := b.alignDown(off), b.alignUp(end)
	if a == off && e == end {
		if err := b.dev.ReadAt(ctx, p, off); err != nil {
			return 0, fmt.Errorf("read %d bytes at %d: %w", len(p), off, err)
		}
		return len(p), nil
	}
	buf := make([]byte, e-a)
	if err := b.dev.ReadAt(ctx, buf, a); err != nil {
		return 0, fmt.Errorf("read blocks [%d, %d) for unaligned read: %w", a, e, err)
	}
	copy(p, buf[off-a:])
	return len(p), nil
}

// write stores p at off and returns the number of bytes written. A write
// that crosses the end of the device is cut short there, as on a block
// device; one that starts at or past the end fails with ENOSPC. The file
// never grows.
func (b *blockIO) write(ctx context.Context, p []byte, off int64, fua bool) (int, error) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off >= b.size {
		return 0, syscall.ENOSPC
	}
	end := min(off+int64(len(p)), b.size)
	p = p[:end-off]
	a, e := b.alignDown(off), b.alignUp(end)
	if a == off && e == end {
		unlock := b.lockRange(a, e, false)
		defer unlock()
		if err := b.dev.WriteAt(ctx, p, off, fua); err != nil {
			return 0, fmt.Errorf("write %d bytes at %d: %w", len(p), off, err)
		}
		return len(p), nil
	}

	unlock := b.lockRange(a, e, true)
	defer unlock()
	buf := make([]byte, e-a)
	if off > a {
		if err := b.dev.ReadAt(ctx, buf[:b.bs], a); err != nil {
			return 0, fmt.Errorf("read head block %d for unaligned write: %w", a, err)
		}
	}
	// The tail block is the head block when the write stays inside one
	// block; it was read above in that case.
	if tail := e - b.bs; end < e && !(off > a && tail == a) {
		if err := b.dev.ReadAt(ctx, buf[tail-a:], tail); err != nil {
			return 0, fmt.Errorf("read tail block %d for unaligned write: %w", tail, err)
		}
	}
	copy(buf[off-a:], p)
	if err := b.dev.WriteAt(ctx, buf, a, fua); err != nil {
		return 0, fmt.Errorf("write blocks [%d, %d) for unaligned write: %w", a, e, err)
	}
	return len(p), nil
}

// zero makes [off, off+length) read as zeros. Whole blocks go to
// Device.Zero (discard selects trim vs write-zeroes); partial blocks at
// either end are written with zeros by read-modify-write.
func (b *blockIO) zero(ctx context.Context, off, length int64, discard, fua bool) error {
	if off < 0 || length < 0 || off+length > b.size {
		return syscall.EINVAL
	}
	end := off + length
	ma, me := b.alignUp(off), b.alignDown(end)
	if ma >= me {
		// No whole block inside: the range lies within one or two
		// partial blocks.
		if length > 0 {
			if _, err := b.write(ctx, make([]byte, length), off, fua); err != nil {
				return err
			}
		}
		return nil
	}
	if off < ma {
		if _, err := b.write(ctx, make([]byte, ma-off), off, fua); err != nil {
			return err
		}
	}
	if err := b.zeroAligned(ctx, ma, me-ma, discard, fua); err != nil {
		return err
	}
	if me < end {
		if _, err := b.write(ctx, make([]byte, end-me), me, fua); err != nil {
			return err
		}
	}
	return nil
}

func (b *blockIO) zeroAligned(ctx context.Context, off, length int64, discard, fua bool) error {
	unlock := b.lockRange(off, off+length, false)
	defer unlock()
	if err := b.dev.Zero(ctx, off, length, discard, fua); err != nil {
		return fmt.Errorf("zero [%d, %d) discard=%t: %w", off, off+length, discard, err)
	}
	return nil
}
