// Package store defines the object store boundary of bs3: a flat namespace
// of immutable objects addressed by name, and the naming of the objects a
// volume keeps there (data objects by key, superblock, checkpoints).
//
// A store never knows about blocks, chunks or the extent map; it moves bytes.
// Implementations live in sub-packages (s3, dir, mem) and wrappers (prefix,
// faulty). Every implementation must pass the conformance suite in
// store/storetest.
package store

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Errors every implementation maps its own conditions to, so callers can
// decide with errors.Is whether to retry.
var (
	// ErrNotFound: the named object does not exist.
	ErrNotFound = errors.New("object not found")
	// ErrExists: a conditional Put (ifAbsent) found the name taken
	// (HTTP 412). Another writer owns the name; retrying cannot help.
	ErrExists = errors.New("object already exists")
	// ErrConflict: a conditional Put raced with another request on the
	// same name (HTTP 409). The caller may retry.
	ErrConflict = errors.New("conflicting concurrent write")
	// ErrCorrupt: the object's bytes fail their integrity check (a sealed
	// object whose tag does not verify, or whose length is impossible).
	// The bytes are never returned; a retry helps only when the damage
	// happened in transit.
	ErrCorrupt = errors.New("object is damaged")
)

// Store is a flat object namespace. All methods are safe for concurrent use.
type Store interface {
	// Put stores body under name, replacing any object of that name unless
	// ifAbsent is set, in which case an existing object yields ErrExists.
	// The store must not retain body after Put returns.
	Put(ctx context.Context, name string, body []byte, ifAbsent bool) error

	// GetRange reads up to len(buf) bytes of the object starting at off into
	// buf and returns how many were read. Fewer than len(buf) bytes are
	// returned only when the object ends first (0 when off is at or past the
	// end); a missing object yields ErrNotFound.
	GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error)

	// Size returns the object's length in bytes, or ErrNotFound.
	Size(ctx context.Context, name string) (int64, error)

	// List calls fn for every object whose name starts with prefix, in
	// lexical order of names. An error from fn stops the listing and is
	// returned.
	List(ctx context.Context, prefix string, fn func(name string, size int64) error) error

	// Delete removes the object. Deleting a missing object is not an error.
	Delete(ctx context.Context, name string) error
}

// VectorReader is a Store that reads one range into several buffers with
// one request (for S3, one GET), so that a caller can read straight into
// the buffers it keeps instead of copying out of one (the read cache's
// windows, docs/ARCHITECTURE.md §1). Wrappers that transform bytes
// (compression, encryption) do not implement it.
type VectorReader interface {
	Store
	// GetRangeV is GetRange into the concatenation of bufs: it fills them
	// in order and returns the number of bytes read, fewer than their
	// total only when the object ends first.
	GetRangeV(ctx context.Context, name string, off int64, bufs [][]byte) (int, error)
}

// VectorWriter is a Store that stores a body given in pieces with one
// request, so that a caller can upload the buffers it goes on to keep
// instead of joining them first: the engine uploads a chunk whose data
// lies in read-cache windows and hands those windows to the cache
// (docs/ARCHITECTURE.md §18). Every store and wrapper bs3 has implements
// it (the compressed store joins the pieces only for a body it
// compresses); PutPieces joins them for a store that does not.
type VectorWriter interface {
	Store
	// PutV is Put of the concatenation of body's pieces. The store must
	// not retain the pieces after PutV returns.
	PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error
}

// PutPieces stores the concatenation of body under name: with one PutV
// when s is a VectorWriter, otherwise joined into one buffer (a copy)
// for Put.
func PutPieces(ctx context.Context, s Store, name string, body [][]byte, ifAbsent bool) error {
	if v, ok := s.(VectorWriter); ok {
		return v.PutV(ctx, name, body, ifAbsent)
	}
	return s.Put(ctx, name, Join(body), ifAbsent)
}

// Join returns the concatenation of pieces in one new buffer (the one
// piece itself when there is only one).
func Join(pieces [][]byte) []byte {
	if len(pieces) == 1 {
		return pieces[0]
	}
	out := make([]byte, 0, PiecesLen(pieces))
	for _, p := range pieces {
		out = append(out, p...)
	}
	return out
}

// PiecesLen is the total length of pieces.
func PiecesLen(pieces [][]byte) int {
	n := 0
	for _, p := range pieces {
		n += len(p)
	}
	return n
}

type bodyCRCKey struct{}

type bodyCRC struct {
	first *byte
	n     int
	crc   uint32
}

// WithBodyCRC32C returns ctx carrying the CRC32C of body, for a Put of
// exactly that slice: a store that sends a CRC32C payload checksum uses it
// instead of reading body again. A wrapper that puts other bytes (a
// compressed or encrypted body) puts another slice, which BodyCRC32C does
// not match.
func WithBodyCRC32C(ctx context.Context, body []byte, crc uint32) context.Context {
	if len(body) == 0 {
		return ctx
	}
	return context.WithValue(ctx, bodyCRCKey{}, bodyCRC{first: &body[0], n: len(body), crc: crc})
}

