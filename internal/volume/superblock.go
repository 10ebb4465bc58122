package volume

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/sealed"
)

// FormatVersion is the newest on-bucket format this code writes and
// reads. Version 2 adds compact data objects (docs/ARCHITECTURE.md §3); a
// volume moves to it at the first attach that writes them, so that a bs3
// that only knows version 1 (and would misread them) refuses to attach.
const FormatVersion = 2

// FormatBUSELayout is the format whose data objects all have the whole
// metadata area (the BUSE layout); it is still read.
const FormatBUSELayout = 1

// Superblock is the volume's identity and geometry, one small JSON object
// per volume. Generation is bumped at every attach and folded into the high
// bits of every seqno written during that attach, so that writes of a later
// attach win over writes of an earlier one (docs/ARCHITECTURE.md §4). The
// attach records (store.AttachName) are the authority on generations; the
// superblock copy is for people and tools.
type Superblock struct {
	Format     int       `json:"format"`
	VolumeID   string    `json:"volume_id"`
	Size       int64     `json:"size"`
	BlockSize  int64     `json:"block_size"`
	ChunkSize  int64     `json:"chunk_size"`
	Created    time.Time `json:"created"`
	Generation uint64    `json:"generation"`
	// MaxInflight is the most chunks this attach may have in flight at
	// once; after a crash, keys up to this far past the first gap may
	// exist and are deleted by the next attach.
	MaxInflight int64 `json:"max_inflight"`
	// Encryption is set on an encrypted volume: how the configured key
	// opens the data key that seals its objects (docs/ARCHITECTURE.md §16).
	Encryption *sealed.Record `json:"encryption,omitempty"`
}

// GenerationBits is how many low bits of a stored seqno belong to the
// per-attach counter; the generation occupies the bits above.
const GenerationBits = 40

// maxGeneration keeps generation<<GenerationBits inside a uint64.
const maxGeneration = 1<<(64-GenerationBits) - 1

func newVolumeID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		// crypto/rand does not fail on Linux; a fixed id only weakens
		// diagnostics, never data.
		return "unknown"
	}
	return hex.EncodeToString(b[:])
}

// readSuperblock reads the superblock and checks it against the options
// (growing or shrinking the size when asked), or builds a new one when
// there is none and the bucket holds no volume data. Nothing is written.
func readSuperblock(ctx context.Context, objs *objproxy.Proxy, o Options) (Superblock, bool, error) {
	var sb Superblock
	raw, err := readWhole(ctx, objs, store.SuperblockName)
	switch {
	case errors.Is(err, store.ErrNotFound):
		if err := refuseDataWithoutSuperblock(ctx, objs); err != nil {
			return sb, false, err
		}
		return Superblock{
			Format:    FormatBUSELayout,
			VolumeID:  newVolumeID(),
			Size:      o.Size,
			BlockSize: o.BlockSize,
			ChunkSize: o.ChunkSize,
			Created:   time.Now().UTC(),
			// Recorded now, written with the superblock before any
			// sealed object exists.
			Encryption: o.Encryption,
		}, true, nil
	case err != nil:
		return sb, false, fmt.Errorf("read superblock: %w", err)
	}
	if err := json.Unmarshal(raw, &sb); err != nil {
		return sb, false, fmt.Errorf("superblock is corrupt (%v): refusing to attach; inspect the %q object", err, store.SuperblockName)
	}
	if sb.Format != FormatVersion && sb.Format != FormatBUSELayout {
		return sb, false, fmt.Errorf("superblock format version %d is not supported (this bs3 reads versions %d and %d): use a newer bs3", sb.Format, FormatBUSELayout, FormatVersion)
	}
	if err := checkEncryption(sb, o); err != nil {
		return sb, false, err
	}
	if sb.BlockSize != o.BlockSize {
		return sb, false, fmt.Errorf("volume has block_size %d but the configuration says %d: set block_size = %d", sb.BlockSize, o.BlockSize, sb.BlockSize)
	}
	if sb.ChunkSize != o.ChunkSize {
		return sb, false, fmt.Errorf("volume has write.chunk_size %d MiB but the configuration says %d MiB: set write.chunk_size = %d", sb.ChunkSize>>20, o.ChunkSize>>20, sb.ChunkSize>>20)
	}
	switch {
	case o.Size > sb.Size:
		o.Logger.Info().Int64("old_size", sb.Size).Int64("new_size", o.Size).Msg("growing volume")
		sb.Size = o.Size
	case o.Size < sb.Size && !o.Shrink:
		return sb, false, fmt.Errorf("volume is %d bytes but size asks for %d: shrinking loses the data past the new end; pass --shrink to do it anyway, or set size back", sb.Size, o.Size)
	case o.Size < sb.Size:
		o.Logger.Warn().Int64("old_size", sb.Size).Int64("new_size", o.Size).Msg("shrinking volume (--shrink)")
		sb.Size = o.Size
	}
	return sb, false, nil
}

