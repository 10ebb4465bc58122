package extentmap

import "math"

// The runs form of a page (docs/ARCHITECTURE.md §8): one entry per run of
// consecutive blocks that one item wrote (same object, consecutive block
// offsets, same seqno), or per run of tombstones one item recorded. Runs
// are sorted, do not overlap, and are maximal: two adjacent runs that
// continue each other are merged, so a page has exactly one runs form.

// runEntry is one run of a runs page.
type runEntry struct {
	seq uint64
	loc uint64 // key<<16 | block offset of the first block (zeroOff: tombstones)
	idx uint16 // first block inside the page
	n   uint16 // blocks, 1..pageLen
}

// runList holds the runs of a page; the page points to it so that pages in
// the other forms pay one pointer, not a slice header.
type runList struct {
	r []runEntry
}

// Form thresholds. A run costs 24 bytes, a sparse entry 16 per block, a
// dense page 64 KiB. The gaps between the thresholds in the two
// directions keep a page from flipping forms on every update.
const (
	// runsToDenseRuns is the run count above which a runs page that the
	// sparse form cannot hold turns dense (runs cost half a dense page).
	runsToDenseRuns = pageLen * 16 / 24 / 2
	// denseToRunsRuns is the run count at or below which a dense page
	// turns to runs (a quarter of the dense cost).
	denseToRunsRuns = pageLen * 16 / 24 / 4
	// reformMin is the update length from which a sparse or dense page
	// checks whether runs would be cheaper: only long writes make runs.
	reformMin = 64
)

func (r runEntry) key() int64       { return int64(r.loc >> 16) }
func (r runEntry) zero() bool       { return r.loc&0xFFFF == zeroOff }
func (r runEntry) end() int         { return int(r.idx) + int(r.n) }
func (r runEntry) off() int64       { return int64(r.loc & 0xFFFF) }
func makeLoc(key, off int64) uint64 { return uint64(key)<<16 | uint64(off) }

// offAt returns the block offset of block idx of the run (zeroOff for a
// tombstone run).
func (r runEntry) offAt(idx int) int64 {
	if r.zero() {
		return zeroOff
	}
	return r.off() + int64(idx-int(r.idx))
}

// sub returns the part [from, to) of the run.
func (r runEntry) sub(from, to int) runEntry {
	s := runEntry{seq: r.seq, loc: r.loc, idx: uint16(from), n: uint16(to - from)}
	if !r.zero() {
		s.loc += uint64(from - int(r.idx))
	}
	return s
}

// continues reports whether run r starts where prev ends and continues it:
// same seqno and object, and either both tombstones or the next offsets.
// Offsets stop at MaxOff, so prev's loc plus its length never carries into
// the key, and equals a tombstone's loc only when r is data.
func continues(prev, r runEntry) bool {
	if prev.end() != int(r.idx) || prev.seq != r.seq {
		return false
	}
	if prev.zero() || r.zero() {
		return prev.loc == r.loc
	}
	return prev.loc+uint64(prev.n) == r.loc
}

// pushRun appends r to s, merging it into the last run if it continues it.
func pushRun(s []runEntry, r runEntry) []runEntry {
	if k := len(s) - 1; k >= 0 && continues(s[k], r) {
		s[k].n += r.n
		return s
	}
	return append(s, r)
}

// runAt returns the position of the first run of rs that ends after idx.
func runAt(rs []runEntry, idx int) int {
	i, j := 0, len(rs)
	for i < j {
		h := int(uint(i+j) >> 1)
		if rs[h].end() <= idx {
			i = h + 1
		} else {
			j = h
		}
	}
	return i
}

// growRuns returns a copy of rs with room for need runs and modest slack,
// like growSparse.
func growRuns(rs []runEntry, need int) []runEntry {
	want := need + max(need/8, 4)
	ns := append([]runEntry(nil), make([]runEntry, want)...)
	copy(ns, rs)
	return ns[:len(rs)]
}