// BodyCRC32C returns the CRC32C ctx carries for body: only for the very
// slice given to WithBodyCRC32C (same first byte, same length).
func BodyCRC32C(ctx context.Context, body []byte) (uint32, bool) {
	c, ok := ctx.Value(bodyCRCKey{}).(bodyCRC)
	if !ok || len(body) == 0 || c.first != &body[0] || c.n != len(body) {
		return 0, false
	}
	return c.crc, true
}

// WithPiecesCRC32C is WithBodyCRC32C for a body given in pieces (PutV):
// it matches the same pieces (same first byte, same total length), never
// a joined copy of them.
func WithPiecesCRC32C(ctx context.Context, body [][]byte, crc uint32) context.Context {
	if len(body) == 0 || len(body[0]) == 0 {
		return ctx
	}
	return context.WithValue(ctx, bodyCRCKey{}, bodyCRC{first: &body[0][0], n: PiecesLen(body), crc: crc})
}

// PiecesCRC32C returns the CRC32C ctx carries for body, given in pieces:
// only for the pieces given to WithPiecesCRC32C.
func PiecesCRC32C(ctx context.Context, body [][]byte) (uint32, bool) {
	c, ok := ctx.Value(bodyCRCKey{}).(bodyCRC)
	if !ok || len(body) == 0 || len(body[0]) == 0 || c.first != &body[0][0] || c.n != PiecesLen(body) {
		return 0, false
	}
	return c.crc, true
}

// DataName is the object name of data key k: the low 32 bits first, so that
// consecutive keys spread over many name prefixes (S3 rate limits are per
// prefix), then the high 32 bits.
func DataName(k int64) string {
	u := uint64(k)
	return fmt.Sprintf("%08x/%08x", u&0xffffffff, u>>32)
}

// ParseDataName is the inverse of DataName; ok is false for names that are
// not data object names (superblock, checkpoints).
func ParseDataName(name string) (k int64, ok bool) {
	if len(name) != 17 || name[8] != '/' {
		return 0, false
	}
	var lo, hi uint64
	if _, err := fmt.Sscanf(name, "%08x/%08x", &lo, &hi); err != nil {
		return 0, false
	}
	if DataName(int64(hi<<32|lo)) != name {
		return 0, false
	}
	return int64(hi<<32 | lo), true
}

// Names of the volume's metadata objects. They cannot collide with data
// names, which always have a '/' at position 8.
const (
	SuperblockName   = "superblock"
	CheckpointPrefix = "checkpoint/"
	AttachPrefix     = "attach/"
	// LeaseName is the object an attached daemon renews to say it is
	// alive (docs/ARCHITECTURE.md §9).
	LeaseName = "lease"
	// CompressionMarkerName is written once before the first compressed
	// object (internal/store/compressed, docs/ARCHITECTURE.md §19).
	CompressionMarkerName = "compression"
)

// Probe objects: the S3 store's start-up probes (conditional writes,
// payload checksums) each write an object of their own per start, named
// <kind>-probe-<pid>-<unix nanoseconds>, so that two daemons probing at
// once do not see each other's object. They are not part of the volume;
// one left by a start that crashed mid-probe is removed by
// `bs3 check --repair` once its name says it is old (docs/ARCHITECTURE.md
// §15).
const (
	ConditionalWriteProbe = "conditional-write"
	PayloadChecksumProbe  = "payload-checksum"
)

// ProbeKinds are the kinds of probe objects.
var ProbeKinds = []string{ConditionalWriteProbe, PayloadChecksumProbe}

// ProbeName names a probe object of kind written by process pid at t.
func ProbeName(kind string, pid int, t time.Time) string {
	return fmt.Sprintf("%s-probe-%d-%d", kind, pid, t.UnixNano())
}

// ParseProbeName reports whether name is a probe object and, when its
// name carries one, when it was written (ok false: a probe object with a
// malformed time, which nothing may assume old).
func ParseProbeName(name string) (isProbe bool, t time.Time, ok bool) {
	for _, k := range ProbeKinds {
		if !strings.HasPrefix(name, k+"-probe-") {
			continue
		}
		i := strings.LastIndexByte(name, '-')
		ns, err := strconv.ParseInt(name[i+1:], 10, 64)
		if err != nil || ns <= 0 {
			return true, time.Time{}, false
		}
		return true, time.Unix(0, ns), true
	}
	return false, time.Time{}, false
}

// AttachName names the record that claims generation g for one attach.
// It is created with ifAbsent, so of two daemons attaching at once only
// one gets a generation; names sort by generation.
func AttachName(g uint64) string {
	return fmt.Sprintf("%s%016x", AttachPrefix, g)
}

// ParseAttachName is the inverse of AttachName.
func ParseAttachName(name string) (g uint64, ok bool) {
	if len(name) != len(AttachPrefix)+16 {
		return 0, false
	}
	if _, err := fmt.Sscanf(name, AttachPrefix+"%016x", &g); err != nil || AttachName(g) != name {
		return 0, false
	}
	return g, true
}

// CheckpointName names the checkpoint that covers every key below
// watermark. Names sort by watermark, so the newest is listed last.
func CheckpointName(watermark int64) string {
	return fmt.Sprintf("%s%016x", CheckpointPrefix, uint64(watermark))
}
