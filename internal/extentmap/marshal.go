package extentmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
)

// Serialized form (all integers minimal unsigned varints unless noted):
//
//	"BS3M" version blocks
//	tracked-count { key-delta total start }*    keys ascending
//	                                            (version 1: no start)
//	page-count { page-delta count-1 entry* }*   pages ascending
//	crc32c of everything before, 4 bytes little-endian
//
// An entry is idx-delta, zigzag(key-prevKey)<<1|zero, [zigzag(off-prevOff-1)
// unless zero], zigzag(seq-prevSeq); deltas restart at every page, so a run
// written sequentially by one object costs about 4 bytes per block. Live
// counts are not stored: they are recomputed from the entries, which also
// checks that every referenced key is tracked.
//
// The checksum catches damage after writing, not a body that was wrong
// when it was checksummed, so the decoder checks the structure as well:
// every count against the bytes left before anything is allocated for it,
// every key, offset, block and page index against its range; keys and
// pages must ascend strictly and a page must hold 1..pageLen entries. A
// corrupt body yields an error naming the field.
const (
	magic         = "BS3M"
	formatVersion = 2
	// version1 lacks the objects' data start (every object then has the
	// layout's whole metadata area, docs/ARCHITECTURE.md §3); it is still
	// read.
	version1 = 1
)

// ErrCorrupt reports serialized map data that does not decode.
var ErrCorrupt = errors.New("extentmap: corrupt serialized map")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func zigzag(v int64) uint64   { return uint64(v<<1) ^ uint64(v>>63) }
func unzigzag(u uint64) int64 { return int64(u>>1) ^ -int64(u&1) }

// MarshalBinary serializes the map: the allocated pages (only their written
// entries) and the per-object totals, with a version and a checksum.
func (m *Map) MarshalBinary() ([]byte, error) {
	b := make([]byte, 0, 64+m.objs.tracked*4+m.written*6)
	b = append(b, magic...)
	b = binary.AppendUvarint(b, formatVersion)
	b = binary.AppendUvarint(b, uint64(m.blocks))
	b = binary.AppendUvarint(b, uint64(m.objs.tracked))
	prev := int64(-1)
	m.objs.each(func(key int64, o *object) bool {
		b = binary.AppendUvarint(b, uint64(key-prev-1))
		b = binary.AppendUvarint(b, uint64(o.total))
		b = binary.AppendUvarint(b, uint64(o.start))
		prev = key
		return true
	})
	b = binary.AppendUvarint(b, uint64(m.pages))
	prevPage := int64(-1)
	for ci, c := range m.dir {
		if c == nil {
			continue
		}
		for i, p := range c {
			if p == nil {
				continue
			}
			pi := int64(ci)<<dirShift | int64(i)
			if p.n < 1 || p.n > pageLen {
				// The decoder would reject the result; refuse to write a
				// checkpoint that cannot be loaded.
				return nil, fmt.Errorf("extentmap: marshal: page %d counts %d entries", pi, p.n)
			}
			b = binary.AppendUvarint(b, uint64(pi-prevPage-1))
			b = binary.AppendUvarint(b, uint64(p.n-1))
			prevPage = pi
			e := entryEncoder{b: b, prevIdx: -1, prevOff: -1}
			if p.d != nil {
				for idx, d := range p.d {
					if d.loc != 0 {
						k, o := unpackLoc(d.loc)
						e.put(idx, k, o, d.seq)
					}
				}
			} else {
				for _, s := range p.sp {
					e.put(int(s.idx), p.base+int64(s.kd), int64(s.off), s.seq)
				}
			}
			b = e.b
		}
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli)), nil
}

type entryEncoder struct {
	b                         []byte
	prevIdx, prevKey, prevOff int64
	prevSeq                   uint64
}

func (e *entryEncoder) put(idx int, key, off int64, seq uint64) {
	e.b = binary.AppendUvarint(e.b, uint64(int64(idx)-e.prevIdx-1))
	zero := uint64(0)
	if off == zeroOff {
		zero = 1
	}
	e.b = binary.AppendUvarint(e.b, zigzag(key-e.prevKey)<<1|zero)
	if zero == 0 {
		e.b = binary.AppendUvarint(e.b, zigzag(off-e.prevOff-1))
		e.prevOff = off
	}
	e.b = binary.AppendUvarint(e.b, zigzag(int64(seq-e.prevSeq)))
	e.prevIdx, e.prevKey, e.prevSeq = int64(idx), key, seq
}

