package cache

import (
	"fmt"
	"unsafe"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Window memory comes from an arena of slabs mapped outside the Go heap
// and advised for transparent huge pages (docs/ARCHITECTURE.md §1,
// "Window memory"). A cache of hundreds of MiB read at random misses the
// TLB on nearly every window with 4 KiB pages; with 2 MiB pages it
// mostly does not. Measured through FUSE + loop, 4 KiB random reads over
// a 64 MiB hot set with 320 MiB cached: 48–53 K IOPS from the arena,
// 40–42 K from the heap (BenchmarkFUSEReadJobs, two runs each). Go's heap
// gets no huge pages where the kernel grants them only on request
// (transparent_hugepage=madvise, the common default), hence our own
// mappings. First touch is no cheaper on average on this VM (a huge
// page fault may compact memory: 60 ms–1.5 s to fill 384 MiB, the heap
// 0.2–0.8 s), and happens once per 2 MiB of the cache's life.
//
// The arena maps at most the cache's memory limit, lazily, one slab at a
// time; windows beyond it (held by readers or the disk queue while the
// tiers are full) come from the heap as before. Arena windows always go
// back to the pool, never to the garbage collector, which cannot free
// them; Close unmaps the arena once every window is back. The race
// detector does not watch memory outside the heap, so the concurrency
// test of the pool runs on heap windows too.

const (
	slabBytes = 32 << 20 // one mapping
	hugePage  = 2 << 20  // the alignment that lets the kernel use huge pages
)

type arena struct {
	limit  int64 // bytes the arena may map; 0: windows come from the heap
	mapped int64
	maps   [][]byte     // whole mappings, for unmapping
	slabs  [][2]uintptr // the [start, end) addresses windows are carved from
	rest   []byte       // the part of the newest slab not carved yet
	carved int          // windows carved so far
	failed error        // the mapping that failed: the heap from then on
	log    zerolog.Logger
}

// carve returns a new window of win bytes (cap win) of arena memory, or
// nil when the arena is at its limit or cannot map.
func (a *arena) carve(win int64) []byte {
	if int64(len(a.rest)) < win {
		size := min(slabBytes, a.limit-a.mapped) / win * win
		if a.failed != nil || size <= 0 {
			return nil
		}
		m, err := unix.Mmap(-1, 0, int(size+hugePage), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			a.failed = fmt.Errorf("map %d bytes of window memory: %w", size+hugePage, err)
			a.log.Warn().Err(a.failed).Msg("window memory comes from the Go heap from now on")
			return nil
		}
		base := uintptr(unsafe.Pointer(unsafe.SliceData(m)))
		skip := (hugePage - base%hugePage) % hugePage
		slab := m[skip : skip+uintptr(size) : skip+uintptr(size)]
		// Advice only: without transparent huge pages (or with them
		// off) the slab is backed by small pages, which works the same.
		ev := a.log.Debug().Int64("bytes", size)
		if err := unix.Madvise(slab, unix.MADV_HUGEPAGE); err != nil {
			ev = ev.AnErr("huge_pages", err)
		}
		ev.Msg("mapped window memory")
		a.maps = append(a.maps, m)
		start := base + skip
		a.slabs = append(a.slabs, [2]uintptr{start, start + uintptr(size)})
		a.mapped += size
		a.rest = slab
	}
	b := a.rest[:win:win]
	a.rest = a.rest[win:]
	a.carved++
	return b
}

// owns reports whether b is arena memory.
func (a *arena) owns(b []byte) bool {
	if len(a.slabs) == 0 || cap(b) == 0 {
		return false
	}
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	for _, s := range a.slabs {
		if p >= s[0] && p < s[1] {
			return true
		}
	}
	return false
}

// unmap releases every mapping. The caller guarantees that no window of
// the arena is held any more: touching one afterwards would crash.
func (a *arena) unmap() error {
	var first error
	for _, m := range a.maps {
		if err := unix.Munmap(m); err != nil && first == nil {
			first = fmt.Errorf("unmap window memory: %w", err)
		}
	}
	a.maps, a.slabs, a.rest, a.mapped, a.carved = nil, nil, nil, 0, 0
	return first
}
