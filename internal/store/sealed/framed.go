package sealed

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/bs3/bs3/internal/crc32c"
	"github.com/bs3/bs3/internal/store"
)

// Checksum-only objects are put without copying their plaintext
// (docs/ARCHITECTURE.md §16.6, §18): a segment's body is stored as it is,
// so the stored object is the caller's pieces with the framing (salt,
// tags) between them, and an inner store that takes pieces sends it with
// no copy. Each segment's bytes are checksummed once; the tag and the
// checksum of the whole stored object, which the S3 store sends as the
// payload checksum, are both combined from that one pass instead of
// reading the segment again for each.
//
// The same pass also checks the plaintext against the checksum it was
// given when it came in (store.WithPiecesCRC32C: the engine's, taken as
// each write's data was read from its frontend): the tags seal whatever
// bytes are in memory now, so a byte damaged between the frontend and
// here (a memory fault, a buffer reused too early) would otherwise be
// stored under a valid tag and read back as wrong data for good. A
// mismatch is store.ErrCorrupt and nothing is stored.

// segShift combines a checksum with that of a full segment's body.
var segShift = crc32c.NewShifter(SegmentSize)

// framedPut is the scratch of one framed put, pooled: a 4 MiB chunk has
// over a thousand segments, each with its framing and at least two
// pieces.
type framedPut struct {
	frame  []byte   // salt | tag 0 | salt | tag 1 | ... | tag n-1
	pieces [][]byte // salt, body 0 (one or more parts), tag 0 + salt, body 1, ..., tag n-1
}

var framedPuts = sync.Pool{New: func() any { return new(framedPut) }}

// putFramed puts the checksum-only form of the concatenation of body
// under name through vw (the inner store).
func (s *Store) putFramed(ctx context.Context, vw store.VectorWriter, name string, body [][]byte, ifAbsent bool) error {
	var salt [saltSize]byte
	if err := newSalt(salt[:], name); err != nil {
		return err
	}
	fp := framedPuts.Get().(*framedPut)
	defer func() {
		clear(fp.pieces) // no reference to the caller's memory stays in the pool
		fp.pieces = fp.pieces[:0]
		framedPuts.Put(fp)
	}()
	crc, plain := s.frame(fp, name, body, salt)
	if want, ok := store.PiecesCRC32C(ctx, body); ok && want != plain {
		return fmt.Errorf("seal %s: %w: the data changed in memory after it was written (CRC32C %08x when it came in, %08x now); not stored",
			name, store.ErrCorrupt, want, plain)
	}
	return vw.PutV(store.WithPiecesCRC32C(ctx, fp.pieces, crc), name, fp.pieces, ifAbsent)
}

// frame fills fp with the stored form of the concatenation of body
// sealed with salt under the checksum-only framing, byte for byte what
// sealInto writes, and returns the CRC32C of those stored bytes. The
// segments' bodies are body's own memory: a segment that spans pieces is
// stored from its parts, never gathered. It also returns the CRC32C of
// the plaintext, combined from the segments' checksums.
func (s *Store) frame(fp *framedPut, name string, body [][]byte, salt [saltSize]byte) (stored, plain uint32) {
	total := store.PiecesLen(body)
	segs := max(1, (total+SegmentSize-1)/SegmentSize)
	fp.frame = grow(fp.frame, segs*(tagSize+saltSize))
	// At most: the first salt, each segment's framing, and each
	// segment's body in as many parts as body has pieces beside it.
	if most := 1 + 2*segs + len(body); cap(fp.pieces) < most {
		fp.pieces = make([][]byte, 0, most)
	}
	fp.pieces = fp.pieces[:0]
	copy(fp.frame, salt[:])
	fp.pieces = append(fp.pieces, fp.frame[:saltSize])
	// The tag's checksum covers salt | nonce | associated data | body:
	// the salt's part is the same for every segment.
	saltCRC := crc32c.Checksum(salt[:])
	stored = saltCRC // of the stored bytes so far
	var nb [24]byte
	ad := s.ad(name)
	p, in := 0, 0 // the piece and the offset in it where the next segment starts
	for i := range segs {
		n := min(SegmentSize, total-i*SegmentSize)
		// The segment's body: one piece, or the parts of several (pieces
		// not cut at segment boundaries), checksummed part by part.
		var bodyCRC uint32
		for k := 0; k < n; {
			for in == len(body[p]) {
				p, in = p+1, 0
			}
			part := body[p][in:min(len(body[p]), in+n-k)]
			fp.pieces = append(fp.pieces, part)
			bodyCRC = crc32c.Update(bodyCRC, part)
			k, in = k+len(part), in+len(part)
		}
		final := i == segs-1
		setADSegment(ad, uint64(i), final)
		prefix := crc32c.Update(crc32c.Update(saltCRC, crcSuite{}.nonce(nb[:], salt[:], uint64(i))), ad)
		var tagCRC uint32
		if n == SegmentSize {
			tagCRC = segShift.Combine(prefix, bodyCRC)
			stored = segShift.Combine(stored, bodyCRC)
			plain = segShift.Combine(plain, bodyCRC)
		} else {
			tagCRC = crc32c.Combine(prefix, bodyCRC, int64(n))
			stored = crc32c.Combine(stored, bodyCRC, int64(n))
			plain = crc32c.Combine(plain, bodyCRC, int64(n))
		}
		at := saltSize + i*(tagSize+saltSize)
		t := fp.frame[at : at+tagSize]
		putCRCTag(t, tagCRC, n)
		framing := t // the tag, and the next segment's salt unless final
		if !final {
			framing = fp.frame[at : at+tagSize+saltSize]
			copy(framing[tagSize:], salt[:])
		}
		fp.pieces = append(fp.pieces, framing)
		stored = crc32c.Update(stored, framing)
	}
	return stored, plain
}

// grow returns b resized to n bytes, reusing its memory when it is large
// enough.
func grow(b []byte, n int) []byte {
	if cap(b) < n {
		return make([]byte, n)
	}
	return b[:n]
}

// putCRCTag writes the checksum-only tag of a segment body of n bytes
// whose checksum (salt, nonce, associated data and body) is crc.
func putCRCTag(t []byte, crc uint32, n int) {
	binary.BigEndian.PutUint32(t[0:4], crc)
	binary.BigEndian.PutUint32(t[4:8], uint32(n))
	copy(t[8:16], crcTagMark)
}
