// Package sealed owns encryption at rest and end-to-end integrity at the
// object-store boundary (docs/ARCHITECTURE.md §16): a store.Store wrapper
// that seals every object carrying user data or its metadata (data
// objects, placeholders, claim records, checkpoints) with an AEAD, and the
// key hierarchy (a key file or an Argon2id-stretched passphrase wraps a
// random data key recorded in the superblock).
//
// It knows object names only to leave the control objects (superblock,
// lease, attach records) in the clear, since they must be readable before
// the key is known and hold no user data. It never knows blocks or chunks.
package sealed

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"strings"
	"sync"

	"github.com/maypok86/otter/v2"

	"github.com/bs3/bs3/internal/store"
)

// Segment geometry (docs/ARCHITECTURE.md §16.1). Every 4 KiB of plaintext
// is stored as salt | ciphertext | tag; the last segment may be shorter
// and an empty object is one empty segment.
const (
	SegmentSize = 4096 // plaintext bytes per segment
	saltSize    = 16
	tagSize     = 16
	// Overhead is the stored bytes a segment adds to its plaintext.
	Overhead   = saltSize + tagSize
	storedSize = SegmentSize + Overhead
)

// subkeyInfo is the HKDF info of per-object subkeys; adPrefix starts the
// associated data of every segment. Both name the format version.
const (
	subkeyInfo = "bs3 object v1"
	adPrefix   = "bs3seal1"
)

// suite turns an object's salt into the AEAD and the nonce of each
// segment. Production uses aesSuite; the benchmark compares others
// through the same code.
type suite interface {
	aead(salt []byte) (cipher.AEAD, error)
	// nonce writes the nonce of segment i of the object with salt into n
	// and returns it.
	nonce(n []byte, salt []byte, i uint64) []byte
}

// aesSuite is AES-256-GCM under a per-object subkey HKDF-SHA256(dataKey,
// salt). The nonce is the segment index: unique under one subkey because
// the salt, hence the subkey, is new for every object write, so no
// (key, nonce) pair repeats without a 128-bit random collision.
type aesSuite struct{ dataKey []byte }

func (s aesSuite) aead(salt []byte) (cipher.AEAD, error) {
	sub, err := hkdf.Key(sha256.New, s.dataKey, salt, subkeyInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("derive object subkey: %w", err)
	}
	b, err := aes.NewCipher(sub)
	if err != nil {
		return nil, fmt.Errorf("object cipher: %w", err)
	}
	return cipher.NewGCM(b)
}

func (aesSuite) nonce(n []byte, _ []byte, i uint64) []byte {
	n = n[:12]
	clear(n[:4])
	binary.BigEndian.PutUint64(n[4:], i)
	return n
}

// Store seals the objects of an inner store. It is safe for concurrent use.
type Store struct {
	inner store.Store
	suite suite
	seal  [16]byte // the volume's seal id, bound into every segment
	// aeads caches the AEAD of recently read objects by salt, so a run
	// of small reads of one object derives its subkey once.
	aeads *otter.Cache[[saltSize]byte, cipher.AEAD]
	bufs  sync.Pool // *[]byte scratch for sealed bytes
	// failure says what a segment that does not open failed.
	failure string
	// checksumOnly: the crcSuite framing, whose segment bodies are the
	// plaintext, so puts send the caller's bytes (framed.go).
	checksumOnly bool
	// cacheKey seals the read cache's disk files (cachekey.go); nil for
	// a store built on a benchmark suite or the checksum-only framing.
	cacheKey []byte
}

// maxPooled bounds the buffers kept for reuse: a chunk plus its overhead
// fits; a rare large checkpoint is not kept alive by the pool.
const maxPooled = 16 << 20

// aeadCacheEntries bounds the subkey cache (a GCM state is under 1 KiB).
const aeadCacheEntries = 1024

// New returns a store that seals the objects of inner with dataKey (32
// bytes) and binds them to volumeSeal (the superblock's seal id, 16
// bytes), so an object cannot be replayed into another volume.
func New(inner store.Store, dataKey []byte, volumeSeal []byte) (*Store, error) {
	if len(dataKey) != 32 {
		return nil, fmt.Errorf("sealed store: data key is %d bytes, want 32", len(dataKey))
	}
	s, err := newWithSuite(inner, aesSuite{dataKey: append([]byte(nil), dataKey...)}, volumeSeal)
	if err != nil {
		return nil, err
	}
	if s.cacheKey, err = deriveCacheKey(dataKey, volumeSeal); err != nil {
		return nil, err
	}
	return s, nil
}

