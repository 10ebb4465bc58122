package buse

import (
	"context"

	"github.com/asch/buse/lib/go/buse"
)

// Callbacks is the set of callbacks the BUSE library calls; an Adapter
// implements it.
type Callbacks = buse.BuseReadWriter

// Engine is what the BUSE callbacks need of what serves the device:
// *volume.Volume, or the null backend.
type Engine interface {
	// Read fills buf with n blocks at block.
	Read(ctx context.Context, block, n int64, buf []byte) error
	// NextKey and Commit store one chunk under the next key (the kernel
	// module built the chunk, items is its count of writes).
	NextKey() int64
	Commit(ctx context.Context, key int64, buf []byte, items int) error
}

// Adapter serves the BUSE callbacks from an Engine. The library gives the
// callbacks no context; requests run to their end (a stop waits for the
// kernel's queues to drain, docs/ARCHITECTURE.md §10).
type Adapter struct {
	e Engine
}

// NewAdapter returns the BUSE callbacks of e.
func NewAdapter(e Engine) *Adapter { return &Adapter{e: e} }

var _ Callbacks = (*Adapter)(nil)

// BuseRead implements the BUSE read callback; sector and length are in
// device blocks, as the BUSE library passes them.
func (a *Adapter) BuseRead(sector, length int64, buf []byte) error {
	return a.e.Read(context.Background(), sector, length, buf)
}

// BuseWrite implements the BUSE write callback: one chunk, as the kernel
// module built it, becomes the object of the next key.
func (a *Adapter) BuseWrite(writes int64, buf []byte) error {
	return a.e.Commit(context.Background(), a.e.NextKey(), buf, int(writes))
}

// BusePreRun implements the BUSE callback; nothing to do before start.
func (a *Adapter) BusePreRun() {}

// BusePostRemove implements the BUSE callback; main closes the engine
// after the device is gone.
func (a *Adapter) BusePostRemove() {}
