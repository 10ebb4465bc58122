package extentmap

import (
	"fmt"
	"unsafe"
)

// Per-object counters. Keys are dense (0, 1, 2, …), so counters live in
// fixed chunks of 256 objects indexed by key, found through a two-level
// table of chunk pointers that starts at the lowest tracked key. Chunks are
// small so that a few long-lived objects among many collected ones (cold
// data written once, then years of churn) pin little memory; the second
// level keeps the table small when the span between the oldest live key and
// the newest grows very large over a volume's life.
const (
	objShift = 8
	objLen   = 1 << objShift // objects per chunk
	objMask  = objLen - 1

	midShift = 9
	midLen   = 1 << midShift // chunks per mid-level table (2^17 keys)
	midMask  = midLen - 1

	// maxKeySpan bounds highest - lowest tracked key (2^38 objects of 4 MiB
	// are an exbibyte written while the oldest object stays live); it keeps
	// the top-level table of a corrupt checkpoint within 16 MiB.
	maxKeySpan = 1 << 38
)

// object is the accounting of one object key.
type object struct {
	live  int64 // map entries pointing to the object (tombstones included)
	total int32 // blocks the object was written with (<= MaxOff+1); < 0: not tracked
	// start is the byte offset of the object's data area, 0 for the
	// layout's whole metadata area (docs/ARCHITECTURE.md §3): only
	// compact objects record one.
	start int32
}

type objChunk struct {
	o       [objLen]object
	tracked int
}

type objMid struct {
	c    [midLen]*objChunk
	used int // non-nil chunks
}

type objects struct {
	top     []*objMid
	base    int64 // top index (key >> (objShift+midShift)) of top[0]
	tracked int64
}

const topShift = objShift + midShift

// slot returns the counters slot of key, or nil if its chunk is absent.
func (s *objects) slot(key int64) *object {
	ti := key>>topShift - s.base
	if key < 0 || ti < 0 || ti >= int64(len(s.top)) || s.top[ti] == nil {
		return nil
	}
	c := s.top[ti].c[key>>objShift&midMask]
	if c == nil {
		return nil
	}
	return &c.o[key&objMask]
}

// get returns the counters of a tracked key, or nil.
func (s *objects) get(key int64) *object {
	if o := s.slot(key); o != nil && o.total >= 0 {
		return o
	}
	return nil
}

// track returns key's counters, tracking it (total 0) if it was not.
func (s *objects) track(key int64) (*object, error) {
	if o := s.get(key); o != nil {
		return o, nil
	}
	ti := key >> topShift
	switch {
	case len(s.top) == 0:
		s.top = append(s.top[:0], nil)
		s.base = ti
	case ti < s.base:
		hi := s.base + int64(len(s.top))
		if (hi-ti)<<topShift > maxKeySpan {
			return nil, fmt.Errorf("key %d too far below oldest tracked object %d: %w", key, s.base<<topShift, ErrRange)
		}
		nt := make([]*objMid, hi-ti)
		copy(nt[s.base-ti:], s.top)
		s.top, s.base = nt, ti
	case ti >= s.base+int64(len(s.top)):
		if (ti-s.base+1)<<topShift > maxKeySpan {
			return nil, fmt.Errorf("key %d too far above oldest tracked object %d: %w", key, s.base<<topShift, ErrRange)
		}
		s.top = append(s.top, make([]*objMid, ti-s.base-int64(len(s.top))+1)...)
	}
	mid := s.top[ti-s.base]
	if mid == nil {
		mid = new(objMid)
		s.top[ti-s.base] = mid
	}
	c := mid.c[key>>objShift&midMask]
	if c == nil {
		c = new(objChunk)
		for i := range c.o {
			c.o[i].total = -1
		}
		mid.c[key>>objShift&midMask] = c
		mid.used++
	}
	o := &c.o[key&objMask]
	o.total, o.start = 0, 0
	c.tracked++
	s.tracked++
	return o, nil
}

// drop decrements the live count of key, which an entry referenced and so
// is tracked.
func (s *objects) drop(key int64) { s.dropN(key, 1) }

// dropN decrements the live count of key, which entries referenced, by n.
func (s *objects) dropN(key, n int64) {
	s.top[key>>topShift-s.base].c[key>>objShift&midMask].o[key&objMask].live -= n
}