// decoder reads varints from a buffer, remembering the first failure.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = fmt.Errorf("%w: bad varint for %s", ErrCorrupt, what)
		return 0
	}
	// The encoder writes minimal varints, so that a map has exactly one
	// encoding; a padded one (last byte zero) is corruption.
	if n > 1 && d.b[n-1] == 0 {
		d.err = fmt.Errorf("%w: non-minimal varint for %s", ErrCorrupt, what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

// count reads a count that needs at least min bytes per counted item, so
// that a corrupt count cannot make the caller allocate more than the input
// could describe.
func (d *decoder) count(what string, max uint64, minBytes int) int64 {
	v := d.uvarint(what)
	if d.err == nil && (v > max || v > uint64(len(d.b)/minBytes)) {
		d.err = fmt.Errorf("%w: %s %d out of range (at most %d, %d bytes left)", ErrCorrupt, what, v, max, len(d.b))
		return 0
	}
	return int64(v)
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
	}
}

// fullEntry is a decoded entry before it is placed in a page.
type fullEntry struct {
	key, off int64
	seq      uint64
	idx      int
}

// UnmarshalBinary decodes a map serialized by MarshalBinary. Data that is
// truncated, corrupt or of an unknown version yields an error wrapping
// ErrCorrupt; it never panics.
func UnmarshalBinary(data []byte) (*Map, error) {
	if len(data) < len(magic)+4 || string(data[:len(magic)]) != magic {
		return nil, fmt.Errorf("%w: bad magic", ErrCorrupt)
	}
	body := data[:len(data)-4]
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(data[len(data)-4:]) {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	return decode(body[len(magic):])
}

// decode parses the body between magic and checksum.
func decode(body []byte) (*Map, error) {
	d := &decoder{b: body}
	version := d.uvarint("version")
	if d.err == nil && version != formatVersion && version != version1 {
		return nil, fmt.Errorf("%w: unknown format version %d", ErrCorrupt, version)
	}
	blocks := d.uvarint("blocks")
	if d.err == nil && blocks > MaxBlocks {
		d.fail("device of %d blocks", blocks)
	}
	if d.err != nil {
		return nil, d.err
	}
	m, err := New(int64(blocks))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}

	tracked := d.count("object count", MaxKey+1, 2)
	key := int64(-1)
	for i := int64(0); i < tracked && d.err == nil; i++ {
		delta := d.uvarint("object key")
		total := d.uvarint("object total")
		var start uint64
		if version != version1 {
			start = d.uvarint("object data start")
		}
		if d.err != nil {
			break
		}
		// Keys ascend strictly: the delta is stored minus one. key is
		// below MaxKey here, so the bound is not negative.
		if key >= MaxKey || delta > uint64(MaxKey-key-1) {
			d.fail("object %d: key delta %d after key %d is past the largest key %d", i, delta, key, int64(MaxKey))
			break
		}
		key += int64(delta) + 1
		if total > MaxOff+1 {
			d.fail("object %d (key %d): total %d blocks out of range (at most %d)", i, key, total, MaxOff+1)
			break
		}
		if start > MaxDataStart {
			d.fail("object %d (key %d): data start %d out of range (at most %d)", i, key, start, MaxDataStart)
			break
		}
		if err := m.AddObject(key, int64(total)); err != nil {
			d.fail("object %d (key %d): %w", i, key, err)
		} else if err := m.SetDataStart(key, int64(start)); err != nil {
			d.fail("object %d (key %d): %w", i, key, err)
		}
	}

	numPages := (m.blocks + pageLen - 1) >> pageShift
	pages := d.count("page count", uint64(numPages), 3)
	pi := int64(-1)
	var buf []fullEntry
	for i := int64(0); i < pages && d.err == nil; i++ {
		delta := d.uvarint("page index")
		// Stored minus one: a page holds 1..pageLen entries. Adding one
		// before the range check would wrap 2^64-1 to an empty page.
		nm1 := d.uvarint("page entry count")
		if d.err != nil {
			break
		}
		// Pages ascend strictly; pi < numPages here, so the bound is not
		// negative.
		if delta >= uint64(numPages-pi-1) {
			d.fail("page %d: index delta %d after page %d is past the last page %d", i, delta, pi, numPages-1)
			break
		}
		pi += int64(delta) + 1
		// An entry takes at least 3 bytes (index, key, seq).
		if nm1 >= pageLen || nm1 >= uint64(len(d.b)/3) {
			d.fail("page %d (index %d): entry count %d+1 out of range (at most %d, %d bytes left)", i, pi, nm1, pageLen, len(d.b))
			break
		}
		n := nm1 + 1
		buf = m.decodePage(d, pi, int(n), buf[:0])
		if d.err == nil && len(buf) != int(n) {
			d.fail("page %d: decoded %d of %d entries", pi, len(buf), n)
		}
		if d.err == nil {
			m.placePage(pi, buf)
		}
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	if d.err != nil {
		return nil, d.err
	}
	return m, nil
}

// decodePage reads n entries of page pi, validating them and counting them
// as live for their objects.
func (m *Map) decodePage(d *decoder, pi int64, n int, buf []fullEntry) []fullEntry {
	prevIdx, prevKey, prevOff := int64(-1), int64(0), int64(-1)
	var prevSeq uint64
	for j := 0; j < n && d.err == nil; j++ {
		idxDelta := d.uvarint("entry index")
		kz := d.uvarint("entry key")
		var offDelta uint64
		zero := kz&1 == 1
		if !zero {
			offDelta = d.uvarint("entry offset")
		}
		seqDelta := d.uvarint("entry seq")
		if d.err != nil {
			break
		}
		if idxDelta >= uint64(pageLen-prevIdx-1) {
			d.fail("page %d entry %d: index delta %d", pi, j, idxDelta)
			break
		}
		idx := prevIdx + int64(idxDelta) + 1
		if pi<<pageShift+idx >= m.blocks {
			d.fail("page %d entry %d: block past device end", pi, j)
			break
		}
		kdelta := unzigzag(kz >> 1)
		if kdelta < -MaxKey || kdelta > MaxKey {
			d.fail("page %d entry %d: key delta %d", pi, j, kdelta)
			break
		}
		key := prevKey + kdelta
		off := int64(zeroOff)
		if !zero {
			od := unzigzag(offDelta)
			if od < -MaxOff-1 || od > MaxOff {
				d.fail("page %d entry %d: offset delta %d", pi, j, od)
				break
			}
			off = prevOff + 1 + od
			if off < 0 || off > MaxOff {
				d.fail("page %d entry %d: offset %d", pi, j, off)
				break
			}
			prevOff = off
		}
		o := m.objs.get(key)
		if o == nil {
			d.fail("page %d entry %d: key %d is not a tracked object", pi, j, key)
			break
		}
		o.live++
		seq := prevSeq + uint64(unzigzag(seqDelta))
		buf = append(buf, fullEntry{key: key, off: off, seq: seq, idx: int(idx)})
		prevIdx, prevKey, prevSeq = idx, key, seq
	}
	return buf
}

// placePage installs decoded entries as page pi, sparse with exact capacity
// when that form can hold them, else dense.
func (m *Map) placePage(pi int64, es []fullEntry) {
	lo, hi := es[0].key, es[0].key
	for _, e := range es {
		lo, hi = min(lo, e.key), max(hi, e.key)
	}
	p := m.allocPage(pi, lo)
	p.n = int32(len(es))
	m.written += int64(len(es))
	if len(es) <= sparseMax && hi-lo <= math.MaxUint32 {
		p.base = max(0, lo-(math.MaxUint32-(hi-lo))/2)
		p.sp = make([]sparseEntry, len(es))
		m.sparseCap += int64(len(es))
		for i, e := range es {
			p.sp[i] = sparseEntry{seq: e.seq, kd: uint32(e.key - p.base), off: uint16(e.off), idx: uint16(e.idx)}
		}
		return
	}
	p.d = new([pageLen]denseEntry)
	p.base = 0
	m.dense++
	for _, e := range es {
		p.d[e.idx] = denseEntry{loc: packLoc(e.key, e.off), seq: e.seq}
	}
}
