// Package extentmap owns the block map of a volume: for every device block
// that was ever written, where its newest data lives (object key and block
// offset inside that object's data area, or a zero tombstone) and the seqno
// of the write that put it there; plus, per object, how many blocks it was
// written with and how many map entries still point to it.
//
// It is a plain data structure: no goroutines, no locks, no I/O, no logging.
// Exactly one goroutine may use a Map at a time (internal/mapproxy owns it).
// It never decides what to upload, read, collect or delete; it only answers.
//
// Memory follows what has been written, not the device size. Blocks are
// grouped in pages of 4096; a page is allocated on its first write. A page
// is in one of three forms, chosen by what its entries cost
// (docs/ARCHITECTURE.md §8):
//
//   - runs: a sorted array of 24-byte extents (first block, length, key and
//     block offset, seqno), one per run of blocks written by one item. A
//     page first written by a multi-block update starts in this form, so a
//     sequentially written page costs one entry per item, not per block.
//   - sparse: a sorted array of 16-byte entries (block index, block offset,
//     key relative to a per-page base, seqno), one per written block. A
//     page first written by a single block starts here, and a runs page
//     whose runs got short (random overwrites) turns sparse.
//   - dense: 4096 entries of 16 bytes indexed by block, for a page that is
//     almost full of short runs, where the sparse form would save little
//     and inserting into it would cost a long memmove.
//
// A sparse page stores keys as 32-bit offsets from a per-page base, which
// is moved as keys advance; a page whose keys span more than 2^32 turns
// to runs (which hold whole keys) or dense. A large update on a sparse or
// dense page checks whether runs would now be much cheaper. Pages hang off
// a two-level directory so that a large, unwritten device costs a few KiB.
// Entries are never removed: a discard leaves a tombstone, because
// recovery must replay it.
//
// MarshalBinary/UnmarshalBinary give the checkpoint body: versioned,
// checksummed, only written entries, delta-encoded.
package extentmap

import (
	"errors"
	"fmt"
	"math"
	"unsafe"
)

// Limits of the encoding.
const (
	// MaxKey is the largest object key a map entry can hold: keys take 48
	// bits, and the all-ones value marks an unwritten dense entry.
	MaxKey = 1<<48 - 2
	// MaxOff is the largest block offset inside an object's data area;
	// 0xFFFF marks a zero tombstone. A volume's chunk size / block size must
	// therefore not exceed MaxOff+1 blocks.
	MaxOff = 0xFFFE
	// MaxBlocks bounds the device size in blocks (512 PiB of 512-byte
	// blocks); it keeps the directory of a corrupt checkpoint bounded.
	MaxBlocks = 1 << 40
)

const (
	pageShift = 12
	pageLen   = 1 << pageShift // blocks per page
	pageMask  = pageLen - 1

	dirShift = 9
	dirLen   = 1 << dirShift // pages per directory chunk
	dirMask  = dirLen - 1

	zeroOff = 0xFFFF // block offset that marks a zero tombstone

	// sparseMax is the entry count above which a page turns dense. The
	// sparse form costs 16 bytes per entry (plus slack) against 16 per
	// block for dense, so it always saves memory; at 7/8 full the saving is
	// small while every random insert moves ~28 KiB.
	sparseMax = pageLen * 7 / 8
)

// ErrRange reports an argument outside the map's limits (block range past
// the device, key or block offset outside the encoding).
var ErrRange = errors.New("extentmap: argument out of range")

// denseEntry is one block of a dense page. loc holds ^(key<<16 | off) so
// that zeroed memory (loc 0) means unwritten without an initialization pass.
type denseEntry struct {
	loc uint64
	seq uint64
}

// sparseEntry is one written block of a sparse page.
type sparseEntry struct {
	seq uint64
	kd  uint32 // key - page.base
	off uint16 // block offset in the object, zeroOff for a tombstone
	idx uint16 // block index inside the page
}