func newWithSuite(inner store.Store, su suite, volumeSeal []byte) (*Store, error) {
	if len(volumeSeal) != 16 {
		return nil, fmt.Errorf("sealed store: seal id is %d bytes, want 16", len(volumeSeal))
	}
	c, err := otter.New(&otter.Options[[saltSize]byte, cipher.AEAD]{MaximumSize: aeadCacheEntries})
	if err != nil {
		return nil, fmt.Errorf("sealed store: subkey cache: %w", err)
	}
	s := &Store{inner: inner, suite: su, aeads: c, failure: "authentication failed"}
	if _, ok := su.(crcSuite); ok {
		s.failure = "checksum mismatch"
		s.checksumOnly = true
	}
	copy(s.seal[:], volumeSeal)
	return s, nil
}

// Clear reports whether the object name is stored in the clear: the
// control objects that hold no user data and are read before the key is
// known. Everything else, including names this code does not know, is
// sealed.
func Clear(name string) bool {
	return name == store.SuperblockName || name == store.LeaseName || strings.HasPrefix(name, store.AttachPrefix)
}

// SealedSize is the stored size of a plaintext of n bytes.
func SealedSize(n int64) int64 {
	segs := max(1, (n+SegmentSize-1)/SegmentSize)
	return n + segs*Overhead
}

// PlainSize is the plaintext size of a sealed object of stored bytes; ok
// is false when no sealed object has that size (truncated or damaged).
func PlainSize(stored int64) (n int64, ok bool) {
	full, rem := stored/storedSize, stored%storedSize
	switch {
	case stored <= 0:
		return 0, false
	case rem == 0:
		return full * SegmentSize, true
	case rem < Overhead:
		return 0, false
	}
	return full*SegmentSize + rem - Overhead, true
}

func corrupt(name string, off int64, why string) error {
	return fmt.Errorf("%w: %s at plaintext offset %d: %s", store.ErrCorrupt, name, off, why)
}

// ad returns the associated data of segment 0 of object name, not
// final: the format, the volume's seal id, the segment index, whether it
// is the last one, and the name (last, as the only variable-length
// field). setADSegment makes it that of another segment.
func (s *Store) ad(name string) []byte {
	b := make([]byte, 0, len(adPrefix)+16+9+len(name))
	b = append(b, adPrefix...)
	b = append(b, s.seal[:]...)
	b = binary.BigEndian.AppendUint64(b, 0)
	b = append(b, 0)
	return append(b, name...)
}

// adIndexAt is where the segment index starts in the associated data;
// the final flag follows it.
const adIndexAt = len(adPrefix) + 16

// setADSegment rewrites the segment index and final flag of an
// associated data ad built by Store.ad: the rest is the same for every
// segment of an object, so a loop over segments builds it once.
func setADSegment(ad []byte, i uint64, final bool) {
	binary.BigEndian.PutUint64(ad[adIndexAt:], i)
	ad[adIndexAt+8] = 0
	if final {
		ad[adIndexAt+8] = 1
	}
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

// Put seals body and stores it under name.
func (s *Store) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	if Clear(name) {
		return s.inner.Put(ctx, name, body, ifAbsent)
	}
	one := [1][]byte{body}
	return s.PutV(ctx, name, one[:], ifAbsent)
}

var _ store.VectorWriter = (*Store)(nil)

// PutV implements store.VectorWriter: the concatenation of body is sealed
// from its pieces (a segment that spans two pieces is gathered first), so
// a chunk built in cache windows is never joined before it is sealed; a
// checksum-only object is not even copied (framed.go).
func (s *Store) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	if Clear(name) {
		return store.PutPieces(ctx, s.inner, name, body, ifAbsent)
	}
	if vw, ok := s.inner.(store.VectorWriter); ok && s.checksumOnly {
		return s.putFramed(ctx, vw, name, body, ifAbsent)
	}
	buf := s.getBuf(int(SealedSize(int64(store.PiecesLen(body)))))
	defer s.putBuf(buf)
	if err := s.sealInto(*buf, name, body); err != nil {
		return err
	}
	return s.inner.Put(ctx, name, *buf, ifAbsent)
}

