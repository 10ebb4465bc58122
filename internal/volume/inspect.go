package volume

// Read-only access to the on-bucket records for `bs3 status` and
// `bs3 check` (internal/inspect). Everything here decodes what the
// engine writes with the engine's own decoders, so the tools never carry
// a second copy of the format; nothing here writes to the bucket.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// Lease is the content of the lease object (docs/ARCHITECTURE.md §9).
type Lease = lease

// AttachRecord is the content of an attach record (§6.2).
type AttachRecord = attachRecord

// ClaimRecord is the content of a claim record (§6.4): the generation of
// the attach that wrote it and the end of its window.
type ClaimRecord = claimRecord

// CheckpointHeader is the fixed header of a checkpoint object (§8).
type CheckpointHeader struct {
	Generation uint64
	BlockSize  int64
	Watermark  int64
	MapLen     int64
}

// ReadSmall reads a small object (superblock, lease, attach record,
// checkpoint) whole, consistently even while it is being replaced.
func ReadSmall(ctx context.Context, objs *objproxy.Proxy, name string) ([]byte, error) {
	return readWhole(ctx, objs, name)
}

// DecodeSuperblock decodes a superblock object and checks its format
// version.
func DecodeSuperblock(raw []byte) (Superblock, error) {
	var sb Superblock
	if err := json.Unmarshal(raw, &sb); err != nil {
		return sb, fmt.Errorf("superblock is corrupt: %w", err)
	}
	if sb.Format != FormatVersion && sb.Format != FormatBUSELayout {
		return sb, fmt.Errorf("superblock format version %d is not supported (this bs3 reads versions %d and %d)", sb.Format, FormatBUSELayout, FormatVersion)
	}
	return sb, nil
}

// DecodeLease decodes the lease object.
func DecodeLease(raw []byte) (Lease, error) {
	var l Lease
	if err := json.Unmarshal(raw, &l); err != nil {
		return l, fmt.Errorf("lease is corrupt: %w", err)
	}
	return l, nil
}

// DecodeAttachRecord decodes an attach record.
func DecodeAttachRecord(raw []byte) (AttachRecord, error) {
	var r AttachRecord
	if err := json.Unmarshal(raw, &r); err != nil {
		return r, fmt.Errorf("attach record is corrupt: %w", err)
	}
	return r, nil
}

// DecodeCheckpoint checks a checkpoint object (magic, CRC32C, version,
// length) and returns its header and the serialized map.
func DecodeCheckpoint(raw []byte) (CheckpointHeader, []byte, error) {
	h, mapBytes, err := decodeCheckpoint(raw)
	return CheckpointHeader{Generation: h.generation, BlockSize: h.blockSize, Watermark: h.watermark, MapLen: h.mapLen}, mapBytes, err
}

// LoadCheckpoint decodes a checkpoint the way recovery does (§8): the
// header, the block size, the watermark its name says, the map, and no
// tracked key at or above the watermark.
func LoadCheckpoint(name string, raw []byte, blockSize int64) (CheckpointHeader, *extentmap.Map, error) {
	h, mapBytes, err := DecodeCheckpoint(raw)
	if err != nil {
		return h, nil, err
	}
	if h.BlockSize != blockSize {
		return h, nil, fmt.Errorf("checkpoint is for block size %d, volume has %d", h.BlockSize, blockSize)
	}
	if store.CheckpointName(h.Watermark) != name {
		return h, nil, fmt.Errorf("checkpoint holds watermark %d, its name says otherwise", h.Watermark)
	}
	m, err := extentmap.UnmarshalBinary(mapBytes)
	if err != nil {
		return h, nil, err
	}
	m.Objects(func(key, _, _ int64) bool {
		if key >= h.Watermark {
			err = fmt.Errorf("checkpoint tracks key %d at or above its watermark %d", key, h.Watermark)
		}
		return err == nil
	})
	if err != nil {
		return h, nil, err
	}
	return h, m, nil
}

// ParseCheckpointName returns the watermark a checkpoint name says.
func ParseCheckpointName(name string) (int64, bool) {
	var wm uint64
	if _, err := fmt.Sscanf(name, store.CheckpointPrefix+"%016x", &wm); err != nil || store.CheckpointName(int64(wm)) != name {
		return 0, false
	}
	return int64(wm), true
}

// HeaderKind says what a data key holds.
type HeaderKind int

// Kinds of data keys, as roll-forward reads them (§6.4).
const (
	KeyMissing     HeaderKind = iota // no object
	KeyPlaceholder                   // an empty object
	KeyClaim                         // a claim record
	KeyChunk                         // a chunk whose metadata parses
)

// Header is what ReadHeader found at a data key. Err is set (and Kind is
// KeyChunk) when the object exists but is damaged: shorter than its
// metadata area, a claim record that does not decode, or metadata that
// does not parse.
type Header struct {
	Kind   HeaderKind
	Claim  ClaimRecord
	Parsed chunk.Parsed
	Err    error
}

// ReadHeader reads and classifies the object of key as roll-forward does:
// missing, placeholder, claim record or chunk. A store error is returned
// as the error; damage is reported in Header.Err.
func ReadHeader(ctx context.Context, objs *objproxy.Proxy, prio objproxy.Priority, l chunk.Layout, devSectors uint64, key int64) (Header, error) {
	md := l.MetadataSize()
	buf := make([]byte, md)
	n, err := objs.GetRange(ctx, prio, store.DataName(key), 0, buf)
	if errors.Is(err, store.ErrNotFound) {
		return Header{Kind: KeyMissing}, nil
	}
	if errors.Is(err, store.ErrCorrupt) {
		// A sealed or checksummed object that fails its check: as
		// corrupt as a header that does not parse.
		return Header{Kind: KeyChunk, Err: fmt.Errorf("object %s (key %d) is damaged: %w", store.DataName(key), key, err)}, nil
	}
	if err != nil {
		return Header{}, fmt.Errorf("read header of key %d: %w", key, err)
	}
	if n == 0 {
		return Header{Kind: KeyPlaceholder}, nil
	}
	if int64(n) < md && IsClaimRecord(buf[:n]) {
		c, err := decodeClaim(key, buf[:n])
		if err != nil {
			return Header{Kind: KeyClaim, Err: err}, nil
		}
		return Header{Kind: KeyClaim, Claim: c}, nil
	}
	// A compact object may be shorter than md; Parse reads the layout
	// from its end slot and refuses a short object of the BUSE layout
	// (docs/ARCHITECTURE.md §3).
	p, err := l.Parse(buf[:n], -1, devSectors)
	if err != nil {
		return Header{Kind: KeyChunk, Err: fmt.Errorf("object %s (key %d) is corrupt: %w", store.DataName(key), key, err)}, nil
	}
	return Header{Kind: KeyChunk, Parsed: p}, nil
}

// ItemsGeneration is the highest generation among the items of p.
func ItemsGeneration(p chunk.Parsed) uint64 { return itemsGeneration(p) }

// ApplyChunk records object key and its parsed items in m, exactly as
// roll-forward does (a placeholder or claim record is tracked with no
// blocks).
func ApplyChunk(m *extentmap.Map, l chunk.Layout, key int64, p chunk.Parsed) error {
	v := &Volume{o: Options{BlockSize: l.BlockSize}, layout: l}
	return v.applyItems(m, key, p)
}
