package volume

import (
	"context"
	"errors"
	"fmt"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/crc32c"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// Commit stores the chunk in buf (BUSE layout, items items; items < 0: up
// to the first zero-length item) as the object of key, then applies it to
// the map. It returns only after both, so the caller may acknowledge the
// writes and reuse buf.
//
// Before the upload, every item's seqno gets the attach generation in its
// high bits (docs/ARCHITECTURE.md §4) and the metadata area is finished:
// with Options.CompactChunks the items move next to the data (chunk
// Layout.Compact, docs/ARCHITECTURE.md §3), otherwise the slots after the
// last item are zeroed. buf is modified in place; its first item slots
// need not hold the item list afterwards.
func (v *Volume) Commit(ctx context.Context, key int64, buf []byte, items int) error {
	return v.commit(ctx, key, buf, nil, items, true)
}

// ChunkWindow implements chunker.WindowedEngine: with a read cache, the
// chunker builds chunks in windows of the cache's memory, so that a
// committed chunk is cached without a copy; without one, size 0. The
// cache's pool of free windows grows to hold the windows of chunks
// chunks: the windows the cache evicts for each new chunk are taken by
// the next ones instead of left to the garbage collector and allocated
// again (first-touch page faults: docs/ARCHITECTURE.md §18).
func (v *Volume) ChunkWindow(chunks int) (size int64, alloc func() []byte) {
	if v.cache == nil {
		return 0, nil
	}
	w := v.cache.Window()
	v.cache.ReservePool(chunks * int((v.layout.ChunkSize+w-1)/w))
	return w, func() []byte { return v.cache.Buffer(int(w)) }
}

// RecycleWindow implements chunker.WindowedEngine: a window from
// ChunkWindow's source that no chunk kept goes back to the cache's pool.
func (v *Volume) RecycleWindow(w []byte) {
	if v.cache != nil {
		v.cache.Recycle(w)
	}
}

// CommitWindows implements chunker.WindowedEngine: Commit of a chunk whose
// metadata area is md and whose data area is data, windows of the read
// cache (ChunkWindow). The object is uploaded from the pieces as one
// body; once it is stored the stored hook runs and then the windows
// become the cache's windows of the object, with no copy. Without a
// stored hook in ctx the windows stay the caller's and are copied into
// the cache instead.
func (v *Volume) CommitWindows(ctx context.Context, key int64, md []byte, data [][]byte, items int) error {
	if data == nil {
		data = [][]byte{} // marks the windowed form
	}
	return v.commit(ctx, key, md, data, items, true)
}

// CommitCopies is Commit for chunks of copied writes (threshold GC): the
// items keep their original seqnos, generation included, so a copy never
// wins over a write made after the original (docs/ARCHITECTURE.md §4).
func (v *Volume) CommitCopies(ctx context.Context, key int64, buf []byte, items int) error {
	return v.commit(ctx, key, buf, nil, items, false)
}

// ErrClosing is returned by a commit that starts after Close began.
var ErrClosing = errors.New("volume is closing")

// maxSeqno is the largest per-attach seqno: the low GenerationBits of a
// stored seqno.
const maxSeqno = 1<<GenerationBits - 1

// ErrSeqnoExhausted is returned once a collision area of this attach has
// used every seqno it can order.
var ErrSeqnoExhausted = errors.New("sequence numbers of this attach are exhausted")

// commit stores and applies a chunk: contiguous in buf (data nil), or
// windowed (data not nil): buf is then the metadata area alone and data
// the data area in cache windows.
func (v *Volume) commit(ctx context.Context, key int64, buf []byte, data [][]byte, items int, user bool) error {
	windowed := data != nil
	v.inflightMu.Lock()
	if v.closing {
		v.inflightMu.Unlock()
		return fmt.Errorf("commit key %d: %w", key, ErrClosing)
	}
	v.inflight.Add(1)
	v.inflightMu.Unlock()
	defer v.inflight.Done()
	if err := v.Err(); err != nil {
		return err
	}
	p, err := v.layout.Parse(buf, items, v.devSectors())
	if err == nil && windowed && int64(store.PiecesLen(data)) != p.End-p.DataStart {
		err = fmt.Errorf("items claim %d bytes of data, the windows hold %d", p.End-p.DataStart, store.PiecesLen(data))
	}
	if err != nil {
		v.fail(fmt.Errorf("chunk for key %d is malformed: %w", key, err))
		return fmt.Errorf("commit key %d: %w", key, err)
	}
	if user {
		gen := v.sb.Generation << GenerationBits
		for i := range p.Items {
			if p.Items[i].Seqno > maxSeqno {
				// Masking it would wrap it below older writes of this
				// attach to the same collision area, and they would win.
				err := fmt.Errorf("%w: chunk for key %d has seqno %d, past the %d this attach can order; restart bs3 to move the volume to a new generation", ErrSeqnoExhausted, key, p.Items[i].Seqno, uint64(maxSeqno))
				v.fail(err)
				return err
			}
			seq := gen | p.Items[i].Seqno
			p.Items[i].Seqno = seq
			chunk.SetSeqno(buf, i, seq)
		}
	}
	prio := objproxy.High
	if !user {
		prio = objproxy.Low
	}
	var body []byte
	end := p.End // of the part of the chunk in buf
	if windowed {
		end = v.layout.MetadataSize()
	}
	dataStart := v.layout.MetadataSize() // in body
	if v.o.CompactChunks {
		body, dataStart = v.layout.Compact(buf, len(p.Items), end)
		p.Rebase(dataStart)
	} else {
		v.layout.ZeroTail(buf, len(p.Items))
		body = buf[:end]
	}
	var pieces [][]byte // the windowed body: metadata, then the windows
	if windowed {
		pieces = append(make([][]byte, 0, 1+len(data)), body)
		pieces = append(pieces, data...)
	}
	if crc, ok := chunk.DataCRC(ctx); ok {
		// The builder checksummed the data as it copied it in; only the
		// metadata in front of it is read again (docs/ARCHITECTURE.md §18).
		sum := crc32c.Combine(crc32c.Checksum(body[:dataStart]), crc, p.End-p.DataStart)
		if windowed {
			ctx = store.WithPiecesCRC32C(ctx, pieces, sum)
		} else {
			ctx = store.WithBodyCRC32C(ctx, body, sum)
		}
	}
	name := store.DataName(key)
	if windowed {
		err = v.objs.PutV(ctx, prio, name, pieces, v.o.ConditionalWrites)
	} else {
		err = v.objs.Put(ctx, prio, name, body, v.o.ConditionalWrites)
	}
	if err != nil {
		if errors.Is(err, store.ErrExists) {
			err = fmt.Errorf("%w: key %d was written by someone else (is a second bs3 attached to this volume?): %v", ErrFenced, key, err)
			v.fail(err)
			return err
		}
		// Later keys wait for this one; without it they can never be
		// applied in order.
		err = fmt.Errorf("upload key %d: %w", key, err)
		v.fail(err)
		return err
	}
	stored := chunk.StoredHook(ctx)
	switch {
	case v.cache == nil || p.End == p.DataStart:
	case windowed && stored != nil:
		// The windows are the cache's once the hook has run (the
		// chunker then no longer reads them); until the cache has
		// them, a read of these blocks fetches from the store.
		stored(p.DataStart)
		stored = nil
		for w, win := range data {
			v.cache.Keep(cache.Key{Volume: v.sb.VolumeID, Object: key, Window: int64(w)}, win, false, false)
		}
	case windowed:
		for w, win := range data {
			v.cache.PutWindow(cache.Key{Volume: v.sb.VolumeID, Object: key, Window: int64(w)}, win)
		}
	default:
		// Stored, so these are the object's bytes for good (data objects
		// are immutable); nothing looks them up before the map points here.
		v.cache.PutObject(v.sb.VolumeID, key, body[p.DataStart:])
	}
	if stored != nil {
		// The frontend may reuse buf from now on and serves reads of
		// these writes with ReadUnapplied until the apply is done.
		stored(p.DataStart)
	}
	// Wait for every earlier key to be applied (they may still be
	// uploading), then apply this one.
	v.applyMu.Lock()
	for v.watermark.Load() != key && v.Err() == nil {
		v.applyCond.Wait()
	}
	v.applyMu.Unlock()
	if err := v.Err(); err != nil {
		return fmt.Errorf("commit key %d: %w", key, err)
	}
	if err := v.apply(ctx, mapproxy.High, key, p); err != nil {
		// The map and the bucket disagree now; nothing later may apply.
		v.fail(err)
		return err
	}
	v.sinceCkpt.Add(1)
	v.applyMu.Lock()
	v.applyCond.Broadcast()
	v.applyMu.Unlock()
	return nil
}

// apply updates the map with the items of object key.
func (v *Volume) apply(ctx context.Context, prio mapproxy.Priority, key int64, p chunk.Parsed) error {
	var aerr error
	err := v.maps.Do(ctx, prio, func(m *extentmap.Map) {
		if aerr = v.applyItems(m, key, p); aerr == nil {
			v.watermark.Store(key + 1)
		}
	})
	if err == nil {
		err = aerr
	}
	if err != nil {
		return fmt.Errorf("apply key %d to the map: %w", key, err)
	}
	return nil
}

// applyItems records object key and its items in m. Recovery calls it
// directly (it owns the map before the proxy starts). An empty object (a
// placeholder for a collected one) is tracked with no blocks.
func (v *Volume) applyItems(m *extentmap.Map, key int64, p chunk.Parsed) error {
	total := int64(0)
	if p.End > p.DataStart {
		total = (p.End - p.DataStart) / v.o.BlockSize
	}
	if err := m.AddObject(key, total); err != nil {
		return err
	}
	if total > 0 && p.DataStart != v.layout.MetadataSize() {
		// Readers find the data of a compact object through the map
		// (docs/ARCHITECTURE.md §3); checkpoints keep it.
		if err := m.SetDataStart(key, p.DataStart); err != nil {
			return err
		}
	}
	for i, it := range p.Items {
		block, n := v.blocksOf(it)
		var err error
		if p.DataOff[i] < 0 {
			_, err = m.UpdateZero(block, n, key, it.Seqno)
		} else {
			_, err = m.Update(block, n, key, (p.DataOff[i]-p.DataStart)/v.o.BlockSize, it.Seqno)
		}
		if err != nil {
			return fmt.Errorf("item %d: %w", i, err)
		}
	}
	return nil
}
