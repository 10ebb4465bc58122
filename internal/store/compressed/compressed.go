// Package compressed owns compression at the object-store boundary
// (docs/ARCHITECTURE.md §19): a store.Store wrapper that stores data
// objects and checkpoints in independently compressed segments behind a
// small index, so a byte-range read fetches and decodes only the segments
// it covers.
//
// Every object records its own codec; objects of different codecs, and
// objects written before compression was turned on (no header), are all
// readable whatever the configuration says now. Control objects
// (superblock, lease, attach records) are never touched. It sits above
// the sealing layer (compress, then encrypt) and never knows blocks or
// chunks.
package compressed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/maypok86/otter/v2"

	"github.com/bs3/bs3/internal/store"
)

// MarkerName is the object written, once, before the first compressed
// object of a volume. While it is absent every object is known to be
// stored as it is, and reads go straight through without looking for a
// header (docs/ARCHITECTURE.md §19.2). It must never be deleted while
// compressed objects exist.
const MarkerName = store.CompressionMarkerName

// DefaultSegmentSize is the plaintext compressed as one unit, chosen by
// measurement (docs/ARCHITECTURE.md §19.3): the read cache's 64 KiB
// windows, not aligned to segments, fetch the least with it.
const DefaultSegmentSize = 32 << 10

// indexCacheBytes bounds the parsed indexes kept in memory (a 4 MiB
// object in 32 KiB segments takes about 2.3 KiB, so some 7,000 objects,
// 28 GiB of chunks, keep theirs).
const indexCacheBytes = 16 << 20

// maxPooled bounds the buffers kept for reuse: a chunk plus its index.
const maxPooled = 16 << 20

// Options configure a Store.
type Options struct {
	// Codec compresses new objects: "none", "zstd", "lz4" or "s2".
	Codec string
	// Level is "fastest", "default", "better" or "best"; empty = default.
	Level string
	// SegmentSize is the plaintext per segment; 0 = DefaultSegmentSize.
	SegmentSize int
	// AssumeCompressed looks for headers from the start, whatever the
	// marker says: for status and check, which may run beside a daemon
	// that is writing its first compressed objects.
	AssumeCompressed bool
	// frameAll frames every object even when it does not shrink (tests
	// run the conformance suite over framed objects with it).
	frameAll bool
}

// Store compresses the objects of an inner store. It is safe for
// concurrent use.
type Store struct {
	inner store.Store
	o     Options
	codec byte
	shift uint8
	enc   encoder
	dec   decoders
	// framed is set once compressed objects may exist (the marker was
	// found or written, or AssumeCompressed): only then do reads look for a
	// header.
	framed   atomic.Bool
	marker   atomic.Bool // the marker is known to exist
	markerMu sync.Mutex
	// idx caches parsed indexes by name; raw objects are cached only
	// under data names, which are never rewritten with other content
	// (docs/ARCHITECTURE.md §1, the read cache's rule).
	idx  *otter.Cache[string, *index]
	bufs sync.Pool // *[]byte
}

// Open wraps inner. It reads the marker to learn whether compressed
// objects may exist, and writes nothing.
func Open(ctx context.Context, inner store.Store, o Options) (*Store, error) {
	s, err := New(inner, o)
	if err != nil {
		return nil, err
	}
	if o.AssumeCompressed {
		return s, nil
	}
	switch _, err := inner.Size(ctx, MarkerName); {
	case err == nil:
		s.marker.Store(true)
	case errors.Is(err, store.ErrNotFound):
		s.framed.Store(false)
	default:
		return nil, fmt.Errorf("compression: look for the %q object: %w", MarkerName, err)
	}
	return s, nil
}

// New wraps inner without reading the marker: reads look for headers from
// the start (as after Open found the marker).
func New(inner store.Store, o Options) (*Store, error) {
	id, err := codecID(o.Codec)
	if err != nil {
		return nil, err
	}
	if o.SegmentSize == 0 {
		o.SegmentSize = DefaultSegmentSize
	}
	shift, err := shiftOf(o.SegmentSize)
	if err != nil {
		return nil, err
	}
	enc, err := newEncoder(id, o.Level)
	if err != nil {
		return nil, err
	}
	c, err := otter.New(&otter.Options[string, *index]{
		MaximumWeight: indexCacheBytes,
		Weigher:       func(k string, ix *index) uint32 { return uint32(len(k)) + ix.weight() },
	})
	if err != nil {
		return nil, fmt.Errorf("compression: index cache: %w", err)
	}
	s := &Store{inner: inner, o: o, codec: id, shift: shift, enc: enc, idx: c}
	s.framed.Store(true)
	return s, nil
}