// page holds pageLen consecutive blocks, in exactly one of three forms:
// runs (rn != nil), dense (d != nil) or else sparse.
type page struct {
	sp   []sparseEntry        // sparse form, sorted by idx
	d    *[pageLen]denseEntry // dense form
	rn   *runList             // runs form
	base int64                // key base of sparse entries
	n    int32                // written blocks in the page
}

// Map is the block map of one device. The zero value is not usable; call
// New or UnmarshalBinary.
type Map struct {
	blocks  int64
	dir     []*[dirLen]*page
	written int64 // blocks with an entry
	pages   int64 // allocated pages
	dense   int64 // allocated pages in dense form
	// sparseCap is the summed capacity of sparse pages, in entries.
	sparseCap int64
	runPages  int64 // allocated pages in runs form
	runCap    int64 // summed capacity of runs pages, in runs

	objs objects
	// scratch holds the runs an update rebuilds before they are spliced
	// into a runs page; kept to avoid an allocation per update.
	scratch []runEntry
}

// New returns an empty map for a device of blocks blocks (all unwritten).
func New(blocks int64) (*Map, error) {
	if blocks < 0 || blocks > MaxBlocks {
		return nil, fmt.Errorf("new map of %d blocks (max %d): %w", blocks, int64(MaxBlocks), ErrRange)
	}
	m := &Map{}
	m.resize(blocks)
	return m, nil
}

func (m *Map) resize(blocks int64) {
	m.blocks = blocks
	pages := (blocks + pageLen - 1) >> pageShift
	chunks := int((pages + dirLen - 1) >> dirShift)
	if chunks > len(m.dir) {
		nd := make([]*[dirLen]*page, chunks)
		copy(nd, m.dir)
		m.dir = nd
	}
}

// Blocks returns the device size in blocks.
func (m *Map) Blocks() int64 { return m.blocks }

// Grow extends the device to blocks blocks; the new blocks are unwritten.
// Shrinking is refused: it would drop entries that objects' live counts
// still include.
func (m *Map) Grow(blocks int64) error {
	if blocks < m.blocks || blocks > MaxBlocks {
		return fmt.Errorf("grow map from %d to %d blocks: %w", m.blocks, blocks, ErrRange)
	}
	m.resize(blocks)
	return nil
}

// WrittenBlocks returns the number of blocks that have an entry (data or
// tombstone).
func (m *Map) WrittenBlocks() int64 { return m.written }

// HeapBytes estimates the heap bytes the map holds: directory, pages,
// entries (counting spare capacity) and per-object counters. It is cheap
// enough for metrics: it walks only the directory and counter tables.
func (m *Map) HeapBytes() int64 {
	b := int64(unsafe.Sizeof(*m)) + int64(cap(m.dir))*8
	for _, c := range m.dir {
		if c != nil {
			b += int64(unsafe.Sizeof(*c))
		}
	}
	b += m.pages * int64(unsafe.Sizeof(page{}))
	b += m.dense * int64(unsafe.Sizeof([pageLen]denseEntry{}))
	b += m.sparseCap * int64(unsafe.Sizeof(sparseEntry{}))
	b += m.runPages*int64(unsafe.Sizeof(runList{})) + m.runCap*int64(unsafe.Sizeof(runEntry{}))
	b += int64(cap(m.scratch)) * int64(unsafe.Sizeof(runEntry{}))
	return b + m.objs.heapBytes()
}

// page returns the page holding page index pi, or nil.
func (m *Map) page(pi int64) *page {
	c := m.dir[pi>>dirShift]
	if c == nil {
		return nil
	}
	return c[pi&dirMask]
}

// allocPage returns the page pi, creating it (sparse, keyed around key).
func (m *Map) allocPage(pi int64, key int64) *page {
	c := m.dir[pi>>dirShift]
	if c == nil {
		c = new([dirLen]*page)
		m.dir[pi>>dirShift] = c
	}
	p := c[pi&dirMask]
	if p == nil {
		p = &page{base: max(0, key-math.MaxInt32)}
		c[pi&dirMask] = p
		m.pages++
	}
	return p
}

