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

// ReadObserver is implemented by devices that recognize sequential
// streams of reads (to read ahead of them). A frontend that serves
// requests concurrently calls ObserveRead for each read in the order the
// reads arrived, before it hands the read to a worker, and passes the
// context it returns to that read's ReadAt: the goroutines serving the
// reads run in any order, and reads seen in that order look like several
// streams (docs/ARCHITECTURE.md §1, readahead).
type ReadObserver interface {
	// ObserveRead notes a read of length bytes at off as it arrives and
	// returns ctx, or a context derived from it that carries what was
	// observed to the ReadAt of exactly that read.
	ObserveRead(ctx context.Context, off, length int64) context.Context
}

// WindowWriter is implemented by devices that build their chunks in
// windows of memory of one size (the read cache's): a frontend that
// reads a large write's payload into such windows hands them over, and
// the device keeps those that line up with its chunk as they are instead
// of copying them (docs/ARCHITECTURE.md §18).
type WindowWriter interface {
	// PayloadWindow returns a new window, its length the window size;
	// nil when the device takes no windows (then WriteAt is the way),
	// which a device decides once: it never changes between calls.
	PayloadWindow() []byte
	// WriteWindows is WriteAt of the n bytes in wins, windows from
	// PayloadWindow, every one full but the last. crcs, when not nil,
	// holds the CRC32C of each window's bytes, taken as the caller
	// filled them (while they were in the CPU's cache), so the device
	// need not read them again for its checksums. It takes all the
	// windows, whatever it returns: the caller must not touch them
	// afterwards.
	WriteWindows(ctx context.Context, wins [][]byte, crcs []uint32, n, off int64, fua bool) error
	// RecycleWindows takes back windows from PayloadWindow that are not
	// given to WriteWindows (the payload never arrived whole).
	RecycleWindows(wins [][]byte)
}
