package volume

import (
	"context"
	"fmt"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// ReadUnapplied fills buf with n blocks at device block block whose newest
// acknowledged write is in the object of key, at byte dataOff of its data
// area (which starts at dataStart): an object that is stored but whose
// apply may still wait for lower keys (docs/ARCHITECTURE.md §4.4). The
// chunker calls it for chunks whose buffer it released once they were
// stored (chunk.WithStoredHook).
//
// On the map goroutine it either finds key applied, and then reads the
// blocks through the map, which holds that write or a newer one; or pins
// key, which dead GC checks there and never collects an unapplied key
// anyway, and reads the bytes from the read cache (filled at commit) or
// the store.
func (v *Volume) ReadUnapplied(ctx context.Context, key, dataStart, dataOff, block, n int64, buf []byte) error {
	bs := v.o.BlockSize
	length := n * bs
	if block < 0 || n < 0 || (block+n)*bs > v.sb.Size || int64(len(buf)) < length || dataOff < 0 || dataStart < 0 {
		return fmt.Errorf("read of %d unapplied blocks at block %d (key %d, data offset %d): outside the device, the object or the buffer", n, block, key, dataOff)
	}
	buf = buf[:length]
	applied := false
	err := v.maps.Do(ctx, mapproxy.High, func(*extentmap.Map) {
		if v.watermark.Load() > key {
			applied = true
			return
		}
		v.pin(key)
	})
	if err != nil {
		return fmt.Errorf("read unapplied key %d: %w", key, err)
	}
	if applied {
		return v.Read(ctx, block, n, buf)
	}
	defer v.unpin([]int64{key})
	if v.cache != nil && v.readCached(key, dataOff, buf) {
		return nil
	}
	got, err := v.objs.GetRange(ctx, objproxy.High, store.DataName(key), dataStart+dataOff, buf)
	if err != nil {
		return fmt.Errorf("read unapplied key %d at %d: %w", key, dataStart+dataOff, err)
	}
	if got != len(buf) {
		return fmt.Errorf("read unapplied key %d at %d: object ends after %d of %d bytes (corrupt or truncated object)", key, dataStart+dataOff, got, len(buf))
	}
	return nil
}

// readCached copies [off, off+len(buf)) of key's data area from the read
// cache into buf if every window of it is there.
func (v *Volume) readCached(key, off int64, buf []byte) bool {
	w := v.cache.Window()
	end := off + int64(len(buf))
	for win := off / w; win*w < end; win++ {
		h, ok := v.cache.Acquire(cache.Key{Volume: v.sb.VolumeID, Object: key, Window: win})
		lo, hi := max(off, win*w), min(end, (win+1)*w)
		ok = ok && int64(len(h.Data)) >= hi-win*w
		if ok {
			copy(buf[lo-off:hi-off], h.Data[lo-win*w:hi-win*w])
		}
		h.Release()
		if !ok {
			return false
		}
	}
	return true
}
