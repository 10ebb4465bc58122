package cache

import (
	"container/list"
	"sync"
)

// streamTier holds the windows a sequential stream takes once: what
// readahead fetched ahead of it and what its own reads fetched of the
// objects it reads through. They would otherwise go to the main tier,
// whose admission policy (W-TinyLFU) weighs a new window against the
// windows already there by how often each was used: a stream's new
// windows, used at most once so far, lose to the ones it already
// passed, and were dropped before the stream reached them (measured: a
// cold 1 GiB read after 256 MiB of random overwrites refetched ~600 MiB).
// Here they are kept in arrival order and leave oldest first, so a window
// readahead fetched stays until the stream has had the time to take it;
// a window used a second time is no longer a stream's and moves to the
// main tier (docs/ARCHITECTURE.md §1, read path).
type streamTier struct {
	mu    sync.Mutex
	max   int64
	used  int64
	items map[Key]*list.Element // of *streamEntry
	order list.List             // oldest first
	// evicted, when set, is told of each window dropped for room (under
	// mu: it must not block), before the tier's reference is released.
	evicted func(Key, *entry)
	// release drops the tier's reference on an entry that leaves it
	// (pool.go): the tier takes one with each put.
	release func(*entry)
}

type streamEntry struct {
	key  Key
	e    *entry
	uses int
}

func newStreamTier(max int64) *streamTier {
	return &streamTier{max: max, items: make(map[Key]*list.Element)}
}

func weight(k Key, e *entry) int64 { return int64(len(e.data) + len(k.Volume) + entryOverhead) }

// put adds (or replaces) window k, dropping the oldest windows beyond the
// bound.
func (s *streamTier) put(k Key, e *entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if el, ok := s.items[k]; ok {
		s.remove(el)
	}
	w := weight(k, e)
	if w > s.max {
		return
	}
	e.hold()
	s.items[k] = s.order.PushBack(&streamEntry{key: k, e: e})
	s.used += w
	for s.used > s.max {
		el := s.order.Front()
		if s.evicted != nil {
			se := el.Value.(*streamEntry)
			s.evicted(se.key, se.e)
		}
		s.remove(el)
	}
}

// get returns window k, with a reference the caller releases, and
// whether this is its second use (the caller moves it to the main tier,
// and it leaves this one).
func (s *streamTier) get(k Key) (e *entry, again, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	el, ok := s.items[k]
	if !ok {
		return nil, false, false
	}
	se := el.Value.(*streamEntry)
	if !se.e.acquire() { // never: the tier holds a reference
		return nil, false, false
	}
	se.uses++
	if se.uses > 1 {
		s.remove(el)
		return se.e, true, true
	}
	return se.e, false, true
}

// contains reports whether window k is held, without using it.
func (s *streamTier) contains(k Key) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.items[k]
	return ok
}

// drop removes window k (it moved to the main tier).
func (s *streamTier) drop(k Key) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if el, ok := s.items[k]; ok {
		s.remove(el)
	}
}

// remove takes el out of the tier and releases the tier's reference.
func (s *streamTier) remove(el *list.Element) {
	se := el.Value.(*streamEntry)
	s.order.Remove(el)
	delete(s.items, se.key)
	s.used -= weight(se.key, se.e)
	if s.release != nil {
		s.release(se.e)
	}
}

func (s *streamTier) weight() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.used
}

func (s *streamTier) purge() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for el := s.order.Front(); el != nil; {
		next := el.Next()
		s.remove(el)
		el = next
	}
}
