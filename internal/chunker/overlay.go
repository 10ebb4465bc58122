package chunker

import "github.com/google/btree"

// The overlay locates the newest pending write of every block that has
// one (docs/ARCHITECTURE.md §4.4). It holds extents, not blocks: a 1 MiB
// write is one entry, not 256, and consecutive writes to one chunk merge.
// The chunker numbers writes under its lock (chunk.Sequencer), so a write
// noted later is always newer than what it covers: set simply replaces.
// A B-tree keeps lookups, inserts and drops logarithmic in the number of
// extents; it is a well-kept library (github.com/google/btree) rather
// than a hand-written ordered structure.

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
	t       *btree.BTreeG[ovExt]
	bs      int64
	scratch []ovExt
}

func newOverlay(bs int64) *overlay {
	return &overlay{t: btree.NewG(64, func(a, b ovExt) bool { return a.start < b.start }), bs: bs}
}

func (o *overlay) len() int { return o.t.Len() }

// each calls fn, in block order, for the extents that overlap [start,
// end) until fn returns false.
func (o *overlay) each(start, end int64, fn func(ovExt) bool) {
	more := true
	o.t.DescendLessOrEqual(ovExt{start: start}, func(e ovExt) bool {
		if e.start < start && e.end() > start {
			more = fn(e)
		}
		return false
	})
	if more {
		o.t.AscendRange(ovExt{start: start}, ovExt{start: end}, fn)
	}
}

// set records n blocks at start as written to p at buffer offset off
// (-1: zeros), replacing whatever covered them. A write to blocks no
// pending write covers (the common case) costs three tree walks, two for
// a single block.
func (o *overlay) set(start, n int64, p *pending, off int64) {
	end := start + n
	o.scratch = o.scratch[:0]
	var left ovExt // the extent ending at start, if any: may merge
	o.t.DescendLessOrEqual(ovExt{start: start}, func(e ovExt) bool {
		if e.end() > start {
			o.scratch = append(o.scratch, e)
		} else if e.end() == start {
			left = e
		}
		return false
	})
	if n > 1 { // extents starting inside (start, end): none for one block
		o.t.AscendGreaterOrEqual(ovExt{start: start + 1}, func(e ovExt) bool {
			if e.start >= end {
				return false
			}
			o.scratch = append(o.scratch, e)
			return true
		})
	}
	for _, e := range o.scratch {
		o.t.Delete(e)
		if e.start < start {
			left = e.sub(e.start, start, o.bs)
			o.t.ReplaceOrInsert(left)
		}
		if e.end() > end {
			o.t.ReplaceOrInsert(e.sub(end, e.end(), o.bs))
		}
	}
	ne := ovExt{start: start, n: n, p: p, off: off}
	// A write that continues the previous one in the same chunk extends
	// its extent: sequential writes cost one entry per chunk.
	if left.p == p && left.n > 0 && ((left.off < 0 && off < 0) || (left.off >= 0 && off >= 0 && left.off+left.n*o.bs == off)) {
		o.t.Delete(left)
		ne.start, ne.n, ne.off = left.start, left.n+n, left.off
	}
	o.t.ReplaceOrInsert(ne)
}

// drop removes the extents of p within the runs it was written to. A run
// still covered by one extent of p starting where it does (the common
// case) costs one tree walk.
func (o *overlay) drop(p *pending) {
	for _, r := range p.runs {
		if e, ok := o.t.Delete(ovExt{start: r[0]}); ok {
			if e.p == p && e.end() >= r[0]+r[1] {
				continue
			}
			o.t.ReplaceOrInsert(e) // not all of it: look properly
		}
		o.scratch = o.scratch[:0]
		o.each(r[0], r[0]+r[1], func(e ovExt) bool {
			if e.p == p {
				o.scratch = append(o.scratch, e)
			}
			return true
		})
		for _, e := range o.scratch {
			o.t.Delete(e)
		}
	}
}
