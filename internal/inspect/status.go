package inspect

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/volume"
)

// Status is what `bs3 status` reports.
type Status struct {
	VolumeID   string    `json:"volume_id"`
	Superblock bool      `json:"superblock"`
	Created    time.Time `json:"created,omitzero"`
	Size       int64     `json:"size"`
	BlockSize  int64     `json:"block_size"`
	ChunkSize  int64     `json:"chunk_size"`
	// Objects is how the volume's objects are protected: "encrypted
	// (<cipher>)", "checksummed (none-crc32c)" or "plaintext, no
	// checksums" (docs/ARCHITECTURE.md §16).
	Objects string `json:"objects,omitempty"`
	// Generation is the highest generation ever claimed (attach records,
	// docs/ARCHITECTURE.md §6.2); the attached daemon, if any, runs it.
	Generation  uint64           `json:"generation"`
	Lease       LeaseInfo        `json:"lease"`
	Checkpoints []CheckpointInfo `json:"checkpoints"`
	// Watermark is the newest checkpoint's: every key below it is in
	// that checkpoint. The attached daemon's own watermark is higher.
	Watermark int64 `json:"watermark"`
	// DeleteFloor is the oldest checkpoint's watermark (§6.3).
	DeleteFloor int64 `json:"delete_floor"`
	// Objects counts the data objects: with data, placeholders (empty)
	// and claim records; Bytes is their total size.
	DataObjects  int64 `json:"data_objects"`
	DataBytes    int64 `json:"data_bytes"`
	Placeholders int64 `json:"placeholders"`
	ClaimRecords int64 `json:"claim_records"`
	// FirstKey and LastKey bound the data keys present (-1: none).
	FirstKey int64 `json:"first_key"`
	LastKey  int64 `json:"last_key"`
	// Live fraction estimate from the newest readable checkpoint: blocks
	// still referenced over blocks stored in the objects it tracks.
	LiveBlocks   int64   `json:"live_blocks"`
	StoredBlocks int64   `json:"stored_blocks"`
	LiveFraction float64 `json:"live_fraction"`
	LiveFrom     string  `json:"live_from,omitempty"`
	// Notes are things a person should know (unreadable records, leftovers).
	Notes []string `json:"notes,omitempty"`
}

// CheckpointInfo describes one checkpoint object.
type CheckpointInfo struct {
	Name       string `json:"name"`
	Watermark  int64  `json:"watermark"`
	Bytes      int64  `json:"bytes"`
	Generation uint64 `json:"generation,omitempty"`
	// Error is why the checkpoint is unusable ("" when it decodes).
	Error string `json:"error,omitempty"`
}

// ReadStatus reads the volume's state from the bucket without changing
// anything. fb gives the geometry when there is no usable superblock.
func ReadStatus(ctx context.Context, objs *objproxy.Proxy, fb Fallback) (Status, error) {
	st := Status{FirstKey: -1, LastKey: -1}
	l, err := list(ctx, objs)
	if err != nil {
		return st, err
	}
	sb, ok, derr, err := readSuperblock(ctx, objs)
	if err != nil {
		return st, err
	}
	switch {
	case !ok:
		st.Notes = append(st.Notes, "no superblock: the volume has not been created yet, or its superblock was lost (bs3 check tells which)")
	case derr != nil:
		st.Notes = append(st.Notes, derr.Error())
	default:
		st.Superblock = true
		st.VolumeID, st.Created, st.Size, st.BlockSize, st.ChunkSize = sb.VolumeID, sb.Created, sb.Size, sb.BlockSize, sb.ChunkSize
		switch {
		case sb.Encryption.Encrypted():
			st.Objects = "encrypted (" + sb.Encryption.Cipher + ")"
		case sb.Encryption != nil:
			st.Objects = "checksummed (" + sb.Encryption.Cipher + "), not encrypted"
		default:
			st.Objects = "plaintext, no checksums"
		}
	}
	st.Generation = latestGeneration(l, sb)
	if st.Lease, err = readLease(ctx, objs); err != nil {
		return st, err
	}
	if st.Lease.Present && !st.Lease.Readable {
		st.Notes = append(st.Notes, "the lease object is unreadable")
	}
	layout, size := layoutOf(sb, st.Superblock, fb)
	md := int64(0) // unknown geometry: claim records are not told apart
	if usable(layout, size) {
		md = layout.MetadataSize()
	}
	for _, k := range l.keys {
		size := l.data[k]
		st.DataObjects++
		st.DataBytes += size
		if st.FirstKey < 0 {
			st.FirstKey = k
		}
		st.LastKey = k
		switch {
		case size == 0:
			st.Placeholders++
		case size < md:
			// Only claim records, and compact chunks, are shorter than a
			// metadata area.
			head := make([]byte, volume.ClaimMagicLen)
			n, err := objs.GetRange(ctx, objproxy.Low, store.DataName(k), 0, head)
			if err != nil && !errors.Is(err, store.ErrNotFound) {
				return st, fmt.Errorf("read key %d: %w", k, err)
			}
			if volume.IsClaimRecord(head[:n]) {
				st.ClaimRecords++
			} else if sb.Format < volume.FormatVersion {
				// From format 2 on, compact chunks are this short too
				// (docs/ARCHITECTURE.md §3).
				st.Notes = append(st.Notes, fmt.Sprintf("key %d (%s) is %d bytes, shorter than a chunk's metadata area: damaged (run bs3 check)", k, store.DataName(k), size))
			}
		}
	}
	if len(l.checkpoints) > 0 {
		st.DeleteFloor, _ = volume.ParseCheckpointName(l.checkpoints[0])
	}
	for _, name := range l.checkpoints {
		wm, _ := volume.ParseCheckpointName(name)
		st.Checkpoints = append(st.Checkpoints, CheckpointInfo{Name: name, Watermark: wm, Bytes: l.ckptSize[name]})
	}
	// The newest checkpoint that loads gives the watermark and the live
	// fraction; older ones are only decoded when a newer one fails.
	for i := len(st.Checkpoints) - 1; i >= 0; i-- {
		c := &st.Checkpoints[i]
		raw, err := volume.ReadSmall(ctx, objs, c.Name)
		if errors.Is(err, store.ErrNotFound) {
			c.Error = "deleted while listed (a newer checkpoint replaced it)"
			continue
		}
		if err != nil {
			return st, fmt.Errorf("read checkpoint %s: %w", c.Name, err)
		}
		h, m, err := volume.LoadCheckpoint(c.Name, raw, layout.BlockSize)
		c.Generation = h.Generation
		if err != nil {
			c.Error = err.Error()
			continue
		}
		st.Watermark = c.Watermark
		st.LiveFrom = c.Name
		m.Objects(func(_, live, total int64) bool {
			if total > 0 {
				st.LiveBlocks += min(live, total)
				st.StoredBlocks += total
			}
			return true
		})
		if st.StoredBlocks > 0 {
			st.LiveFraction = float64(st.LiveBlocks) / float64(st.StoredBlocks)
		}
		break
	}
	if len(l.probes) > 0 {
		st.Notes = append(st.Notes, fmt.Sprintf("%d probe object(s) left by interrupted starts (bs3 check --repair removes old ones)", len(l.probes)))
	}
	if len(l.unknown) > 0 {
		st.Notes = append(st.Notes, fmt.Sprintf("%d object(s) under the prefix that bs3 does not write, e.g. %q", len(l.unknown), l.unknown[0]))
	}
	return st, nil
}