func (m *Map) checkRange(op string, block, n int64) error {
	if block < 0 || n < 0 || block > m.blocks || n > m.blocks-block {
		return fmt.Errorf("%s blocks [%d, +%d) of a %d-block map: %w", op, block, n, m.blocks, ErrRange)
	}
	return nil
}

// Update maps blocks [block, block+n) to object key at block offsets off,
// off+1, …, for every block whose current seqno is <= seq: an older write
// never replaces a newer one, an equal seqno replaces (a GC copy of the same
// write). It returns how many blocks were applied. Objects that lose blocks
// have their live count decremented; key's is incremented, and key is
// tracked from now on if it was not (see AddObject).
func (m *Map) Update(block, n int64, key int64, off int64, seq uint64) (int64, error) {
	if err := m.checkRange("update", block, n); err != nil {
		return 0, err
	}
	if key < 0 || key > MaxKey || off < 0 || off > MaxOff || n > MaxOff+1-off {
		return 0, fmt.Errorf("update key %d offsets [%d, +%d): %w", key, off, n, ErrRange)
	}
	return m.update(block, n, key, off, seq)
}

// UpdateZero is Update for discard and write-zeroes: blocks whose seqno is
// <= seq become zero tombstones that read as zeros and reference key, the
// object that recorded the discard (recovery replays it from there, so the
// tombstone keeps key live).
func (m *Map) UpdateZero(block, n int64, key int64, seq uint64) (int64, error) {
	if err := m.checkRange("update zero", block, n); err != nil {
		return 0, err
	}
	if key < 0 || key > MaxKey {
		return 0, fmt.Errorf("update zero key %d: %w", key, ErrRange)
	}
	return m.update(block, n, key, zeroOff, seq)
}

func (m *Map) update(block, n, key, off int64, seq uint64) (int64, error) {
	o, err := m.objs.track(key)
	if err != nil {
		return 0, fmt.Errorf("update key %d: %w", key, err)
	}
	var applied int64
	for n > 0 {
		pi := block >> pageShift
		lo := int(block & pageMask)
		cnt := int(min(n, int64(pageLen-lo)))
		p := m.allocPage(pi, key)
		if p.n == 0 && cnt > 1 && p.rn == nil && p.d == nil {
			// A new page written by a run: one entry for the item.
			m.toRuns(p)
		}
		switch {
		case p.rn != nil:
			applied += m.updateRuns(p, lo, cnt, key, off, seq)
		case p.d != nil:
			applied += m.updateDense(p, lo, cnt, key, off, seq)
		default:
			applied += m.updateSparse(p, lo, cnt, key, off, seq)
		}
		m.reform(p, cnt)
		block += int64(cnt)
		n -= int64(cnt)
		if off != zeroOff {
			off += int64(cnt)
		}
	}
	// o is still valid: counters move only when Forget untracks a key.
	o.live += applied
	return applied, nil
}

func packLoc(key, off int64) uint64 { return ^(uint64(key)<<16 | uint64(off)) }

func unpackLoc(loc uint64) (key, off int64) {
	v := ^loc
	return int64(v >> 16), int64(v & 0xFFFF)
}

func (m *Map) updateDense(p *page, lo, cnt int, key, off int64, seq uint64) int64 {
	var applied int64
	d := p.d[lo : lo+cnt]
	for i := range d {
		e := &d[i]
		if e.loc != 0 {
			if e.seq > seq {
				continue
			}
			k, _ := unpackLoc(e.loc)
			m.objs.drop(k)
		} else {
			p.n++
			m.written++
		}
		o := off
		if off != zeroOff {
			o = off + int64(i)
		}
		e.loc = packLoc(key, o)
		e.seq = seq
		applied++
	}
	return applied
}

// lowerBound returns the first position in sp whose idx >= idx.
func lowerBound(sp []sparseEntry, idx int) int {
	i, j := 0, len(sp)
	for i < j {
		h := int(uint(i+j) >> 1)
		if int(sp[h].idx) < idx {
			i = h + 1
		} else {
			j = h
		}
	}
	return i
}