// updateRuns is update on a runs page for blocks [lo, lo+cnt): blocks
// whose seqno is <= seq get key at off+(b-lo) (or tombstones). It rebuilds
// the runs touching the range, plus the neighbours so they can merge, in
// m.scratch and splices them in.
func (m *Map) updateRuns(p *page, lo, cnt int, key, off int64, seq uint64) int64 {
	rs := p.rn.r
	hi := lo + cnt
	i := runAt(rs, lo)
	j := i
	for j < len(rs) && int(rs[j].idx) < hi {
		j++
	}
	newRun := func(from, to int) runEntry {
		r := runEntry{seq: seq, loc: makeLoc(key, off), idx: uint16(from), n: uint16(to - from)}
		if off != zeroOff {
			r.loc += uint64(from - lo)
		}
		return r
	}
	var applied int64
	s := m.scratch[:0]
	a, b := i, j
	if a > 0 {
		a--
		s = append(s, rs[a])
	}
	pos := lo
	for k := i; k < j; k++ {
		r := rs[k]
		if int(r.idx) < lo {
			s = pushRun(s, r.sub(int(r.idx), lo))
		}
		st, en := max(int(r.idx), lo), min(r.end(), hi)
		if st > pos {
			s = pushRun(s, newRun(pos, st))
			p.n += int32(st - pos)
			m.written += int64(st - pos)
			applied += int64(st - pos)
		}
		if r.seq > seq {
			s = pushRun(s, r.sub(st, en))
		} else {
			m.objs.dropN(r.key(), int64(en-st))
			s = pushRun(s, newRun(st, en))
			applied += int64(en - st)
		}
		if r.end() > hi {
			s = pushRun(s, r.sub(hi, r.end()))
		}
		pos = en
	}
	if pos < hi {
		s = pushRun(s, newRun(pos, hi))
		p.n += int32(hi - pos)
		m.written += int64(hi - pos)
		applied += int64(hi - pos)
	}
	if b < len(rs) {
		s = pushRun(s, rs[b])
		b++
	}
	m.scratch = s[:0]
	// Replace rs[a:b] by s.
	need := len(rs) - (b - a) + len(s)
	if need > cap(rs) {
		ns := growRuns(rs[:a], need)
		m.runCap += int64(cap(ns) - cap(rs))
		ns = ns[:need]
		copy(ns[a+len(s):], rs[b:])
		copy(ns[a:], s)
		p.rn.r = ns
		return applied
	}
	ns := rs[:need]
	copy(ns[a+len(s):], rs[b:]) // copy handles the overlap
	copy(ns[a:], s)
	p.rn.r = ns
	return applied
}

// eachRun calls fn for the maximal runs of page p in order, whatever its
// form, until fn returns false.
func (p *page) eachRun(fn func(runEntry) bool) {
	if p.rn != nil {
		for _, r := range p.rn.r {
			if !fn(r) {
				return
			}
		}
		return
	}
	var cur runEntry
	ok := false
	put := func(r runEntry) bool {
		if ok && continues(cur, r) {
			cur.n++
			return true
		}
		if ok && !fn(cur) {
			return false
		}
		cur, ok = r, true
		return true
	}
	if p.d != nil {
		for idx, e := range p.d {
			if e.loc == 0 {
				continue
			}
			k, o := unpackLoc(e.loc)
			if !put(runEntry{seq: e.seq, loc: makeLoc(k, o), idx: uint16(idx), n: 1}) {
				return
			}
		}
	} else {
		for _, e := range p.sp {
			if !put(runEntry{seq: e.seq, loc: makeLoc(p.base+int64(e.kd), int64(e.off)), idx: e.idx, n: 1}) {
				return
			}
		}
	}
	if ok {
		fn(cur)
	}
}

// countRuns returns the number of maximal runs of p, or limit+1 if there
// are more than limit.
func (p *page) countRuns(limit int) int {
	r := 0
	p.eachRun(func(runEntry) bool {
		r++
		return r <= limit
	})
	return r
}

// freeForm releases p's sparse or dense storage.
func (m *Map) freeForm(p *page) {
	if p.d != nil {
		p.d = nil
		m.dense--
	}
	m.sparseCap -= int64(cap(p.sp))
	p.sp, p.base = nil, 0
}