// sealInto writes the sealed form of the concatenation of body into out,
// which has exactly SealedSize of its length bytes.
func (s *Store) sealInto(out []byte, name string, body [][]byte) error {
	var salt [saltSize]byte
	if err := newSalt(salt[:], name); err != nil {
		return err
	}
	return s.sealWith(out, name, body, salt)
}

// newSalt fills salt with a new object's random salt.
func newSalt(salt []byte, name string) error {
	if _, err := rand.Read(salt); err != nil {
		return fmt.Errorf("seal %s: salt: %w", name, err)
	}
	return nil
}

// sealWith is sealInto with the given salt.
func (s *Store) sealWith(out []byte, name string, body [][]byte, salt [saltSize]byte) error {
	aead, err := s.suite.aead(salt[:])
	if err != nil {
		return fmt.Errorf("seal %s: %w", name, err)
	}
	var nb [24]byte
	ad := s.ad(name)
	total := store.PiecesLen(body)
	segs := max(1, (total+SegmentSize-1)/SegmentSize)
	var gather [SegmentSize]byte
	p, in := 0, 0 // the piece and the offset in it where the next segment starts
	out = out[:0]
	for i := range segs {
		n := min(SegmentSize, total-i*SegmentSize)
		for p < len(body) && in == len(body[p]) {
			p, in = p+1, 0
		}
		var seg []byte
		if p < len(body) && len(body[p])-in >= n {
			seg = body[p][in : in+n] // within one piece: sealed from it
			in += n
		} else {
			for k := 0; k < n; {
				for in == len(body[p]) {
					p, in = p+1, 0
				}
				c := copy(gather[k:n], body[p][in:])
				k, in = k+c, in+c
			}
			seg = gather[:n]
		}
		out = append(out, salt[:]...)
		setADSegment(ad, uint64(i), i == segs-1)
		out = aead.Seal(out, s.suite.nonce(nb[:], salt[:], uint64(i)), seg, ad)
	}
	return nil
}

// aeadFor returns the AEAD of the object written with salt, from the cache
// when a recent read derived it.
func (s *Store) aeadFor(salt []byte) (cipher.AEAD, error) {
	k := [saltSize]byte(salt)
	if a, ok := s.aeads.GetIfPresent(k); ok {
		return a, nil
	}
	a, err := s.suite.aead(salt)
	if err != nil {
		return nil, err
	}
	s.aeads.Set(k, a)
	return a, nil
}

// GetRange reads the plaintext range [off, off+len(buf)): the covering
// segments in one inner GET, each verified before any byte is copied. A
// segment whose tag fails, or an object that ends without its final
// segment, is an error wrapping store.ErrCorrupt.
func (s *Store) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	if Clear(name) {
		return s.inner.GetRange(ctx, name, off, buf)
	}
	if off < 0 {
		return 0, fmt.Errorf("read %s: negative offset %d", name, off)
	}
	if len(buf) == 0 {
		return s.inner.GetRange(ctx, name, 0, buf)
	}
	first := off / SegmentSize
	last := (off + int64(len(buf)) - 1) / SegmentSize
	// One byte past the last segment tells whether the object goes on,
	// that is whether the last segment read must carry the final flag.
	want := (last-first+1)*storedSize + 1
	sb := s.getBuf(int(want))
	defer s.putBuf(sb)
	n, err := s.inner.GetRange(ctx, name, first*storedSize, *sb)
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, s.checkEnds(ctx, name, first)
	}
	raw := (*sb)[:n]
	ended := int64(n) < want
	var nb [24]byte
	ad := s.ad(name)
	var salt []byte
	var aead cipher.AEAD
	end := off + int64(len(buf)) // plaintext end of the request
	got := off                   // plaintext end of what was verified
	for i := first; i <= last && len(raw) > 0; i++ {
		segOff := i * SegmentSize
		seg := raw[:min(len(raw), storedSize)]
		raw = raw[len(seg):]
		if len(seg) < Overhead {
			return 0, corrupt(name, segOff, fmt.Sprintf("the object ends %d bytes into a segment", len(seg)))
		}
		final := ended && len(raw) == 0
		if salt == nil {
			salt = seg[:saltSize]
			if aead, err = s.aeadFor(salt); err != nil {
				return 0, fmt.Errorf("open %s: %w", name, err)
			}
		} else if string(seg[:saltSize]) != string(salt) {
			return 0, corrupt(name, segOff, "segment belongs to another write of the object")
		}
		setADSegment(ad, uint64(i), final)
		nonce := s.suite.nonce(nb[:], salt, uint64(i))
		ct := seg[saltSize:]
		plainLen := int64(len(ct) - tagSize)
		if segOff >= off && segOff+plainLen <= end {
			// Wholly requested: open straight into the caller's buffer.
			// The capacity limit keeps Open from touching bytes past
			// this segment's place, even when it fails.
			dst := buf[segOff-off : segOff-off : segOff-off+plainLen]
			if _, err := aead.Open(dst, nonce, ct, ad); err != nil {
				return 0, corrupt(name, segOff, s.failure)
			}
		} else {
			p, err := aead.Open(ct[:0], nonce, ct, ad)
			if err != nil {
				return 0, corrupt(name, segOff, s.failure)
			}
			lo := max(off, segOff)
			hi := min(end, segOff+plainLen)
			if hi > lo {
				copy(buf[lo-off:hi-off], p[lo-segOff:hi-segOff])
			}
		}
		got = max(got, min(end, segOff+plainLen))
		if plainLen < SegmentSize && !final {
			return 0, corrupt(name, segOff, "short segment before the end")
		}
	}
	return int(got - off), nil
}