// fits reports whether key can be stored relative to the page's base.
func (p *page) fits(key int64) bool {
	return key >= p.base && key-p.base <= math.MaxUint32
}

// rebase moves the page's key base so that its entries and key all fit,
// if their span allows it.
func (p *page) rebase(key int64) bool {
	lo, hi := key, key
	for _, e := range p.sp {
		k := p.base + int64(e.kd)
		lo, hi = min(lo, k), max(hi, k)
	}
	if hi-lo > math.MaxUint32 {
		return false
	}
	nb := max(0, lo-(math.MaxUint32-(hi-lo))/2)
	for i := range p.sp {
		p.sp[i].kd = uint32(p.base + int64(p.sp[i].kd) - nb)
	}
	p.base = nb
	return true
}

// densify converts a sparse page to the dense form.
func (m *Map) densify(p *page) {
	d := new([pageLen]denseEntry)
	for _, e := range p.sp {
		d[e.idx] = denseEntry{loc: packLoc(p.base+int64(e.kd), int64(e.off)), seq: e.seq}
	}
	m.sparseCap -= int64(cap(p.sp))
	p.d, p.sp, p.base = d, nil, 0
	m.dense++
}

// growSparse returns a slice with p.sp's entries [0, i) copied and room for
// need entries, with modest slack: the slack is what separates the sparse
// form's memory from the 16 bytes an entry needs.
func growSparse(sp []sparseEntry, need, i int) []sparseEntry {
	want := need + max(need/8, 4)
	// Appending to nil rounds the capacity up to the allocator's size class,
	// so the rounding is usable capacity rather than waste.
	ns := append([]sparseEntry(nil), make([]sparseEntry, want)...)
	copy(ns, sp[:i])
	return ns[:need]
}

func (m *Map) updateSparse(p *page, lo, cnt int, key, off int64, seq uint64) int64 {
	src := p.sp
	n := len(src)
	i, j := n, n
	if n > 0 && int(src[n-1].idx) >= lo { // else: appending, as sequential writes do
		i = lowerBound(src, lo)
		j = i + lowerBound(src[i:], lo+cnt)
	}
	missing := cnt - (j - i)
	if !p.fits(key) && !p.rebase(key) {
		// Keys too far apart for 32-bit offsets: runs hold whole keys
		// (reform turns the page dense if the runs get too many).
		m.toRuns(p)
		return m.updateRuns(p, lo, cnt, key, off, seq)
	}
	if n+missing > sparseMax {
		m.densify(p)
		return m.updateDense(p, lo, cnt, key, off, seq)
	}
	kd := uint32(key - p.base)
	var applied int64
	if missing == 0 {
		// Every block already has an entry: replace in place.
		for k := i; k < j; k++ {
			e := &src[k]
			if e.seq > seq {
				continue
			}
			m.objs.drop(p.base + int64(e.kd))
			o := off
			if off != zeroOff {
				o = off + int64(e.idx) - int64(lo)
			}
			*e = sparseEntry{seq: seq, kd: kd, off: uint16(o), idx: e.idx}
			applied++
		}
		return applied
	}
	need := n + missing
	dst := src[:cap(src)]
	if need > cap(src) {
		dst = growSparse(src, need, i)
		m.sparseCap += int64(cap(dst) - cap(src))
	}
	dst = dst[:need]
	// Move the tail past the range, then fill the range, which after the
	// update holds exactly one entry per block lo..lo+cnt-1, from its end:
	// an old entry for block b sits at or before b's new position, and
	// positions are written in decreasing order, so no unread old entry is
	// overwritten.
	copy(dst[i+cnt:], src[j:n])
	k := j - 1
	for b := lo + cnt - 1; b >= lo; b-- {
		pos := i + b - lo
		if k >= i && int(src[k].idx) == b {
			old := src[k]
			k--
			if old.seq > seq {
				dst[pos] = old
				continue
			}
			m.objs.drop(p.base + int64(old.kd))
		} else {
			p.n++
			m.written++
		}
		o := off
		if off != zeroOff {
			o = off + int64(b-lo)
		}
		dst[pos] = sparseEntry{seq: seq, kd: kd, off: uint16(o), idx: uint16(b)}
		applied++
	}
	p.sp = dst
	return applied
}