// toRuns converts a sparse or dense page (possibly empty) to the runs form.
func (m *Map) toRuns(p *page) {
	var rs []runEntry
	if p.n > 0 {
		rs = make([]runEntry, 0, p.countRuns(pageLen))
		p.eachRun(func(r runEntry) bool {
			rs = append(rs, r)
			return true
		})
	}
	m.freeForm(p)
	p.rn = &runList{r: rs}
	m.runPages++
	m.runCap += int64(cap(rs))
}

// fromRuns drops p's runs form, returning its runs.
func (m *Map) fromRuns(p *page) []runEntry {
	rs := p.rn.r
	p.rn = nil
	m.runPages--
	m.runCap -= int64(cap(rs))
	return rs
}

// runsToSparse converts a runs page to the sparse form if its keys fit
// 32-bit offsets from one base; it reports whether it did.
func (m *Map) runsToSparse(p *page) bool {
	rs := p.rn.r
	lo, hi := rs[0].key(), rs[0].key()
	for _, r := range rs {
		lo, hi = min(lo, r.key()), max(hi, r.key())
	}
	if hi-lo > math.MaxUint32 {
		return false
	}
	m.fromRuns(p)
	p.base = max(0, lo-(math.MaxUint32-(hi-lo))/2)
	sp := make([]sparseEntry, 0, p.n)
	for _, r := range rs {
		kd := uint32(r.key() - p.base)
		for b := int(r.idx); b < r.end(); b++ {
			sp = append(sp, sparseEntry{seq: r.seq, kd: kd, off: uint16(r.offAt(b)), idx: uint16(b)})
		}
	}
	p.sp = sp
	m.sparseCap += int64(cap(sp))
	return true
}

// runsToDense converts a runs page to the dense form.
func (m *Map) runsToDense(p *page) {
	rs := m.fromRuns(p)
	d := new([pageLen]denseEntry)
	for _, r := range rs {
		for b := int(r.idx); b < r.end(); b++ {
			d[b] = denseEntry{loc: packLoc(r.key(), r.offAt(b)), seq: r.seq}
		}
	}
	p.d = d
	m.dense++
}

// runsCheap reports whether r runs holding n blocks cost at most about
// what the sparse form would (24 bytes a run against 16 a block).
func runsCheap(r, n int) bool { return 3*r <= 2*n+8 }

// reform moves page p to a cheaper form after an update of cnt blocks.
func (m *Map) reform(p *page, cnt int) {
	n := int(p.n)
	switch {
	case p.rn != nil:
		r := len(p.rn.r)
		if runsCheap(r, n) {
			return
		}
		if n <= sparseMax && m.runsToSparse(p) {
			return
		}
		if r > runsToDenseRuns {
			m.runsToDense(p)
		}
	case cnt < reformMin:
	case p.d != nil:
		if r := p.countRuns(denseToRunsRuns); r <= denseToRunsRuns && runsCheap(r, n) {
			m.toRuns(p)
		}
	default:
		// Sparse: only when runs would cost at most half as much.
		if r := p.countRuns(n / 3); 3*r <= n {
			m.toRuns(p)
		}
	}
}

// lookupRuns reports blocks [lo, lo+cnt) of runs page rs, the first at
// device block block.
func lookupRuns(a *lookupAcc, rs []runEntry, lo, cnt int, block int64) {
	hi := lo + cnt
	k := runAt(rs, lo)
	for b := lo; b < hi; {
		if k < len(rs) && int(rs[k].idx) <= b {
			r := rs[k]
			en := min(hi, r.end())
			a.add(block+int64(b-lo), int64(en-b), r.key(), r.offAt(b))
			b = en
			k++
			continue
		}
		next := hi
		if k < len(rs) && int(rs[k].idx) < hi {
			next = int(rs[k].idx)
		}
		a.add(block+int64(b-lo), int64(next-b), -1, 0)
		b = next
	}
}

// scanRuns reports the written blocks of [lo, lo+cnt) of runs page rs,
// the first at device block block.
func scanRuns(a *scanAcc, rs []runEntry, lo, cnt int, block int64) {
	hi := lo + cnt
	for k := runAt(rs, lo); k < len(rs) && int(rs[k].idx) < hi && !a.stop; k++ {
		r := rs[k]
		st, en := max(lo, int(r.idx)), min(hi, r.end())
		a.add(block+int64(st-lo), int64(en-st), r.key(), r.offAt(st), r.seq)
	}
}
