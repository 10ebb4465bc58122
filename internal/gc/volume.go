package gc

import (
	"context"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
)

// Volume is what a collector needs of the attached volume;
// *volume.Volume implements it. Map and object access go through the
// volume's proxies so that the collector runs at low priority behind user
// I/O (docs/ARCHITECTURE.md §7), and the collector never holds the
// proxies themselves.
type Volume interface {
	Size() int64
	BlockSize() int64
	Layout() chunk.Layout
	// Err is the error that stopped the volume, or nil.
	Err() error
	// Watermark is the lowest key not yet applied; DeleteFloor the
	// oldest retained checkpoint's watermark (read both inside MapDo for
	// a view consistent with the map).
	Watermark() int64
	DeleteFloor() int64
	// Pinned: a read in flight uses the object of key. IsClaim: key is a
	// claim record of an attach.
	Pinned(key int64) bool
	IsClaim(key int64) bool
	// DataStartIn is where the data area of key's object starts, with m
	// the map (inside MapDo).
	DataStartIn(m *extentmap.Map, key int64) int64
	// MapDo runs fn on the map at prio; the collector always passes
	// mapproxy.Low.
	MapDo(ctx context.Context, prio mapproxy.Priority, fn func(*extentmap.Map)) error
	// ObjectSize, ReadObject, DeleteObject and EmptyObject (replace by
	// an empty placeholder) act on the data object of key at low
	// priority.
	ObjectSize(ctx context.Context, key int64) (int64, error)
	ReadObject(ctx context.Context, key, off int64, buf []byte) (int, error)
	DeleteObject(ctx context.Context, key int64) error
	EmptyObject(ctx context.Context, key int64) error
	// NextKey and CommitCopies store compacted copies under a new key,
	// keeping their seqnos (docs/ARCHITECTURE.md §7.2).
	NextKey() int64
	CommitCopies(ctx context.Context, key int64, buf []byte, items int) error
}
