package extentmap

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/bs3/bs3/internal/crc32c"
)

// Serialized form (all integers minimal unsigned varints unless noted):
//
//	"BS3M" version blocks
//	tracked-count { key-delta total start }*    keys ascending
//	                                            (version 1: no start)
//	page-count { page-delta count-1 entry* }*   pages ascending
//	crc32c of everything before, 4 bytes little-endian
//
// Version 3 (written now) stores a page as its maximal runs (count-1 is
// the run count minus one); a run is gap<<1|long, [length-2 if long],
// zigzag(key-prevKey)<<1|zero, [zigzag(off-prevEnd) unless zero],
// zigzag(seq-prevSeq), where gap is the unwritten blocks since the end of
// the previous run and prevEnd the offset after the previous data run. A
// page written sequentially in 1 MiB items then costs about 6 bytes per
// item, a randomly written one about 4 bytes per block.
//
// Versions 1 and 2 (still read) store one entry per written block:
// idx-delta, zigzag(key-prevKey)<<1|zero, [zigzag(off-prevOff-1) unless
// zero], zigzag(seq-prevSeq). Deltas restart at every page in all
// versions. Live counts are not stored: they are recomputed from the
// entries, which also checks that every referenced key is tracked.
//
// The checksum catches damage after writing, not a body that was wrong
// when it was checksummed, so the decoder checks the structure as well:
// every count against the bytes left before anything is allocated for it,
// every key, offset, block and page index against its range; keys and
// pages must ascend strictly, a page must hold 1..pageLen entries, and a
// version 3 run must not continue the one before it (runs are maximal, so
// a map has exactly one encoding). A corrupt body yields an error naming
// the field.
const (
	magic         = "BS3M"
	formatVersion = 3
	// version2 stores one entry per written block; it is still read.
	version2 = 2
	// version1 also lacks the objects' data start (every object then has
	// the layout's whole metadata area, docs/ARCHITECTURE.md §3); it is
	// still read.
	version1 = 1
)

// ErrCorrupt reports serialized map data that does not decode.
var ErrCorrupt = errors.New("extentmap: corrupt serialized map")

func zigzag(v int64) uint64   { return uint64(v<<1) ^ uint64(v>>63) }
func unzigzag(u uint64) int64 { return int64(u>>1) ^ -int64(u&1) }

// MarshalBinary serializes the map: the allocated pages (only their written
// entries) and the per-object totals, with a version and a checksum.
func (m *Map) MarshalBinary() ([]byte, error) {
	// About 6 bytes per object and per run, 8 per entry of a sparse or
	// dense page, whose entries are mostly random (capacities stand in for
	// lengths): not per written block, which for a sequentially written
	// TiB would be 1.5 GiB.
	b := make([]byte, 0, 64+6*(m.objs.tracked+m.runCap)+8*(m.sparseCap+m.dense*pageLen))
	b = m.appendHeader(b, formatVersion)
	prevPage := int64(-1)
	var scratch []byte
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
			prevPage = pi
			// The run count precedes the runs: encode the runs into
			// scratch first, then append the count and the runs.
			e := runEncoder{b: scratch[:0]}
			p.eachRun(func(r runEntry) bool {
				e.put(r)
				return true
			})
			scratch = e.b
			b = binary.AppendUvarint(b, uint64(e.count-1))
			b = append(b, scratch...)
		}
	}
	return binary.LittleEndian.AppendUint32(b, crc32c.Checksum(b)), nil
}

// runEncoder appends the version 3 runs of one page.
type runEncoder struct {
	b                         []byte
	count                     int
	prevEnd, prevKey, prevOff int64
	prevSeq                   uint64
}