func (s *objects) forget(key int64) error {
	o := s.get(key)
	if o == nil {
		return fmt.Errorf("forget key %d: not tracked", key)
	}
	if o.live != 0 {
		return fmt.Errorf("forget key %d: still %d live blocks", key, o.live)
	}
	o.total = -1
	s.tracked--
	ti := key>>topShift - s.base
	mid := s.top[ti]
	ci := key >> objShift & midMask
	if mid.c[ci].tracked--; mid.c[ci].tracked > 0 {
		return nil
	}
	mid.c[ci] = nil
	if mid.used--; mid.used > 0 {
		return nil
	}
	s.top[ti] = nil
	lo, hi := 0, len(s.top)
	for lo < hi && s.top[lo] == nil {
		lo++
	}
	for hi > lo && s.top[hi-1] == nil {
		hi--
	}
	if lo == hi {
		s.top, s.base = nil, 0
		return nil
	}
	// Copy rather than reslice, so the trimmed part of the old array is
	// freed (this happens once per 2^17 keys at most).
	s.top = append([]*objMid(nil), s.top[lo:hi]...)
	s.base += int64(lo)
	return nil
}

// each calls fn for every tracked key in order until fn returns false.
func (s *objects) each(fn func(key int64, o *object) bool) {
	for ti, mid := range s.top {
		if mid == nil {
			continue
		}
		for ci, c := range mid.c {
			if c == nil {
				continue
			}
			first := (s.base+int64(ti))<<topShift | int64(ci)<<objShift
			for i := range c.o {
				if c.o[i].total < 0 {
					continue
				}
				if !fn(first|int64(i), &c.o[i]) {
					return
				}
			}
		}
	}
}

func (s *objects) heapBytes() int64 {
	b := int64(cap(s.top)) * 8
	for _, mid := range s.top {
		if mid == nil {
			continue
		}
		b += int64(unsafe.Sizeof(*mid))
		for _, c := range mid.c {
			if c != nil {
				b += int64(unsafe.Sizeof(*c))
			}
		}
	}
	return b
}

// AddObject registers object key, applied to the map, with the number of
// blocks it was written with (0 for an empty placeholder; at most
// MaxOff+1, the most an object's data area can address). Registering a
// tracked key again replaces its total; live counts come only from map
// entries.
func (m *Map) AddObject(key int64, blocks int64) error {
	if key < 0 || key > MaxKey || blocks < 0 || blocks > MaxOff+1 {
		return fmt.Errorf("add object key %d with %d blocks: %w", key, blocks, ErrRange)
	}
	o, err := m.objs.track(key)
	if err != nil {
		return fmt.Errorf("add object: %w", err)
	}
	o.total = int32(blocks)
	return nil
}

// MaxDataStart bounds the data offset SetDataStart records: the largest
// metadata area of any layout (65,536 slots of 32 bytes).
const MaxDataStart = (MaxOff + 1) * 32

// SetDataStart records that the data area of tracked object key starts at
// byte start of the object; 0 (the default of AddObject) stands for the
// layout's whole metadata area. Only compact objects need it
// (docs/ARCHITECTURE.md §3); checkpoints keep it.
func (m *Map) SetDataStart(key, start int64) error {
	if start < 0 || start > MaxDataStart {
		return fmt.Errorf("set data start of key %d to %d: %w", key, start, ErrRange)
	}
	o := m.objs.get(key)
	if o == nil {
		return fmt.Errorf("set data start of key %d: not tracked", key)
	}
	o.start = int32(start)
	return nil
}

// DataStart returns the byte offset of tracked object key's data area as
// recorded by SetDataStart: 0 for the layout's whole metadata area, also
// for an untracked key.
func (m *Map) DataStart(key int64) int64 {
	if o := m.objs.get(key); o != nil {
		return int64(o.start)
	}
	return 0
}

// Live returns the live and total block counts of key, and whether key is
// tracked.
func (m *Map) Live(key int64) (live, total int64, ok bool) {
	o := m.objs.get(key)
	if o == nil {
		return 0, 0, false
	}
	return o.live, int64(o.total), true
}

// Objects calls fn for every tracked object in key order until fn returns
// false. fn must not modify the map.
func (m *Map) Objects(fn func(key, live, total int64) bool) {
	m.objs.each(func(key int64, o *object) bool { return fn(key, o.live, int64(o.total)) })
}

// TrackedObjects returns the number of tracked objects.
func (m *Map) TrackedObjects() int64 { return m.objs.tracked }

// Dead returns, in order, the tracked keys below below that no entry
// references (live == 0): objects that can be deleted or replaced by a
// placeholder. The caller decides which (e.g. never the newest object).
func (m *Map) Dead(below int64) []int64 {
	var dead []int64
	m.objs.each(func(key int64, o *object) bool {
		if key >= below {
			return false
		}
		if o.live == 0 {
			dead = append(dead, key)
		}
		return true
	})
	return dead
}

// Forget stops tracking key, whose object was deleted. Only a dead object
// (live == 0) can be forgotten; anything else is an error and changes
// nothing.
func (m *Map) Forget(key int64) error {
	return m.objs.forget(key)
}