// Extent is a run of consecutive blocks reported by Lookup and Scan.
type Extent struct {
	Block int64 // first device block
	N     int64 // number of blocks
	Key   int64 // object holding the data; -1: unmapped (reads as zeros)
	Off   int64 // block offset of Block's data in the object (0 for zeros)
	Zero  bool  // zero tombstone: reads as zeros, recorded by object Key
}

// entryAt decodes the entry of block idx of page p; key -1 if unwritten.
func (p *page) entryAt(idx int) (key, off int64, seq uint64) {
	if p.rn != nil {
		rs := p.rn.r
		if k := runAt(rs, idx); k < len(rs) && int(rs[k].idx) <= idx {
			r := rs[k]
			return r.key(), r.offAt(idx), r.seq
		}
		return -1, 0, 0
	}
	if p.d != nil {
		e := p.d[idx]
		if e.loc == 0 {
			return -1, 0, 0
		}
		k, o := unpackLoc(e.loc)
		return k, o, e.seq
	}
	k := lowerBound(p.sp, idx)
	if k < len(p.sp) && int(p.sp[k].idx) == idx {
		e := p.sp[k]
		return p.base + int64(e.kd), int64(e.off), e.seq
	}
	return -1, 0, 0
}

// Seq returns the seqno of block's entry, 0 if unwritten or out of range.
func (m *Map) Seq(block int64) uint64 {
	if block < 0 || block >= m.blocks {
		return 0
	}
	p := m.page(block >> pageShift)
	if p == nil {
		return 0
	}
	_, _, seq := p.entryAt(int(block & pageMask))
	return seq
}

// lookupAcc coalesces per-block results into extents for Lookup.
type lookupAcc struct {
	cur Extent
	ok  bool
	fn  func(Extent)
}

func (a *lookupAcc) add(block, n, key, off int64) {
	zero := off == zeroOff
	if zero || key < 0 {
		off = 0
	}
	c := &a.cur
	if a.ok && c.Key == key && c.Zero == zero && (key < 0 || zero || c.Off+c.N == off) {
		c.N += n
		return
	}
	if a.ok {
		a.fn(*c)
	}
	*c = Extent{Block: block, N: n, Key: key, Off: off, Zero: zero}
	a.ok = true
}

// Lookup calls fn, in block order, for consecutive extents that exactly
// cover [block, block+n). Blocks are coalesced into one extent when their
// data is contiguous in one object (same key, offsets +1), when all are
// unmapped, or when all are tombstones recorded by the same object. Blocks
// outside the device are reported unmapped. fn must not modify the map.
func (m *Map) Lookup(block, n int64, fn func(Extent)) {
	if n <= 0 || block > math.MaxInt64-n {
		return
	}
	a := lookupAcc{fn: fn}
	end := block + n
	for block < end {
		if block < 0 || block >= m.blocks {
			// Outside the device: unmapped up to the device start or end.
			next := end
			if block < 0 {
				next = min(end, 0)
			}
			a.add(block, next-block, -1, 0)
			block = next
			continue
		}
		pi := block >> pageShift
		lo := int(block & pageMask)
		cnt := int(min(end, m.blocks, (pi+1)<<pageShift) - block)
		p := m.page(pi)
		switch {
		case p == nil:
			a.add(block, int64(cnt), -1, 0)
		case p.rn != nil:
			lookupRuns(&a, p.rn.r, lo, cnt, block)
		case p.d != nil:
			lookupDense(&a, p.d[lo:lo+cnt], block)
		default:
			sp := p.sp
			k := lowerBound(sp, lo)
			hi := lo + cnt
			for b := lo; b < hi; {
				if k < len(sp) && int(sp[k].idx) == b {
					e := sp[k]
					a.add(block+int64(b-lo), 1, p.base+int64(e.kd), int64(e.off))
					k++
					b++
					continue
				}
				next := hi
				if k < len(sp) && int(sp[k].idx) < hi {
					next = int(sp[k].idx)
				}
				a.add(block+int64(b-lo), int64(next-b), -1, 0)
				b = next
			}
		}
		block += int64(cnt)
	}
	if a.ok {
		fn(a.cur)
	}
}