// Clear reports whether the name is a control object, always stored and
// read as it is: the superblock, lease and attach records are read before
// anything else is known, and the marker says whether anything else is
// compressed.
func Clear(name string) bool {
	return name == store.SuperblockName || name == store.LeaseName || name == MarkerName ||
		strings.HasPrefix(name, store.AttachPrefix)
}

func corrupt(name string, format string, a ...any) error {
	return fmt.Errorf("%w: %s: %s", store.ErrCorrupt, name, fmt.Sprintf(format, a...))
}

func (s *Store) getBuf(n int) *[]byte {
	if p, ok := s.bufs.Get().(*[]byte); ok && cap(*p) >= n {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n)
	return &b
}

func (s *Store) putBuf(p *[]byte) {
	if cap(*p) <= maxPooled {
		s.bufs.Put(p)
	}
}

// Put compresses body and stores it. An empty body, and with codec
// "none" any body, is stored as it is, as is a body that compression
// does not make smaller; a body that starts with the header magic is
// always framed so that it cannot be misread.
func (s *Store) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	if Clear(name) {
		return s.inner.Put(ctx, name, body, ifAbsent)
	}
	s.idx.Invalidate(name)
	defer s.idx.Invalidate(name)
	if len(body) == 0 || (s.enc == nil && !hasMagic(body) && !s.o.frameAll) {
		return s.inner.Put(ctx, name, body, ifAbsent)
	}
	out, scr := s.getBuf(0), s.getBuf(0)
	defer s.putBuf(out)
	defer s.putBuf(scr)
	*out, *scr = frame(*out, *scr, body, s.codec, s.shift, s.enc)
	if len(*out) >= len(body) && !hasMagic(body) && !s.o.frameAll {
		return s.inner.Put(ctx, name, body, ifAbsent)
	}
	if err := s.ensureMarker(ctx); err != nil {
		return fmt.Errorf("put %s: %w", name, err)
	}
	return s.inner.Put(ctx, name, *out, ifAbsent)
}

var _ store.VectorWriter = (*Store)(nil)

// PutV implements store.VectorWriter. A body stored as it is (codec
// "none", the default, or an empty one) goes through in its pieces, so
// the engine's chunks built in cache windows reach the store without
// being joined; a body to compress or frame is joined first.
func (s *Store) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	if Clear(name) {
		return store.PutPieces(ctx, s.inner, name, body, ifAbsent)
	}
	var head [len(magic)]byte
	n := 0
	for _, p := range body {
		if n == len(head) {
			break
		}
		n += copy(head[n:], p)
	}
	if store.PiecesLen(body) > 0 && (s.enc != nil || hasMagic(head[:n]) || s.o.frameAll) {
		return s.Put(ctx, name, store.Join(body), ifAbsent)
	}
	s.idx.Invalidate(name)
	defer s.idx.Invalidate(name)
	return store.PutPieces(ctx, s.inner, name, body, ifAbsent)
}

// ensureMarker writes the marker before the first compressed object, so
// that "no marker" always means "nothing is compressed".
func (s *Store) ensureMarker(ctx context.Context) error {
	if s.marker.Load() {
		return nil
	}
	s.markerMu.Lock()
	defer s.markerMu.Unlock()
	if s.marker.Load() {
		return nil
	}
	body, err := json.Marshal(struct {
		Format  int       `json:"format"`
		Codec   string    `json:"codec"`
		Created time.Time `json:"created"`
	}{version, codecName(s.codec), time.Now().UTC()})
	if err != nil {
		return fmt.Errorf("encode the %q object: %w", MarkerName, err)
	}
	if err := s.inner.Put(ctx, MarkerName, body, true); err != nil && !errors.Is(err, store.ErrExists) {
		return fmt.Errorf("write the %q object: %w", MarkerName, err)
	}
	// Reads look for headers from now on, before the first compressed
	// object is stored.
	s.framed.Store(true)
	s.marker.Store(true)
	return nil
}

// errStale marks a read whose bytes do not match the index it used: the
// index was cached from an earlier version of the object (refetched
// once), or the object is damaged.
var errStale = errors.New("stored bytes do not match the index")