// checkEnds handles a read that starts at segment first and found nothing
// there: the object must end before it, with a final segment, or it was
// truncated. Only reads past the end take this path.
func (s *Store) checkEnds(ctx context.Context, name string, first int64) error {
	if first == 0 {
		if _, err := s.inner.Size(ctx, name); err != nil {
			return err
		}
		return corrupt(name, 0, "the stored object is empty (a sealed object has at least one segment)")
	}
	stored, err := s.inner.Size(ctx, name)
	if err != nil {
		return err
	}
	plain, ok := PlainSize(stored)
	if !ok {
		return corrupt(name, 0, fmt.Sprintf("stored size %d is not the size of a sealed object", stored))
	}
	lastSeg := max(0, (plain-1)/SegmentSize)
	if plain == 0 {
		lastSeg = 0
	}
	if lastSeg >= first {
		return fmt.Errorf("read %s: the object changed while it was read", name)
	}
	// Read the last segment through the normal path: it must verify as
	// final. One byte of it is enough to make GetRange check it whole.
	var one [1]byte
	if _, err := s.GetRange(ctx, name, lastSeg*SegmentSize, one[:]); err != nil {
		return err
	}
	return nil
}

// Size returns the plaintext size, computed from the stored size.
func (s *Store) Size(ctx context.Context, name string) (int64, error) {
	n, err := s.inner.Size(ctx, name)
	if err != nil || Clear(name) {
		return n, err
	}
	p, ok := PlainSize(n)
	if !ok {
		return 0, corrupt(name, 0, fmt.Sprintf("stored size %d is not the size of a sealed object", n))
	}
	return p, nil
}

// List lists the inner store with plaintext sizes. A data object or
// checkpoint whose stored size no sealed object can have stops the
// listing with an error wrapping store.ErrCorrupt: a made-up size could
// make it pass for a placeholder. Other names with such sizes are not
// bs3's (a start-up probe object a crash left behind) and are listed
// with their stored size, so they cannot block an attach.
func (s *Store) List(ctx context.Context, prefix string, fn func(name string, size int64) error) error {
	return s.inner.List(ctx, prefix, func(name string, size int64) error {
		if Clear(name) {
			return fn(name, size)
		}
		p, ok := PlainSize(size)
		if !ok {
			if _, data := store.ParseDataName(name); !data && !strings.HasPrefix(name, store.CheckpointPrefix) {
				return fn(name, size)
			}
			// A cut object is listed with the plaintext of its whole
			// segments, not refused: one damaged object must not hide
			// every other one from recovery and bs3 check. Any read
			// that reaches the cut fails with ErrCorrupt, and Size
			// reports the damage. One cut before its first segment
			// ends is listed as 1 byte, never as 0: an empty object
			// is a placeholder, which bs3 check would not read.
			return fn(name, max(1, size/storedSize*SegmentSize))
		}
		return fn(name, p)
	})
}

// Delete removes the object.
func (s *Store) Delete(ctx context.Context, name string) error {
	return s.inner.Delete(ctx, name)
}
