package cache

import (
	"sync"
	"sync/atomic"
	"time"
)

// Window memory is reused. Copying a GET body or a committed chunk into
// freshly allocated windows cost more than the copy itself: the heap
// grows, and first-touch page faults on this kind of VM made that copy
// run at under 1 GB/s. Measured on the fragmented cold read through NBD:
// 1.66 of bs3's 3.54 CPU-s went to that copy, 0.2 s once windows were
// reused (docs/ARCHITECTURE.md §1, "Window memory").
//
// A window the cache may reuse is *pooled*: its buffer came from Buffer
// and was handed over with Keep. Every holder of a pooled entry holds a
// reference: each tier it is stored in (one per store), the disk write
// queue while the record waits to be staged, and each reader between
// Acquire and Release. The buffer goes back to the pool only when the
// count falls to zero, so no tier, queue or reader can see it change. A
// reader that finds an entry whose count is already zero (evicted while
// it looked it up) takes it as a miss. A window loaded from the disk tier
// is read into a pooled buffer too (disk.go, readPlain).

// poisonRecycled, set by this package's tests, turns on
// Options.PoisonRecycled in every cache they build.
var poisonRecycled bool

// pool holds window buffers (cap = the window) no entry uses any more.
type pool struct {
	mu     sync.Mutex
	free   [][]byte
	max    int
	base   int  // max without ReservePool
	poison bool // Options.PoisonRecycled
	// reused counts buffers Buffer took from the pool, recycled the ones
	// returned to it; refErrors counts releases past zero (a bug: never
	// expected, and the buffer is then not reused).
	reused, recycled, refErrors atomic.Int64
	refErrorLogged              atomic.Int64 // unix nanoseconds of the last warning
}

// get returns a buffer of n bytes (n ≤ win) with cap win.
func (p *pool) get(n int, win int64) []byte {
	p.mu.Lock()
	if k := len(p.free); k > 0 {
		b := p.free[k-1]
		p.free[k-1] = nil
		p.free = p.free[:k-1]
		p.mu.Unlock()
		p.reused.Add(1)
		return b[:n]
	}
	p.mu.Unlock()
	return make([]byte, n, win)
}

// put returns b to the pool, or leaves it to the garbage collector when
// the pool is full.
func (p *pool) put(b []byte) {
	b = b[:cap(b)]
	if p.poison {
		for i := range b {
			b[i] = 0xa5
		}
	}
	p.recycled.Add(1)
	p.mu.Lock()
	if len(p.free) < p.max {
		p.free = append(p.free, b)
	}
	p.mu.Unlock()
}

// acquire takes a reference on e, which the caller found in a tier. False:
// e's count already fell to zero (it left every tier and its buffer may
// be reused): the caller must not touch its bytes.
func (e *entry) acquire() bool {
	if !e.pooled {
		return true
	}
	for {
		r := e.refs.Load()
		if r <= 0 {
			return false
		}
		if e.refs.CompareAndSwap(r, r+1) {
			return true
		}
	}
}

// hold takes one more reference on e for a new holder; the caller holds
// one already, so the count cannot be zero.
func (e *entry) hold() {
	if e.pooled {
		e.refs.Add(1)
	}
}

// release drops one reference on e, and reuses its buffer at zero.
func (c *Cache) release(e *entry) {
	if !e.pooled {
		return
	}
	switch r := e.refs.Add(-1); {
	case r == 0:
		c.pool.put(e.data)
	case r < 0:
		n := c.pool.refErrors.Add(1)
		// A bug, never expected: say so in the log, at most once a
		// minute, as well as in the counter.
		now := time.Now().UnixNano()
		if last := c.pool.refErrorLogged.Load(); now-last >= int64(time.Minute) && c.pool.refErrorLogged.CompareAndSwap(last, now) {
			c.log.Warn().Int64("ref_errors", n).Msg("a read cache window was released more often than it was held (a bug in bs3); its memory is not reused")
		}
	}
}

// ReservePool lets the pool of free windows hold n windows more than the
// cache itself needs (at least; calls do not add up): the chunker builds
// chunks in windows, and the windows evicted for a committed chunk are
// reused by the next ones rather than freed and allocated again. Idle,
// they are memory beside the cache's bound, as the chunk buffers they
// replace were.
func (c *Cache) ReservePool(n int) {
	c.pool.mu.Lock()
	c.pool.max = max(c.pool.max, c.pool.base+n)
	c.pool.mu.Unlock()
}

// Buffer returns a buffer of n bytes (at most a window) for the bytes of
// one window, to be handed to Keep. Its memory may be a window the cache
// no longer holds.
func (c *Cache) Buffer(n int) []byte {
	return c.pool.get(min(n, int(c.window)), c.window)
}

// Recycle takes back a buffer from Buffer that will not be handed to
// Keep (the read that filled it failed, or it holds less than a window),
// for reuse. The caller must not touch buf afterwards.
func (c *Cache) Recycle(buf []byte) {
	if int64(cap(buf)) == c.window {
		c.pool.put(buf)
	}
}

// Keep stores buf, from Buffer, as the content of window k: buf starts
// at the window's first byte and holds the whole window, or everything up
// to the object's end for its last window. The cache owns buf from then
// on (the caller must not touch it) and reuses its memory once no tier
// and no reader holds it. A buffer whose cap is not a window is not kept.
//
// ahead marks a window readahead fetched: the first read that uses it
// counts a readahead hit. stream marks a window a sequential stream takes
// once (fetched by its readahead or by its own read): while the main tier
// is less than three quarters full it goes there (it evicts nothing, and
// a stream read again that fits the cache is served from memory);
// otherwise it goes to the stream tier, where it does not compete with
// the main tier's windows, and moves there if it is used a second time
// (stream.go). The disk tier keeps it like any window.
func (c *Cache) Keep(k Key, buf []byte, stream, ahead bool) {
	if !c.valid(k, buf) || int64(cap(buf)) != c.window {
		return // not a window's buffer: left to the garbage collector
	}
	e := &entry{data: buf, pooled: true}
	e.refs.Store(1) // the caller's, until stored
	e.ahead.Store(ahead)
	c.insert(k, e, stream)
	c.release(e)
}

// View is the bytes of a cached window, held for reading until Release:
// the cache does not reuse them before. Data must not be modified.
type View struct {
	Data []byte
	e    *entry
	c    *Cache
}

// Release ends the hold on v's bytes; v must not be used afterwards.
func (v View) Release() {
	if v.e != nil {
		v.c.release(v.e)
	}
}

// Acquire returns window k, held until Release (its bytes must not be
// modified), and counts a hit or a miss. A window of the stream tier used
// a second time moves to the main tier. The reader copies the bytes out
// and then calls Release: the window's memory can be reused afterwards.
func (c *Cache) Acquire(k Key) (View, bool) { return c.acquire(k, false) }

// AcquireStream is Acquire for a sequential stream's read: a window it
// loads from the disk tier goes to the stream tier (cache.go, fromDisk),
// so that a stream read back from disk neither pushes the hot set out of
// the main tier nor fills it with new memory.
func (c *Cache) AcquireStream(k Key) (View, bool) { return c.acquire(k, true) }

func (c *Cache) acquire(k Key, once bool) (View, bool) {
	e, ok := c.get(k, once)
	if !ok {
		return View{}, false
	}
	return View{Data: e.data, e: e, c: c}, true
}