// WriteText prints st for a person.
func (st Status) WriteText(w io.Writer) error {
	var b strings.Builder
	if st.Superblock {
		fmt.Fprintf(&b, "volume        %s (created %s)\n", st.VolumeID, st.Created.Format(time.RFC3339))
		fmt.Fprintf(&b, "size          %d bytes (%s), block size %d, chunk size %s\n", st.Size, human(st.Size), st.BlockSize, human(st.ChunkSize))
		fmt.Fprintf(&b, "objects       %s\n", st.Objects)
	} else {
		fmt.Fprintf(&b, "volume        (no usable superblock)\n")
	}
	fmt.Fprintf(&b, "generation    %d\n", st.Generation)
	switch {
	case !st.Lease.Present:
		fmt.Fprintf(&b, "lease         none (never attached)\n")
	case !st.Lease.Readable:
		fmt.Fprintf(&b, "lease         unreadable\n")
	default:
		state := "held"
		if st.Lease.Released {
			state = "released"
		}
		fmt.Fprintf(&b, "lease         %s by host %s pid %d, generation %d, renewed %s ago (counter %d)\n",
			state, st.Lease.Host, st.Lease.PID, st.Lease.Generation, st.Lease.Age.Round(time.Second), st.Lease.Counter)
	}
	fmt.Fprintf(&b, "watermark     %d (newest checkpoint), delete floor %d\n", st.Watermark, st.DeleteFloor)
	if len(st.Checkpoints) == 0 {
		fmt.Fprintf(&b, "checkpoints   none\n")
	}
	for i, c := range st.Checkpoints {
		label := "checkpoints"
		if i > 0 {
			label = ""
		}
		line := fmt.Sprintf("%-13s %s  watermark %d, %s", label, c.Name, c.Watermark, human(c.Bytes))
		if c.Generation > 0 {
			line += fmt.Sprintf(", generation %d", c.Generation)
		}
		if c.Error != "" {
			line += "  UNUSABLE: " + c.Error
		}
		fmt.Fprintln(&b, line)
	}
	keys := "none"
	if st.FirstKey >= 0 {
		keys = fmt.Sprintf("%d … %d", st.FirstKey, st.LastKey)
	}
	fmt.Fprintf(&b, "data objects  %d, %s (keys %s); %d placeholders, %d claim records\n",
		st.DataObjects, human(st.DataBytes), keys, st.Placeholders, st.ClaimRecords)
	if st.LiveFrom != "" {
		fmt.Fprintf(&b, "live data     %.1f%% (%d of %d stored blocks, as of %s)\n",
			100*st.LiveFraction, st.LiveBlocks, st.StoredBlocks, st.LiveFrom)
	} else {
		fmt.Fprintf(&b, "live data     unknown (no readable checkpoint)\n")
	}
	for _, n := range st.Notes {
		fmt.Fprintf(&b, "note          %s\n", n)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// human formats a byte count with a binary unit.
func human(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	f, u := float64(n), 0
	for f >= unit && u < 6 {
		f /= unit
		u++
	}
	return fmt.Sprintf("%.1f %ciB", f, "KMGTPE"[u-1])
}