// lookup returns the index of name, from the cache unless fresh. probe,
// when not nil, holds the object's first bytes as this call read them.
func (s *Store) lookup(ctx context.Context, name string, fresh bool) (ix *index, probe []byte, cached bool, err error) {
	if !fresh {
		if ix, ok := s.idx.GetIfPresent(name); ok {
			return ix, nil, true, nil
		}
	}
	probe = make([]byte, probeSize)
	n, err := s.inner.GetRange(ctx, name, 0, probe)
	if err != nil {
		return nil, nil, false, err
	}
	probe = probe[:n]
	if !hasMagic(probe) {
		if damagedMagic(probe) {
			return nil, nil, false, corrupt(name, "a compressed object whose header magic is damaged")
		}
		ix = &index{raw: true, logical: -1}
		if n < probeSize {
			ix.logical = int64(n) // the probe read it all
		}
		if _, data := store.ParseDataName(name); data {
			s.idx.Set(name, &index{raw: true, logical: -1})
		}
		return ix, probe, false, nil
	}
	if n < headerSize {
		return nil, nil, false, corrupt(name, "%d bytes, shorter than a compression header", n)
	}
	_, _, segs, _, _, err := parseHeader(probe)
	if err != nil {
		return nil, nil, false, corrupt(name, "%v", err)
	}
	head := probe
	if l := indexLen(segs); l > n {
		head = make([]byte, l)
		copy(head, probe)
		m, err := s.inner.GetRange(ctx, name, int64(n), head[n:])
		if err != nil {
			return nil, nil, false, err
		}
		if n+m < l {
			return nil, nil, false, corrupt(name, "the object ends inside its index (%d of %d bytes)", n+m, l)
		}
	}
	if ix, err = parseIndex(head); err != nil {
		return nil, nil, false, corrupt(name, "%v", err)
	}
	s.idx.Set(name, ix)
	return ix, probe, false, nil
}

// damagedMagic reports whether b is a compressed object's start with a
// damaged magic: its header and index verify once the magic is restored.
// Only the magic tells compressed objects from those stored as they are,
// so without this check a flipped bit there would pass the stored bytes
// off as the object's content. (A raw object passes it by chance with
// probability about 2^-32, and only when its bytes also form a
// consistent header.)
func damagedMagic(b []byte) bool {
	if len(b) < headerSize {
		return false
	}
	h := make([]byte, headerSize)
	copy(h, b)
	copy(h, magic)
	_, _, n, _, _, err := parseHeader(h)
	if err != nil || indexLen(n) > len(b) {
		return false
	}
	fixed := append(h, b[headerSize:indexLen(n)]...)
	_, err = parseIndex(fixed)
	return err == nil
}

// GetRange reads the plaintext range [off, off+len(buf)). For a
// compressed object it fetches the covering segments in one inner GET
// and checks each one's CRC32C before copying anything; a mismatch with
// a cached index refetches the index once (the object was replaced), and
// otherwise is an error wrapping store.ErrCorrupt: never wrong bytes.
func (s *Store) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	if Clear(name) || !s.framed.Load() {
		return s.inner.GetRange(ctx, name, off, buf)
	}
	if off < 0 {
		return 0, fmt.Errorf("read %s: negative offset %d", name, off)
	}
	if len(buf) == 0 {
		return s.inner.GetRange(ctx, name, 0, buf)
	}
	for fresh := false; ; fresh = true {
		ix, probe, cached, err := s.lookup(ctx, name, fresh)
		if err != nil {
			if cached || errors.Is(err, store.ErrNotFound) {
				s.idx.Invalidate(name)
			}
			return 0, err
		}
		if ix.raw {
			if probe != nil && (off+int64(len(buf)) <= int64(len(probe)) || ix.logical >= 0) {
				if off >= int64(len(probe)) {
					return 0, nil
				}
				return copy(buf, probe[off:]), nil
			}
			return s.inner.GetRange(ctx, name, off, buf)
		}
		n, err := s.readFramed(ctx, name, ix, probe, off, buf)
		if errors.Is(err, store.ErrNotFound) {
			s.idx.Invalidate(name)
			return 0, err
		}
		if !errors.Is(err, errStale) {
			return n, err
		}
		s.idx.Invalidate(name)
		if !cached {
			return 0, corrupt(name, "%v", err)
		}
	}
}

