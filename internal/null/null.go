// Package null is the null backend (null = true): a device that accepts
// every write and reads zeros, with no object store behind it. It measures
// the frontend's own overhead and checks a set-up without S3.
package null

import (
	"context"
	"fmt"

	"github.com/bs3/bs3/internal/frontend"
)

// Device discards writes and reads zeros. It serves both the BUSE frontend
// (buse.Engine, through buse.Adapter) and the userspace ones
// (frontend.Device).
type Device struct {
	size, blockSize int64
}

// New returns a null device of size bytes.
func New(size, blockSize int64) *Device { return &Device{size: size, blockSize: blockSize} }

var _ frontend.Device = (*Device)(nil)

func (d *Device) check(off, length int64) error {
	if off < 0 || length < 0 || off%d.blockSize != 0 || length%d.blockSize != 0 || off+length > d.size {
		return fmt.Errorf("%w: %d bytes at %d", frontend.ErrInvalid, length, off)
	}
	return nil
}

// Size implements frontend.Device.
func (d *Device) Size() int64 { return d.size }

// BlockSize implements frontend.Device.
func (d *Device) BlockSize() int64 { return d.blockSize }

// ReadAt implements frontend.Device: always zeros.
func (d *Device) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	clear(p)
	return nil
}

// WriteAt implements frontend.Device: the data is dropped.
func (d *Device) WriteAt(_ context.Context, p []byte, off int64, _ bool) error {
	return d.check(off, int64(len(p)))
}

// Zero implements frontend.Device.
func (d *Device) Zero(_ context.Context, off, length int64, _, _ bool) error {
	return d.check(off, length)
}

// Flush implements frontend.Device.
func (d *Device) Flush(context.Context) error { return nil }

// Read fills n blocks with zeros: the reads of the BUSE frontend
// (buse.Engine).
func (d *Device) Read(_ context.Context, _, n int64, buf []byte) error {
	clear(buf[:n*d.blockSize])
	return nil
}

// NextKey implements buse.Engine: there are no keys.
func (d *Device) NextKey() int64 { return 0 }

// Commit implements buse.Engine: the chunk is dropped.
func (d *Device) Commit(context.Context, int64, []byte, int) error { return nil }