// errStopListing ends a listing early; it never leaves this file.
var errStopListing = errors.New("stop listing")

// refuseDataWithoutSuperblock fails when the bucket holds data objects or
// checkpoints but no superblock (deleted by hand or by a lifecycle rule).
// Creating a new volume there would start again at generation 1 under
// the old objects, and old writes could win over new ones. Attach
// records, the lease and the write probe alone do not count: a first
// attach that crashed before writing the superblock leaves only those.
func refuseDataWithoutSuperblock(ctx context.Context, objs *objproxy.Proxy) error {
	var found string
	err := objs.List(ctx, objproxy.High, "", func(name string, _ int64) error {
		if _, ok := store.ParseDataName(name); ok || strings.HasPrefix(name, store.CheckpointPrefix) {
			found = name
			return errStopListing
		}
		return nil
	})
	if err != nil && !errors.Is(err, errStopListing) {
		return fmt.Errorf("superblock is missing; listing the bucket to see whether it holds volume data: %w", err)
	}
	if found != "" {
		return fmt.Errorf("the superblock is missing but the bucket holds volume data (e.g. %q): refusing to create a new volume over it, nothing was changed; restore the %q object (from a backup or an older object version), or point s3.bucket/s3.prefix at an empty location for a new volume", found, store.SuperblockName)
	}
	return nil
}

// writeSuperblock stores sb. A new volume's superblock is created with
// ifAbsent (when the store has conditional writes), so two daemons
// creating one volume at once cannot both succeed.
func writeSuperblock(ctx context.Context, objs *objproxy.Proxy, sb Superblock, created, conditional bool) error {
	body, err := json.MarshalIndent(sb, "", "  ")
	if err != nil {
		return fmt.Errorf("encode superblock: %w", err)
	}
	if err := objs.Put(ctx, objproxy.High, store.SuperblockName, body, created && conditional); err != nil {
		if errors.Is(err, store.ErrExists) {
			return fmt.Errorf("%w: another bs3 created this volume at the same moment (%v)", ErrAttachedElsewhere, err)
		}
		return fmt.Errorf("write superblock: %w", err)
	}
	return nil
}

// readWhole reads a small object completely. The lease and superblock
// are replaced in place while other daemons read them, so the length from
// Size may belong to another version than the GET that follows: read with
// room to spare and take what one GET returned, which is always a single
// whole version. A buffer filled to the brim may have cut a longer
// version short, so that read is repeated with a larger buffer.
func readWhole(ctx context.Context, objs *objproxy.Proxy, name string) ([]byte, error) {
	size, err := objs.Size(ctx, objproxy.High, name)
	if err != nil {
		return nil, err
	}
	room := size + size/4 + 4096
	for attempt := 0; attempt < 8; attempt++ {
		buf := make([]byte, room)
		n, err := objs.GetRange(ctx, objproxy.High, name, 0, buf)
		if err != nil {
			return nil, err
		}
		if int64(n) < room {
			return buf[:n], nil
		}
		room *= 2
	}
	return nil, fmt.Errorf("read %s: the object kept growing past %d bytes while it was read", name, room)
}

// checkEncryption refuses an attach whose store does not match the
// volume's encryption: the second line of defence behind sealed.Open,
// which main calls first (docs/ARCHITECTURE.md §16.3).
func checkEncryption(sb Superblock, o Options) error {
	switch {
	case sb.Encryption.Encrypted() && !o.Encryption.Encrypted():
		return errors.New("volume is encrypted: set [encryption] key_file or passphrase_file")
	case !sb.Encryption.Encrypted() && o.Encryption.Encrypted():
		return errors.New("this volume is not encrypted; remove [encryption] or use a new bucket/prefix")
	case sb.Encryption != nil && o.Encryption == nil:
		return errors.New("this volume's objects carry checksums but the store was opened without them (sealed.Open was not called): refusing to attach")
	case sb.Encryption == nil && o.Encryption != nil:
		return errors.New("the store frames objects with checksums but the volume was created without them: refusing to attach")
	case sb.Encryption != nil && !bytes.Equal(sb.Encryption.SealID, o.Encryption.SealID):
		return errors.New("the volume's superblock names another encryption seal than the key was opened with (was the superblock replaced?): refusing to attach")
	}
	return nil
}