// readFramed serves a read from a compressed object with index ix.
func (s *Store) readFramed(ctx context.Context, name string, ix *index, probe []byte, off int64, buf []byte) (int, error) {
	if off >= ix.logical {
		return 0, nil
	}
	end := min(off+int64(len(buf)), ix.logical)
	first, last := int(off>>ix.shift), int((end-1)>>ix.shift)
	lo, hi := ix.offs[first], ix.offs[last+1]
	var raw []byte
	if hi <= int64(len(probe)) {
		raw = probe[lo:hi]
	} else {
		p := s.getBuf(int(hi - lo))
		defer s.putBuf(p)
		n, err := s.inner.GetRange(ctx, name, lo, *p)
		if err != nil {
			return 0, err
		}
		if n < len(*p) {
			return 0, fmt.Errorf("%w: the object ends at %d, its index says %d", errStale, lo+int64(n), ix.stored)
		}
		raw = *p
	}
	var tmp *[]byte
	defer func() {
		if tmp != nil {
			s.putBuf(tmp)
		}
	}()
	for i := first; i <= last; i++ {
		segOff := int64(i) << ix.shift
		pl := ix.plainLen(i)
		src := raw[ix.offs[i]-lo : ix.offs[i+1]-lo]
		whole := segOff >= off && segOff+int64(pl) <= end
		var dst []byte
		if whole {
			// Wholly requested: decode straight into the caller's
			// buffer; it is cleared again if the check fails.
			dst = buf[segOff-off : segOff-off+int64(pl)]
		} else {
			if tmp == nil {
				tmp = s.getBuf(1 << ix.shift)
			}
			dst = (*tmp)[:pl]
		}
		if err := s.decodeSegment(ix, i, dst, src); err != nil {
			if whole {
				clear(dst)
			}
			return 0, fmt.Errorf("%w: segment %d (plaintext offset %d): %v", errStale, i, segOff, err)
		}
		if !whole {
			a, b := max(off, segOff), min(end, segOff+int64(pl))
			copy(buf[a-off:b-off], dst[a-segOff:b-segOff])
		}
	}
	return int(end - off), nil
}

func (s *Store) decodeSegment(ix *index, i int, dst, src []byte) error {
	if ix.rawSeg[i] {
		if len(src) != len(dst) {
			return fmt.Errorf("raw segment of %d bytes, want %d", len(src), len(dst))
		}
		copy(dst, src)
	} else if err := s.dec.decode(ix.codec, dst, src); err != nil {
		return err
	}
	if got := crc(dst); got != ix.crcs[i] {
		return fmt.Errorf("CRC32C %08x, recorded %08x", got, ix.crcs[i])
	}
	return nil
}

// Size returns the logical (uncompressed) size. For a compressed object
// it reads the header unless a cached index matches the stored size.
func (s *Store) Size(ctx context.Context, name string) (int64, error) {
	if Clear(name) || !s.framed.Load() {
		return s.inner.Size(ctx, name)
	}
	if ix, ok := s.idx.GetIfPresent(name); ok {
		stored, err := s.inner.Size(ctx, name)
		if err != nil || ix.raw {
			return stored, err
		}
		if stored == ix.stored {
			return ix.logical, nil
		}
	}
	ix, _, _, err := s.lookup(ctx, name, true)
	if err != nil {
		return 0, err
	}
	if ix.raw {
		if ix.logical >= 0 {
			return ix.logical, nil
		}
		return s.inner.Size(ctx, name)
	}
	return ix.logical, nil
}

// List lists the inner store with the sizes as stored: a compressed
// object's logical size is in its header, which a listing does not read
// (callers that need it call Size; docs/ARCHITECTURE.md §19.4). The
// marker is this layer's own and is not listed.
func (s *Store) List(ctx context.Context, prefix string, fn func(name string, size int64) error) error {
	return s.inner.List(ctx, prefix, func(name string, size int64) error {
		if name == MarkerName {
			return nil
		}
		return fn(name, size)
	})
}

// Delete removes the object and forgets its index.
func (s *Store) Delete(ctx context.Context, name string) error {
	s.idx.Invalidate(name)
	defer s.idx.Invalidate(name)
	return s.inner.Delete(ctx, name)
}

// Inner is the store this one wraps.
func (s *Store) Inner() store.Store { return s.inner }
