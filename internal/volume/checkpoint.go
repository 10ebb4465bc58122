package volume

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/bs3/bs3/internal/crc32c"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// Checkpoint object layout: a fixed header, the serialized map, and a
// CRC32C of everything before it. A truncated or damaged checkpoint fails
// the check and recovery falls back to the previous one.
const (
	ckptMagic      = "BS3CKPT\x00"
	ckptVersion    = 1
	ckptHeaderSize = 8 + 4 + 4 + 8 + 8 + 8 + 8
	// ckptKeep is how many checkpoints stay in the bucket: the newest and
	// the one before it, in case the newest turns out damaged.
	ckptKeep = 2
)

type ckptHeader struct {
	generation uint64
	blockSize  int64
	watermark  int64
	mapLen     int64
}

func encodeCheckpoint(h ckptHeader, mapBytes []byte) []byte {
	b := make([]byte, ckptHeaderSize+len(mapBytes)+4)
	copy(b, ckptMagic)
	binary.LittleEndian.PutUint32(b[8:], ckptVersion)
	binary.LittleEndian.PutUint64(b[16:], h.generation)
	binary.LittleEndian.PutUint64(b[24:], uint64(h.blockSize))
	binary.LittleEndian.PutUint64(b[32:], uint64(h.watermark))
	binary.LittleEndian.PutUint64(b[40:], uint64(len(mapBytes)))
	copy(b[ckptHeaderSize:], mapBytes)
	n := ckptHeaderSize + len(mapBytes)
	binary.LittleEndian.PutUint32(b[n:], crc32c.Checksum(b[:n]))
	return b
}

