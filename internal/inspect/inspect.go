// Package inspect owns the read-only views of a volume in its bucket:
// `bs3 status` (what the volume is and who holds it) and `bs3 check` (an
// fsck of the on-bucket format and its ordering rules, docs/ARCHITECTURE.md
// §3–§8). It decodes everything with the engine's own decoders
// (internal/volume, internal/chunk, internal/extentmap), never takes the
// lease, never claims a generation and writes nothing, so it is safe
// beside an attached daemon. The only write is Repair's removal of
// leftover probe objects, which are not part of the volume (§15).
package inspect

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/volume"
)

// Fallback is the geometry the configuration gives, used when the
// superblock cannot be read (check still walks the objects with it).
type Fallback struct {
	Size, BlockSize, ChunkSize int64
}

// listing is one pass over every object under the volume's prefix.
type listing struct {
	data        map[int64]int64 // data key → size
	keys        []int64         // data keys, ascending
	checkpoints []string        // ascending by watermark
	ckptSize    map[string]int64
	attach      []string // ascending by generation
	superblock  bool
	lease       bool
	probes      []string // probe objects left behind
	unknown     []string // names bs3 does not write
}

// isProbe: name is one of the S3 store's probe objects (store.ProbeName);
// one left behind by a start that crashed mid-probe is not part of the
// volume.
func isProbe(name string) bool {
	p, _, _ := store.ParseProbeName(name)
	return p
}

func list(ctx context.Context, objs *objproxy.Proxy) (*listing, error) {
	l := &listing{data: make(map[int64]int64), ckptSize: make(map[string]int64)}
	err := objs.List(ctx, objproxy.Low, "", func(name string, size int64) error {
		if k, ok := store.ParseDataName(name); ok {
			l.data[k] = size
			return nil
		}
		switch {
		case name == store.SuperblockName:
			l.superblock = true
		case name == volume.LeaseName:
			l.lease = true
		case strings.HasPrefix(name, store.CheckpointPrefix):
			l.checkpoints = append(l.checkpoints, name)
			l.ckptSize[name] = size
		case strings.HasPrefix(name, store.AttachPrefix):
			l.attach = append(l.attach, name)
		case isProbe(name):
			l.probes = append(l.probes, name)
		default:
			l.unknown = append(l.unknown, name)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list the bucket: %w", err)
	}
	for k := range l.data {
		l.keys = append(l.keys, k)
	}
	sort.Slice(l.keys, func(i, j int) bool { return l.keys[i] < l.keys[j] })
	sort.Strings(l.checkpoints)
	sort.Strings(l.attach)
	return l, nil
}

// LeaseInfo is the lease as a person needs it.
type LeaseInfo struct {
	Present    bool          `json:"present"`
	Readable   bool          `json:"readable"`
	Host       string        `json:"host,omitempty"`
	PID        int           `json:"pid,omitempty"`
	Generation uint64        `json:"generation,omitempty"`
	Counter    uint64        `json:"counter,omitempty"`
	Released   bool          `json:"released"`
	Renewed    time.Time     `json:"renewed,omitzero"`
	Age        time.Duration `json:"-"`
	AgeSeconds float64       `json:"age_seconds"`
	VolumeID   string        `json:"volume_id,omitempty"`
}

func readLease(ctx context.Context, objs *objproxy.Proxy) (LeaseInfo, error) {
	raw, err := volume.ReadSmall(ctx, objs, volume.LeaseName)
	if errors.Is(err, store.ErrNotFound) {
		return LeaseInfo{}, nil
	}
	if err != nil {
		return LeaseInfo{}, fmt.Errorf("read lease: %w", err)
	}
	l, err := volume.DecodeLease(raw)
	if err != nil {
		return LeaseInfo{Present: true}, nil
	}
	age := time.Since(l.Renewed)
	return LeaseInfo{
		Present: true, Readable: true, Host: l.Host, PID: l.PID, Generation: l.Generation,
		Counter: l.Counter, Released: l.Released, Renewed: l.Renewed, Age: age, AgeSeconds: age.Seconds(), VolumeID: l.VolumeID,
	}, nil
}

// ReadLease returns the volume's lease (Present false when there is none).
func ReadLease(ctx context.Context, objs *objproxy.Proxy) (LeaseInfo, error) {
	return readLease(ctx, objs)
}

// readSuperblock returns the superblock, whether one exists, and why it
// is unusable (nil when it is fine).
func readSuperblock(ctx context.Context, objs *objproxy.Proxy) (volume.Superblock, bool, error, error) {
	raw, err := volume.ReadSmall(ctx, objs, store.SuperblockName)
	if errors.Is(err, store.ErrNotFound) {
		return volume.Superblock{}, false, nil, nil
	}
	if err != nil {
		return volume.Superblock{}, false, nil, fmt.Errorf("read superblock: %w", err)
	}
	sb, derr := volume.DecodeSuperblock(raw)
	return sb, true, derr, nil
}

// latestGeneration is the highest generation claimed: the newest attach
// record or the superblock's, whichever is higher (§6.2).
func latestGeneration(l *listing, sb volume.Superblock) uint64 {
	g := sb.Generation
	for _, name := range l.attach {
		if ag, ok := store.ParseAttachName(name); ok {
			g = max(g, ag)
		}
	}
	return g
}

// usable reports whether l is a geometry objects can be parsed with.
func usable(l chunk.Layout, size int64) bool {
	return l.BlockSize >= chunk.SectorSize && l.BlockSize%chunk.SectorSize == 0 &&
		l.ChunkSize >= l.BlockSize && l.ChunkSize%l.BlockSize == 0 && size > 0
}

// layoutOf is the chunk geometry of the volume (superblock first).
func layoutOf(sb volume.Superblock, ok bool, fb Fallback) (chunk.Layout, int64) {
	if ok && sb.BlockSize > 0 && sb.ChunkSize > 0 {
		return chunk.Layout{ChunkSize: sb.ChunkSize, BlockSize: sb.BlockSize}, sb.Size
	}
	return chunk.Layout{ChunkSize: fb.ChunkSize, BlockSize: fb.BlockSize}, fb.Size
}
