package compressed

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"github.com/bs3/bs3/internal/crc32c"
)

// Object format (docs/ARCHITECTURE.md §19.1), little-endian:
//
//	header  magic "BS3CMPR\0" | version u8 | codec u8 | segment shift u8 | 0 u8
//	        | segments u32 | logical size u64 | stored size u64        32 bytes
//	index   per segment: stored length u32 (bit 31: raw) | CRC32C of the
//	        segment's plaintext u32                                     8 each
//	        CRC32C of header and index u32                              4
//	data    the segments, in order
//
// Segment i holds plaintext [i<<shift, min((i+1)<<shift, logical)). An
// object that does not start with the magic is stored as it is.
const (
	magic       = "BS3CMPR\x00"
	version     = 1
	headerSize  = 32
	entrySize   = 8
	rawFlag     = 1 << 31
	minShift    = 12 // 4 KiB segments
	maxShift    = 24 // 16 MiB
	maxSegment  = 1 << maxShift
	probeSize   = 4096 // first GET of an object whose index is not cached
	indexCRCLen = 4
)

func crc(b []byte) uint32 { return crc32c.Checksum(b) }

// hasMagic reports whether b starts like a compressed object. A body that
// does is always stored framed, so reading it back cannot mistake it for
// a compressed one.
func hasMagic(b []byte) bool { return len(b) >= len(magic) && string(b[:len(magic)]) == magic }

// index is an object's parsed header and index. raw means the object is
// stored as it is (no magic).
type index struct {
	raw     bool
	codec   byte
	shift   uint8
	logical int64
	stored  int64   // the whole stored object
	offs    []int64 // offs[i]: stored offset of segment i; offs[n] = stored
	rawSeg  []bool
	crcs    []uint32
}

func (ix *index) segments() int { return len(ix.crcs) }

// plainLen is the plaintext length of segment i.
func (ix *index) plainLen(i int) int {
	lo := int64(i) << ix.shift
	return int(min(int64(1)<<ix.shift, ix.logical-lo))
}

// weight is the index's memory in bytes, roughly, for the cache bound.
func (ix *index) weight() uint32 { return uint32(96 + 17*len(ix.crcs)) }

// indexLen is the length of header and index of an object of n segments.
func indexLen(n int) int { return headerSize + n*entrySize + indexCRCLen }

var errIndex = errors.New("bad compression header")

// parseHeader reads the fixed header; it says how long the index is.
func parseHeader(b []byte) (codec byte, shift uint8, n int, logical, stored int64, err error) {
	if len(b) < headerSize || !hasMagic(b) {
		return 0, 0, 0, 0, 0, fmt.Errorf("%w: no magic", errIndex)
	}
	if b[8] != version {
		return 0, 0, 0, 0, 0, fmt.Errorf("%w: format version %d, this bs3 reads %d (a newer bs3 wrote it?)", errIndex, b[8], version)
	}
	codec, shift = b[9], b[10]
	n = int(binary.LittleEndian.Uint32(b[12:]))
	logical = int64(binary.LittleEndian.Uint64(b[16:]))
	stored = int64(binary.LittleEndian.Uint64(b[24:]))
	switch {
	case shift < minShift || shift > maxShift:
		return 0, 0, 0, 0, 0, fmt.Errorf("%w: segment shift %d", errIndex, shift)
	case logical <= 0 || n != int((logical+1<<shift-1)>>shift):
		return 0, 0, 0, 0, 0, fmt.Errorf("%w: %d segments for %d bytes", errIndex, n, logical)
	case stored < int64(indexLen(n)):
		return 0, 0, 0, 0, 0, fmt.Errorf("%w: stored size %d", errIndex, stored)
	}
	return codec, shift, n, logical, stored, nil
}

// parseIndex parses header and index from b, which holds at least
// indexLen bytes, and checks their CRC and that the lengths add up.
func parseIndex(b []byte) (*index, error) {
	codec, shift, n, logical, stored, err := parseHeader(b)
	if err != nil {
		return nil, err
	}
	l := indexLen(n)
	if len(b) < l {
		return nil, fmt.Errorf("%w: index cut short", errIndex)
	}
	if got, want := crc(b[:l-indexCRCLen]), binary.LittleEndian.Uint32(b[l-indexCRCLen:]); got != want {
		return nil, fmt.Errorf("%w: index CRC32C %08x, recorded %08x", errIndex, got, want)
	}
	ix := &index{codec: codec, shift: shift, logical: logical, stored: stored,
		offs: make([]int64, n+1), rawSeg: make([]bool, n), crcs: make([]uint32, n)}
	off := int64(l)
	for i := range n {
		e := b[headerSize+i*entrySize:]
		sl := binary.LittleEndian.Uint32(e)
		ix.crcs[i] = binary.LittleEndian.Uint32(e[4:])
		ix.rawSeg[i] = sl&rawFlag != 0
		sl &^= rawFlag
		if ix.rawSeg[i] && int(sl) != ix.plainLen(i) {
			return nil, fmt.Errorf("%w: raw segment %d is %d bytes, its plaintext %d", errIndex, i, sl, ix.plainLen(i))
		}
		ix.offs[i] = off
		off += int64(sl)
	}
	ix.offs[n] = off
	if off != stored {
		return nil, fmt.Errorf("%w: segments end at %d, the header says %d", errIndex, off, stored)
	}
	return ix, nil
}

// shiftOf is log2 of a segment size, which must be a power of two in
// [4 KiB, 16 MiB].
func shiftOf(segment int) (uint8, error) {
	if segment < 1<<minShift || segment > maxSegment || bits.OnesCount(uint(segment)) != 1 {
		return 0, fmt.Errorf("compression segment size %d: must be a power of two from 4 KiB to 16 MiB", segment)
	}
	return uint8(bits.TrailingZeros(uint(segment))), nil
}

// frame encodes body into out (reset): header, index and segments, each
// compressed with enc, or raw when that does not save at least 1/32 of
// it (decompressing costs CPU on every read; a sliver of space does not
// pay for it). enc nil stores every segment raw. scratch is reused.
func frame(out, scratch []byte, body []byte, codec byte, shift uint8, enc encoder) (framed, scr []byte) {
	n := int((int64(len(body)) + 1<<shift - 1) >> shift)
	l := indexLen(n)
	out = grow(out[:0], l+len(body))[:l]
	copy(out, magic)
	out[8], out[9], out[10], out[11] = version, codec, shift, 0
	binary.LittleEndian.PutUint32(out[12:], uint32(n))
	binary.LittleEndian.PutUint64(out[16:], uint64(len(body)))
	seg := 1 << shift
	for i := range n {
		p := body[i*seg : min(len(body), (i+1)*seg)]
		e := out[headerSize+i*entrySize:]
		binary.LittleEndian.PutUint32(e[4:], crc(p))
		if enc != nil {
			scratch = enc.encode(scratch[:0], p)
			if len(scratch) <= len(p)-len(p)/32 {
				binary.LittleEndian.PutUint32(e, uint32(len(scratch)))
				out = append(out, scratch...)
				continue
			}
		}
		binary.LittleEndian.PutUint32(e, uint32(len(p))|rawFlag)
		out = append(out, p...)
	}
	binary.LittleEndian.PutUint64(out[24:], uint64(len(out)))
	binary.LittleEndian.PutUint32(out[l-indexCRCLen:], crc(out[:l-indexCRCLen]))
	return out, scratch
}
