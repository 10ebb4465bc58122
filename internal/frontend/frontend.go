// Package frontend defines what the userspace frontends (NBD, FUSE) serve:
// a byte-addressed block device with the write semantics of
// docs/ARCHITECTURE.md §4–§5. The BUSE frontend talks to the volume engine
// directly, because the kernel module builds the chunks itself.
//
// Every frontend also tells its owner when it stops serving by itself, so
// that the daemon never runs on without a device: the FUSE mount and the
// BUSE device through Done, the NBD server by Serve returning.
package frontend

import (
	"context"
	"errors"
)

// ErrInvalid is returned for requests outside the device or not aligned to
// its block size; frontends map it to EINVAL (NBD: NBD_EINVAL).
var ErrInvalid = errors.New("request out of range or not block-aligned")

// Device is a block device as the frontends see it. Offsets and lengths
// must be multiples of BlockSize and within Size; other requests fail with
// ErrInvalid and change nothing. All methods are safe for concurrent use.
type Device interface {
	// Size is the device size in bytes.
	Size() int64
	// BlockSize is the logical block size in bytes (512 or 4096).
	BlockSize() int64

	// ReadAt fills p with the device contents at off. It never returns
	// data older than a write acknowledged before the call started.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off. It returns once the write is ordered and
	// visible to reads; with fua, only once it is durable in the object
	// store.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Zero makes length bytes at off read as zeros (discard/trim when
	// discard is set, write-zeroes otherwise; both are persisted).
	Zero(ctx context.Context, off, length int64, discard, fua bool) error
	// Flush returns once every write acknowledged before it is durable
	// (write.durable = true) or ordered before every later write (false).
	Flush(ctx context.Context) error
}

// TryWriter is implemented by devices that can take a small write without
// waiting, so a frontend may run it on the goroutine that reads requests
// instead of handing it to a worker (docs/ARCHITECTURE.md §20).
type TryWriter interface {
	// TryWriteAt is WriteAt(ctx, p, off, false) when it can complete
	// without waiting for memory or the store: it then returns true and
	// WriteAt's error. When it would wait, it returns false, nil and
	// changes nothing; the caller then uses WriteAt.
	TryWriteAt(p []byte, off int64) (bool, error)
}