func decodeCheckpoint(b []byte) (ckptHeader, []byte, error) {
	var h ckptHeader
	if len(b) < ckptHeaderSize+4 {
		return h, nil, fmt.Errorf("checkpoint of %d bytes is truncated", len(b))
	}
	if string(b[:8]) != ckptMagic {
		return h, nil, errors.New("checkpoint has a bad magic number")
	}
	n := len(b) - 4
	if got, want := crc32c.Checksum(b[:n]), binary.LittleEndian.Uint32(b[n:]); got != want {
		return h, nil, fmt.Errorf("checkpoint checksum mismatch (%08x, stored %08x): truncated or damaged", got, want)
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != ckptVersion {
		return h, nil, fmt.Errorf("checkpoint format version %d is not supported", v)
	}
	h.generation = binary.LittleEndian.Uint64(b[16:])
	h.blockSize = int64(binary.LittleEndian.Uint64(b[24:]))
	h.watermark = int64(binary.LittleEndian.Uint64(b[32:]))
	h.mapLen = int64(binary.LittleEndian.Uint64(b[40:]))
	if h.mapLen != int64(n-ckptHeaderSize) {
		return h, nil, fmt.Errorf("checkpoint says the map has %d bytes but holds %d", h.mapLen, n-ckptHeaderSize)
	}
	return h, b[ckptHeaderSize:n], nil
}

// Checkpoint writes the map under the current watermark, at low priority:
// user I/O waits at most for the map to be serialized. Older checkpoints
// beyond the newest two are deleted.
func (v *Volume) Checkpoint(ctx context.Context) error {
	v.ckptMu.Lock()
	defer v.ckptMu.Unlock()
	start := time.Now()
	// Keys are applied in order on the map owner goroutine, so the
	// watermark read there is exactly the prefix the serialized map holds.
	var wm, applied int64
	var mapBytes []byte
	var merr error
	err := v.maps.Do(ctx, mapproxy.Low, func(m *extentmap.Map) {
		wm = v.watermark.Load()
		applied = v.sinceCkpt.Load()
		mapBytes, merr = m.MarshalBinary()
	})
	if err == nil {
		err = merr
	}
	if err != nil {
		return fmt.Errorf("serialize map: %w", err)
	}
	body := encodeCheckpoint(ckptHeader{generation: v.sb.Generation, blockSize: v.o.BlockSize, watermark: wm}, mapBytes)
	name := store.CheckpointName(wm)
	if err := v.objs.Put(ctx, objproxy.Low, name, body, false); err != nil {
		return fmt.Errorf("upload checkpoint %s: %w", name, err)
	}
	v.sinceCkpt.Add(-applied)
	v.stats.checkpointWritten(len(body))
	v.log.Info().Int64("watermark", wm).Int("bytes", len(body)).Dur("took_ms", time.Since(start)).Msg("checkpoint written")
	return v.pruneCheckpoints(ctx, name)
}

func (v *Volume) listCheckpoints(ctx context.Context) ([]string, error) {
	var names []string
	err := v.objs.List(ctx, objproxy.Low, store.CheckpointPrefix, func(name string, _ int64) error {
		names = append(names, name)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list checkpoints: %w", err)
	}
	sort.Strings(names)
	return names, nil
}

// pruneCheckpoints deletes all but the newest ckptKeep checkpoints, ours
// (just written) being the newest. A newer one means another attach took
// the volume and this daemon has not noticed yet: it must not delete
// checkpoints the new owner's recovery may fall back to.
func (v *Volume) pruneCheckpoints(ctx context.Context, ours string) error {
	names, err := v.listCheckpoints(ctx)
	if err != nil {
		return err
	}
	if n := len(names); n > 0 && names[n-1] > ours {
		err := fmt.Errorf("%w: checkpoint %s is newer than ours (%s)", ErrFenced, names[n-1], ours)
		v.fail(err)
		return err
	}
	for len(names) > ckptKeep {
		if err := v.objs.Delete(ctx, objproxy.Low, names[0]); err != nil {
			return fmt.Errorf("delete old checkpoint %s: %w", names[0], err)
		}
		names = names[1:]
	}
	v.setDeleteFloor(names)
	return nil
}

// setDeleteFloor records the watermark of the oldest checkpoint kept:
// recovery may start from it, so every key at or above it must exist (as
// data or an empty placeholder) to keep the roll-forward contiguous.
func (v *Volume) setDeleteFloor(names []string) {
	floor := int64(0)
	if len(names) > 0 {
		var wm uint64
		if _, err := fmt.Sscanf(names[0], store.CheckpointPrefix+"%016x", &wm); err == nil {
			floor = int64(wm)
		}
	}
	v.deleteFloor.Store(floor)
}

// DeleteFloor is the key below which a dead object may be deleted
// outright; at or above it, dead GC replaces it with an empty placeholder
// (docs/ARCHITECTURE.md §7).
func (v *Volume) DeleteFloor() int64 { return v.deleteFloor.Load() }

// loadCheckpoint returns the map and watermark of the newest usable
// checkpoint among names, or a nil map and why each one was unusable.
// A checkpoint written by this or a newer generation means another attach
// took the volume after this one started: that is refused, not skipped.
func (v *Volume) loadCheckpoint(ctx context.Context, names []string) (*extentmap.Map, int64, []error, error) {
	var failures []error
	for i := len(names) - 1; i >= 0; i-- {
		raw, err := readWhole(ctx, v.objs, names[i])
		if err != nil {
			if errors.Is(err, store.ErrNotFound) {
				failures = append(failures, fmt.Errorf("%s: deleted while listed", names[i]))
				continue
			}
			if errors.Is(err, store.ErrCorrupt) {
				// A sealed or checksummed checkpoint that fails its
				// check is as unusable as one whose own checksum fails:
				// fall back to an older one (docs/ARCHITECTURE.md §8).
				failures = append(failures, fmt.Errorf("%s: %w", names[i], err))
				continue
			}
			return nil, 0, nil, fmt.Errorf("read checkpoint %s: %w", names[i], err)
		}
		h, mapBytes, err := decodeCheckpoint(raw)
		if err == nil && h.generation >= v.sb.Generation {
			return nil, 0, nil, fmt.Errorf("%w (%w): checkpoint %s was written by generation %d, not older than this attach's %d", ErrAttachedElsewhere, ErrFenced, names[i], h.generation, v.sb.Generation)
		}
		if err == nil && h.blockSize != v.o.BlockSize {
			err = fmt.Errorf("checkpoint is for block size %d, volume has %d", h.blockSize, v.o.BlockSize)
		}
		if err == nil && store.CheckpointName(h.watermark) != names[i] {
			err = fmt.Errorf("checkpoint holds watermark %d, its name says otherwise", h.watermark)
		}
		var m *extentmap.Map
		if err == nil {
			m, err = extentmap.UnmarshalBinary(mapBytes)
		}
		if err == nil {
			// The map is the prefix of keys below the watermark: a key at
			// or above it means the checkpoint does not say what it holds.
			m.Objects(func(key, _, _ int64) bool {
				if key >= h.watermark {
					err = fmt.Errorf("checkpoint tracks key %d at or above its watermark %d", key, h.watermark)
				}
				return err == nil
			})
		}
		if err != nil {
			failures = append(failures, fmt.Errorf("%s: %w", names[i], err))
			v.log.Warn().Str("checkpoint", names[i]).Err(err).Msg("checkpoint unusable, falling back to the previous one")
			continue
		}
		v.log.Info().Str("checkpoint", names[i]).Int64("watermark", h.watermark).Msg("loaded checkpoint")
		return m, h.watermark, nil, nil
	}
	return nil, 0, failures, nil
}

// checkpointLoop writes a checkpoint every CheckpointInterval or after
// CheckpointObjects new objects, whichever comes first.
func (v *Volume) checkpointLoop() {
	defer close(v.ckptDone)
	if v.o.SkipCheckpoint {
		<-v.ckptStop
		return
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	last := time.Now()
	for {
		select {
		case <-v.ckptStop:
			return
		case <-tick.C:
		}
		if v.sinceCkpt.Load() == 0 {
			last = time.Now()
			continue
		}
		if v.sinceCkpt.Load() < v.o.CheckpointObjects && time.Since(last) < v.o.CheckpointInterval {
			continue
		}
		if v.Err() != nil {
			continue
		}
		if err := v.Checkpoint(v.bgCtx); err != nil {
			v.log.Warn().Err(err).Msg("periodic checkpoint failed; will retry")
			continue
		}
		last = time.Now()
	}
}
