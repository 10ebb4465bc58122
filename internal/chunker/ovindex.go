package chunker

import "slices"

// ovIndex is the overlay's ordered set of extents, keyed by their first
// block (extents are disjoint, so the key is unique): a sorted list of
// leaves, each a sorted slice of at most leafMax extents, with the first
// key of every leaf in a slice of its own. A lookup is two binary
// searches over plain int64 keys (slices.BinarySearch), an insert or delete moves at most one
// leaf's entries (and, when a leaf splits, merges or empties, the leaf
// list).
//
// Why not a library B-tree: the overlay was github.com/google/btree, and
// its generic comparator, called through a closure on every step of
// every search, was two thirds of what noting a write cost (profile of
// BenchmarkOverlaySet: ~260 ns per tree walk, three walks per random
// 4 KiB write); github.com/tidwall/btree measured the same. Both are
// general ordered maps; the overlay needs lookup by an int64 key,
// in-order iteration from a position, and insert/delete at a position,
// which a two-level sorted array gives with comparisons the compiler
// inlines, in a little over half the time in that benchmark; under real
// load cache misses dominate and the gain is smaller
// (docs/ARCHITECTURE.md §18, "The overlay's index").
type ovIndex struct {
	leaves  []*ovLeaf // in block order, none empty
	firsts  []int64   // firsts[i] is leaves[i].e[0].start
	n       int       // extents in all leaves
	leafMax int
}

// ovLeaf holds its extents' starts apart from them: a search reads a
// few cache lines of keys, not of 32-byte extents.
type ovLeaf struct {
	keys []int64 // keys[i] == e[i].start
	e    []ovExt
}

func newOVLeaf(leafMax int) *ovLeaf {
	return &ovLeaf{keys: make([]int64, 0, leafMax+1), e: make([]ovExt, 0, leafMax+1)}
}

// ovPos is a position in the index: entry i of leaf li. The position
// past the last entry is (len(leaves), 0).
type ovPos struct{ li, i int }

const ovLeafMax = 128

func newOVIndex(leafMax int) *ovIndex { return &ovIndex{leafMax: leafMax} }

func (x *ovIndex) len() int { return x.n }

func (x *ovIndex) valid(p ovPos) bool { return p.li < len(x.leaves) }

func (x *ovIndex) at(p ovPos) ovExt { return x.leaves[p.li].e[p.i] }

// grow adds n blocks to the extent at p (its start, the key, stays).
func (x *ovIndex) grow(p ovPos, n int64) { x.leaves[p.li].e[p.i].n += n }

func (x *ovIndex) next(p ovPos) ovPos {
	if p.i+1 < len(x.leaves[p.li].e) {
		return ovPos{p.li, p.i + 1}
	}
	return ovPos{p.li + 1, 0}
}

// prev is the position before p; false at the first entry.
func (x *ovIndex) prev(p ovPos) (ovPos, bool) {
	if p.i > 0 {
		return ovPos{p.li, p.i - 1}, true
	}
	if p.li == 0 {
		return ovPos{}, false
	}
	return ovPos{p.li - 1, len(x.leaves[p.li-1].e) - 1}, true
}

// seek is the position of the first extent whose start is >= key (past
// the end if there is none).
func (x *ovIndex) seek(key int64) ovPos {
	// A leaf that starts at key holds the answer first; otherwise the
	// last leaf that starts before key holds it or is followed by it.
	li, found := slices.BinarySearch(x.firsts, key)
	if found {
		return ovPos{li, 0}
	}
	if li == 0 {
		return ovPos{0, 0} // before every leaf (or the index is empty)
	}
	li--
	i, _ := slices.BinarySearch(x.leaves[li].keys, key)
	if i == len(x.leaves[li].keys) {
		return ovPos{li + 1, 0}
	}
	return ovPos{li, i}
}

// insertAt inserts e at p, which must be where e.start sorts (seek's
// answer for it, with nothing changed since).
func (x *ovIndex) insertAt(p ovPos, e ovExt) {
	x.n++
	if len(x.leaves) == 0 {
		l := newOVLeaf(x.leafMax)
		l.keys, l.e = append(l.keys, e.start), append(l.e, e)
		x.leaves = append(x.leaves, l)
		x.firsts = append(x.firsts, e.start)
		return
	}
	if p.li == len(x.leaves) { // past the end: append to the last leaf
		p = ovPos{p.li - 1, len(x.leaves[p.li-1].e)}
	}
	l := x.leaves[p.li]
	l.keys = insertSlot(l.keys, p.i, e.start)
	l.e = insertSlot(l.e, p.i, e)
	if p.i == 0 {
		x.firsts[p.li] = e.start
	}
	if len(l.e) > x.leafMax {
		// Split in halves; the right half goes to a new leaf after it.
		h := len(l.e) / 2
		r := newOVLeaf(x.leafMax)
		r.keys, r.e = append(r.keys, l.keys[h:]...), append(r.e, l.e[h:]...)
		clear(l.e[h:]) // no pointers to pendings stay behind
		l.keys, l.e = l.keys[:h], l.e[:h]
		x.leaves = insertSlot(x.leaves, p.li+1, r)
		x.firsts = insertSlot(x.firsts, p.li+1, r.e[0].start)
	}
}

// deleteAt removes the extent at p.
func (x *ovIndex) deleteAt(p ovPos) {
	x.n--
	l := x.leaves[p.li]
	l.keys = deleteSlot(l.keys, p.i)
	l.e = deleteSlot(l.e, p.i)
	switch {
	case len(l.e) == 0:
		x.leaves = deleteSlot(x.leaves, p.li)
		x.firsts = deleteSlot(x.firsts, p.li)
		return
	case p.i == 0:
		x.firsts[p.li] = l.e[0].start
	}
	// A leaf that has shrunk to a quarter joins its right neighbour when
	// both fit in three quarters of a leaf, so the leaf list stays short.
	if len(l.e) < x.leafMax/4 && p.li+1 < len(x.leaves) {
		r := x.leaves[p.li+1]
		if len(l.e)+len(r.e) <= x.leafMax*3/4 {
			l.keys, l.e = append(l.keys, r.keys...), append(l.e, r.e...)
			x.leaves = deleteSlot(x.leaves, p.li+1)
			x.firsts = deleteSlot(x.firsts, p.li+1)
		}
	}
}

// find is the position of the extent starting at key; false if none does.
func (x *ovIndex) find(key int64) (ovPos, bool) {
	p := x.seek(key)
	return p, x.valid(p) && x.at(p).start == key
}

func insertSlot[T any](s []T, i int, v T) []T {
	var zero T
	s = append(s, zero)
	copy(s[i+1:], s[i:])
	s[i] = v
	return s
}

func deleteSlot[T any](s []T, i int) []T {
	var zero T
	copy(s[i:], s[i+1:])
	s[len(s)-1] = zero
	return s[:len(s)-1]
}
