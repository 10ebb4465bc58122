package chunker

// The overlay locates the newest pending write of every block that has
// one (docs/ARCHITECTURE.md §4.4). It holds extents, not blocks: a 1 MiB
// write is one entry, not 256, and consecutive writes to one chunk merge.
// The chunker numbers writes under its lock (chunk.Sequencer), so a write
// noted later is always newer than what it covers: set simply replaces.
// The extents are kept in an ovIndex (ovindex.go: why not a library
// B-tree), so lookups, inserts and drops are logarithmic in the number of
// extents.

// ovExt is n blocks from start whose newest pending write is in p.
type ovExt struct {
	start, n int64
	p        *pending
	off      int64 // byte offset in p's chunk buffer of block start's data; -1: reads as zeros
}

func (e ovExt) end() int64 { return e.start + e.n }

// sub is the part [from, to) of e.
func (e ovExt) sub(from, to int64, bs int64) ovExt {
	s := ovExt{start: from, n: to - from, p: e.p, off: -1}
	if e.off >= 0 {
		s.off = e.off + (from-e.start)*bs
	}
	return s
}

type overlay struct {
	t       *ovIndex
	bs      int64
	scratch []ovExt
}

func newOverlay(bs int64) *overlay { return newOverlayLeaves(bs, ovLeafMax) }

// newOverlayLeaves is newOverlay with leaves of at most leafMax extents
// (tests use small ones to split and merge leaves often).
func newOverlayLeaves(bs int64, leafMax int) *overlay {
	return &overlay{t: newOVIndex(leafMax), bs: bs}
}

func (o *overlay) len() int { return o.t.len() }

// each calls fn, in block order, for the extents that overlap [start,
// end) until fn returns false. fn must not change the overlay.
func (o *overlay) each(start, end int64, fn func(ovExt) bool) {
	p := o.t.seek(start)
	if q, ok := o.t.prev(p); ok {
		if e := o.t.at(q); e.end() > start && !fn(e) {
			return
		}
	}
	for ; o.t.valid(p); p = o.t.next(p) {
		e := o.t.at(p)
		if e.start >= end || !fn(e) {
			return
		}
	}
}

// set records n blocks at start as written to p at buffer offset off
// (-1: zeros), replacing whatever covered them. A write to blocks no
// pending write covers (the common case) costs one search, and one that
// continues the extent before it (sequential writes) extends that extent
// in place.
func (o *overlay) set(start, n int64, p *pending, off int64) {
	end := start + n
	pos := o.t.seek(start)
	// The extent before start, if any: it may cover start, or end there
	// and merge.
	var left ovExt
	lpos, hasLeft := o.t.prev(pos)
	if hasLeft {
		left = o.t.at(lpos)
	}
	covered := hasLeft && left.end() > start
	later := o.t.valid(pos) && o.t.at(pos).start < end
	if !covered && !later {
		if hasLeft && left.end() == start && continues(left, p, off, o.bs) {
			o.t.grow(lpos, n)
			return
		}
		o.t.insertAt(pos, ovExt{start: start, n: n, p: p, off: off})
		return
	}
	// Overlaps: take the covered extents out, put their uncovered parts
	// back, then insert the new extent. left stays the extent ending at
	// start, if one does: the one before, or what is left of it.
	o.scratch = o.scratch[:0]
	if covered {
		o.scratch = append(o.scratch, left)
	}
	for q := pos; o.t.valid(q); q = o.t.next(q) {
		e := o.t.at(q)
		if e.start >= end {
			break
		}
		o.scratch = append(o.scratch, e)
	}
	for _, e := range o.scratch {
		o.delete(e.start)
		if e.start < start {
			left = e.sub(e.start, start, o.bs)
			o.insert(left)
		}
		if e.end() > end {
			o.insert(e.sub(end, e.end(), o.bs))
		}
	}
	ne := ovExt{start: start, n: n, p: p, off: off}
	// A write that continues the previous one in the same chunk extends
	// its extent: sequential writes cost one entry per chunk.
	if left.n > 0 && left.end() == start && continues(left, p, off, o.bs) {
		o.delete(left.start)
		ne.start, ne.n, ne.off = left.start, left.n+n, left.off
	}
	o.insert(ne)
}

// continues reports whether a write to p at buffer offset off continues
// extent left (which ends where the write starts) in the same chunk:
// data right after left's, or zeros after zeros.
func continues(left ovExt, p *pending, off, bs int64) bool {
	return left.p == p && left.n > 0 &&
		((left.off < 0 && off < 0) || (left.off >= 0 && off >= 0 && left.off+left.n*bs == off))
}

func (o *overlay) insert(e ovExt) { o.t.insertAt(o.t.seek(e.start), e) }

func (o *overlay) delete(start int64) {
	if p, ok := o.t.find(start); ok {
		o.t.deleteAt(p)
	}
}

// drop removes the extents of p within the runs it was written to. A run
// still covered by one extent of p starting where it does (the common
// case) costs one search.
func (o *overlay) drop(p *pending) {
	for _, r := range p.runs {
		if q, ok := o.t.find(r[0]); ok {
			if e := o.t.at(q); e.p == p && e.end() >= r[0]+r[1] {
				o.t.deleteAt(q)
				continue
			}
		}
		o.scratch = o.scratch[:0]
		o.each(r[0], r[0]+r[1], func(e ovExt) bool {
			if e.p == p {
				o.scratch = append(o.scratch, e)
			}
			return true
		})
		for _, e := range o.scratch {
			o.delete(e.start)
		}
	}
}
