package volume

import (
	"context"
	"fmt"
	"sync"

	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// maxReadPiece caps one ranged GET, so a large read of one object is
// fetched by several downloaders at once.
const maxReadPiece = 1 << 20

// Read fills buf with n blocks starting at block: unmapped and discarded
// blocks read as zeros, mapped ones are fetched with ranged GETs straight
// into buf, concurrently.
func (v *Volume) Read(ctx context.Context, block, n int64, buf []byte) error {
	bs := v.o.BlockSize
	if block < 0 || n < 0 || (block+n)*bs > v.sb.Size || int64(len(buf)) < n*bs {
		return fmt.Errorf("read of %d blocks at block %d: outside the %d-byte device or buffer too small", n, block, v.sb.Size)
	}
	type piece struct {
		key      int64
		objOff   int64
		bufStart int64
		length   int64
	}
	var pieces []piece
	var pinned []int64
	defer func() { v.unpin(pinned) }()
	md := v.layout.MetadataSize()
	err := v.maps.Do(ctx, mapproxy.High, func(m *extentmap.Map) {
		// Pinned on the map owner goroutine: dead GC decides there too,
		// so an object found here cannot be collected before unpin.
		m.Lookup(block, n, func(e extentmap.Extent) {
			start := (e.Block - block) * bs
			length := e.N * bs
			if e.Key < 0 || e.Zero {
				clear(buf[start : start+length])
				return
			}
			objOff := md + e.Off*bs
			if k := len(pinned); k == 0 || pinned[k-1] != e.Key {
				pinned = append(pinned, e.Key)
				v.pin(e.Key)
			}
			for length > 0 {
				l := min(length, maxReadPiece)
				pieces = append(pieces, piece{e.Key, objOff, start, l})
				objOff += l
				start += l
				length -= l
			}
		})
	})
	if err != nil {
		return fmt.Errorf("look up blocks %d+%d: %w", block, n, err)
	}
	if len(pieces) == 1 {
		p := pieces[0]
		return v.readPiece(ctx, p.key, p.objOff, buf[p.bufStart:p.bufStart+p.length])
	}
	var wg sync.WaitGroup
	errs := make([]error, len(pieces))
	for i, p := range pieces {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = v.readPiece(ctx, p.key, p.objOff, buf[p.bufStart:p.bufStart+p.length])
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

func (v *Volume) readPiece(ctx context.Context, key, off int64, dst []byte) error {
	got, err := v.objs.GetRange(ctx, objproxy.High, store.DataName(key), off, dst)
	if err != nil {
		return fmt.Errorf("read key %d at %d: %w", key, off, err)
	}
	if got != len(dst) {
		return fmt.Errorf("read key %d at %d: object ends after %d of %d bytes (corrupt or truncated object)", key, off, got, len(dst))
	}
	return nil
}

// BuseRead implements the BUSE read callback; sector and length are in
// device blocks, as the BUSE library passes them.
func (v *Volume) BuseRead(sector, length int64, buf []byte) error {
	return v.Read(context.Background(), sector, length, buf)
}

// BusePreRun implements buse.BuseReadWriter; nothing to do before start.
func (v *Volume) BusePreRun() {}

// BusePostRemove implements buse.BuseReadWriter; the volume is closed by
// main after the device is gone.
func (v *Volume) BusePostRemove() {}

// Mapped calls fn for the runs of blocks in [block, block+n) that hold
// data in the map (neither unwritten nor discarded). The chunker uses it
// to drop discards of space that holds nothing.
func (v *Volume) Mapped(ctx context.Context, block, n int64, fn func(block, n int64)) error {
	var runs [][2]int64
	err := v.maps.Do(ctx, mapproxy.High, func(m *extentmap.Map) {
		m.Lookup(block, n, func(e extentmap.Extent) {
			if e.Key >= 0 && !e.Zero {
				runs = append(runs, [2]int64{e.Block, e.N})
			}
		})
	})
	if err != nil {
		return fmt.Errorf("look up blocks %d+%d: %w", block, n, err)
	}
	for _, r := range runs {
		fn(r[0], r[1])
	}
	return nil
}

// pin marks key as referenced by a read in flight.
func (v *Volume) pin(key int64) {
	v.pinMu.Lock()
	v.pins[key]++
	v.pinMu.Unlock()
}

func (v *Volume) unpin(keys []int64) {
	if len(keys) == 0 {
		return
	}
	v.pinMu.Lock()
	for _, k := range keys {
		if v.pins[k]--; v.pins[k] <= 0 {
			delete(v.pins, k)
		}
	}
	v.pinMu.Unlock()
}

// Pinned reports whether a read in flight references key. Dead GC must
// call it from inside a map proxy request (where reads pin), and skip
// pinned objects until a later round.
func (v *Volume) Pinned(key int64) bool {
	v.pinMu.Lock()
	defer v.pinMu.Unlock()
	return v.pins[key] > 0
}