func (e *runEncoder) put(r runEntry) {
	long := uint64(0)
	if r.n > 1 {
		long = 1
	}
	e.b = binary.AppendUvarint(e.b, uint64(int64(r.idx)-e.prevEnd)<<1|long)
	if long == 1 {
		e.b = binary.AppendUvarint(e.b, uint64(r.n-2))
	}
	zero := uint64(0)
	if r.zero() {
		zero = 1
	}
	key := r.key()
	e.b = binary.AppendUvarint(e.b, zigzag(key-e.prevKey)<<1|zero)
	if zero == 0 {
		e.b = binary.AppendUvarint(e.b, zigzag(r.off()-e.prevOff))
		e.prevOff = r.off() + int64(r.n)
	}
	e.b = binary.AppendUvarint(e.b, zigzag(int64(r.seq-e.prevSeq)))
	e.prevEnd, e.prevKey, e.prevSeq = int64(r.end()), key, r.seq
	e.count++
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
	if crc32c.Checksum(body) != binary.LittleEndian.Uint32(data[len(data)-4:]) {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	return decode(body[len(magic):])
}

// decode parses the body between magic and checksum.
func decode(body []byte) (*Map, error) {
	d := &decoder{b: body}
	version := d.uvarint("version")
	if d.err == nil && version != formatVersion && version != version2 && version != version1 {
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
	var runs []runEntry
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
		// An entry or run takes at least 3 bytes (index, key, seq).
		if nm1 >= pageLen || nm1 >= uint64(len(d.b)/3) {
			d.fail("page %d (index %d): entry count %d+1 out of range (at most %d, %d bytes left)", i, pi, nm1, pageLen, len(d.b))
			break
		}
		n := int(nm1 + 1)
		runs = runs[:0]
		blocks := 0
		if version == formatVersion {
			runs, blocks = m.decodeRuns(d, pi, n, runs)
		} else {
			buf = m.decodePage(d, pi, n, buf[:0])
			if d.err == nil && len(buf) != n {
				d.fail("page %d: decoded %d of %d entries", pi, len(buf), n)
			}
			for _, e := range buf {
				runs = pushRun(runs, runEntry{seq: e.seq, loc: makeLoc(e.key, e.off), idx: uint16(e.idx), n: 1})
			}
			blocks = len(buf)
		}
		if d.err == nil {
			m.placePage(pi, runs, blocks)
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
	prevIdx, prevKey, nextOff := int64(-1), int64(0), int64(0)
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
		key, off, o := m.decodeLoc(d, "entry", pi, j, kz, offDelta, prevKey, &nextOff, 1)
		if o == nil {
			break
		}
		o.live++
		seq := prevSeq + uint64(unzigzag(seqDelta))
		buf = append(buf, fullEntry{key: key, off: off, seq: seq, idx: int(idx)})
		prevIdx, prevKey, prevSeq = idx, key, seq
	}
	return buf
}

// appendHeader appends what every body version starts with: magic,
// version, device blocks, the tracked objects (key delta, total, start)
// and the page count.
func (m *Map) appendHeader(b []byte, version uint64) []byte {
	b = append(b, magic...)
	b = binary.AppendUvarint(b, version)
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
	return binary.AppendUvarint(b, uint64(m.pages))
}

// decodeLoc decodes where an entry or run (what, number j of page pi)
// points: its key, a zigzag delta from prevKey in kz>>1 with the zero flag
// in kz&1, and for data its offset, a delta from nextOff (where the
// previous data of the page ended) that must keep its n blocks within
// MaxOff; nextOff then moves past them. The key must be a tracked object,
// which it returns; on anything out of range it fails d and returns nil.
func (m *Map) decodeLoc(d *decoder, what string, pi int64, j int, kz, offDelta uint64, prevKey int64, nextOff *int64, n int) (key, off int64, o *object) {
	kdelta := unzigzag(kz >> 1)
	if kdelta < -MaxKey || kdelta > MaxKey {
		d.fail("page %d %s %d: key delta %d", pi, what, j, kdelta)
		return 0, 0, nil
	}
	key = prevKey + kdelta
	off = zeroOff
	if kz&1 == 0 {
		od := unzigzag(offDelta)
		if od < -MaxOff-1 || od > MaxOff {
			d.fail("page %d %s %d: offset delta %d", pi, what, j, od)
			return 0, 0, nil
		}
		off = *nextOff + od
		if off < 0 || off+int64(n)-1 > MaxOff {
			d.fail("page %d %s %d: offsets [%d, +%d) out of range", pi, what, j, off, n)
			return 0, 0, nil
		}
		*nextOff = off + int64(n)
	}
	if o = m.objs.get(key); o == nil {
		d.fail("page %d %s %d: key %d is not a tracked object", pi, what, j, key)
	}
	return key, off, o
}

// decodeRuns reads the n version 3 runs of page pi, validating them and
// counting them as live for their objects. It returns the runs and the
// blocks they cover.
func (m *Map) decodeRuns(d *decoder, pi int64, n int, runs []runEntry) ([]runEntry, int) {
	prevEnd, prevKey, nextOff := 0, int64(0), int64(0)
	var prevSeq uint64
	blocks := 0
	for j := 0; j < n && d.err == nil; j++ {
		gl := d.uvarint("run gap")
		var nm2 uint64
		if gl&1 == 1 {
			nm2 = d.uvarint("run length")
		}
		kz := d.uvarint("run key")
		zero := kz&1 == 1
		var offDelta uint64
		if !zero {
			offDelta = d.uvarint("run offset")
		}
		seqDelta := d.uvarint("run seq")
		if d.err != nil {
			break
		}
		// prevEnd <= pageLen, so the bounds are not negative.
		gap := gl >> 1
		if gap >= uint64(pageLen-prevEnd) {
			d.fail("page %d run %d: gap %d after block %d", pi, j, gap, prevEnd)
			break
		}
		idx := prevEnd + int(gap)
		length := 1
		if gl&1 == 1 {
			// Stored minus two: a long run has at least 2 blocks, and
			// must end inside the page.
			if nm2 >= uint64(pageLen-idx-1) {
				d.fail("page %d run %d: length %d+2 from block %d", pi, j, nm2, idx)
				break
			}
			length = int(nm2) + 2
		}
		if pi<<pageShift+int64(idx+length) > m.blocks {
			d.fail("page %d run %d: blocks past device end", pi, j)
			break
		}
		key, off, o := m.decodeLoc(d, "run", pi, j, kz, offDelta, prevKey, &nextOff, length)
		if o == nil {
			break
		}
		seq := prevSeq + uint64(unzigzag(seqDelta))
		r := runEntry{seq: seq, loc: makeLoc(key, off), idx: uint16(idx), n: uint16(length)}
		if j > 0 && continues(runs[len(runs)-1], r) {
			d.fail("page %d run %d continues the previous run", pi, j)
			break
		}
		o.live += int64(length)
		runs = append(runs, r)
		blocks += length
		prevEnd, prevKey, prevSeq = idx+length, key, seq
	}
	return runs, blocks
}

// placePage installs decoded maximal runs covering blocks blocks as page
// pi, in the form an update would choose (reform): runs while they are
// cheap, else sparse with exact capacity when it can hold them, else dense
// if the runs are many.
func (m *Map) placePage(pi int64, runs []runEntry, blocks int) {
	p := m.allocPage(pi, 0)
	p.base = 0
	p.n = int32(blocks)
	m.written += int64(blocks)
	rs := make([]runEntry, len(runs))
	copy(rs, runs)
	p.rn = &runList{r: rs}
	m.runPages++
	m.runCap += int64(cap(rs))
	m.reform(p, 0)
}