// lookupDense reports the entries d of blocks block, block+1, … in runs:
// a run of data continues while the packed location counts down by one
// (same key, next offset) and does not reach a tombstone.
func lookupDense(a *lookupAcc, d []denseEntry, block int64) {
	for i := 0; i < len(d); {
		loc := d[i].loc
		j := i + 1
		switch {
		case loc == 0:
			for j < len(d) && d[j].loc == 0 {
				j++
			}
		case ^loc&0xFFFF == zeroOff:
			for j < len(d) && d[j].loc == loc {
				j++
			}
		default:
			for j < len(d) && d[j].loc == loc-uint64(j-i) && ^d[j].loc&0xFFFF != zeroOff {
				j++
			}
		}
		if loc == 0 {
			a.add(block+int64(i), int64(j-i), -1, 0)
		} else {
			k, o := unpackLoc(loc)
			a.add(block+int64(i), int64(j-i), k, o)
		}
		i = j
	}
}

// scanAcc coalesces per-block entries into extents of one seqno for Scan.
type scanAcc struct {
	cur  Extent
	seq  uint64
	ok   bool
	stop bool
	fn   func(Extent, uint64) bool
}

// add reports n blocks from block on, contiguous in key from off (or
// tombstones when off is zeroOff), written with seq.
func (a *scanAcc) add(block, n, key, off int64, seq uint64) {
	zero := off == zeroOff
	if zero {
		off = 0
	}
	c := &a.cur
	if a.ok && c.Block+c.N == block && c.Key == key && c.Zero == zero && a.seq == seq && (zero || c.Off+c.N == off) {
		c.N += n
		return
	}
	a.flush()
	*c = Extent{Block: block, N: n, Key: key, Off: off, Zero: zero}
	a.seq = seq
	a.ok = true
}

func (a *scanAcc) flush() {
	if a.ok && !a.stop {
		a.stop = !a.fn(a.cur, a.seq)
	}
	a.ok = false
}

// Scan calls fn, in block order, for every written extent (data and
// tombstones) with blocks in [from, from+n); unwritten blocks are skipped,
// unallocated pages cheaply. An extent groups consecutive blocks that are
// contiguous in one object and were written with the same seqno, which fn
// receives with it (GC copies must keep the original seqno). Scan stops
// early when fn returns false. fn must not modify the map.
func (m *Map) Scan(from, n int64, fn func(e Extent, seq uint64) bool) {
	a := scanAcc{fn: fn}
	if from < 0 {
		n += from
		from = 0
	}
	end := m.blocks
	if n < end-from {
		end = from + n
	}
	for block := from; block < end && !a.stop; {
		pi := block >> pageShift
		if m.dir[pi>>dirShift] == nil {
			block = (pi>>dirShift + 1) << (dirShift + pageShift)
			continue
		}
		lo := int(block & pageMask)
		cnt := int(min(end, (pi+1)<<pageShift) - block)
		p := m.page(pi)
		switch {
		case p == nil:
		case p.rn != nil:
			scanRuns(&a, p.rn.r, lo, cnt, block)
		case p.d != nil:
			for i, e := range p.d[lo : lo+cnt] {
				if e.loc != 0 {
					k, o := unpackLoc(e.loc)
					a.add(block+int64(i), 1, k, o, e.seq)
				}
			}
		default:
			hi := lo + cnt
			for _, e := range p.sp[lowerBound(p.sp, lo):] {
				if int(e.idx) >= hi {
					break
				}
				a.add(block+int64(int(e.idx)-lo), 1, p.base+int64(e.kd), int64(e.off), e.seq)
			}
		}
		block += int64(cnt)
	}
	a.flush()
}
