// Package cache owns bs3's read cache: copies of byte ranges of data
// objects, held in memory and optionally in a local directory (which
// survives a restart), so that a read of recently written or recently read
// blocks does not go to the object store again. Both tiers are bounded.
// Memory is the main tier (otter) and a small stream tier for the windows
// a sequential stream takes once (stream.go), bounded together.
//
// An entry is one aligned *window* of an object's data area (Window bytes,
// 64 KiB by default; the last window of an object may be shorter), keyed
// by the volume id, the object key and the window index. The key is that
// complete because a data object is immutable once stored and its key is
// never reused within one volume, while a wiped bucket or prefix may hold
// a new volume that reuses keys with other content (docs/ARCHITECTURE.md
// §3, §4).
//
// The package never decides what is current and never fetches: it does not
// know the extent map, the store or the object proxy. The caller
// (internal/volume) looks up only keys the map points to, and inserts only
// bytes it has just read from the store or that an upload has just stored:
// fetches and commits copy a window into a buffer from Buffer and hand it
// over with Keep. Acquire hands out a window, never to be modified, for
// the time until Release, after which its memory may be reused for
// another window (pool.go, docs/ARCHITECTURE.md §1 "Window memory"). A
// disk file is served only after its header names the very key looked up
// and the CRC32C of every 4 KiB block matches (or, for an encrypted
// volume, its AES-GCM tag verifies); it never serves a damaged or foreign
// file, and never grows past its limit.
package cache

import (
	"fmt"
	"math/bits"
	"sync/atomic"

	"github.com/maypok86/otter/v2"
	"github.com/rs/zerolog"
)

// Window sizes allowed by New: a power of two from one 4 KiB block (the
// largest block size) up to 4 MiB (the default chunk size).
const (
	MinWindow = 4 << 10
	MaxWindow = 4 << 20
)

// DefaultWindow is the entry size main uses: a GET of 64 KiB costs about
// what a GET of 4 KiB costs on S3 (the request dominates), so an isolated
// random read pays no more than a ranged GET of its own bytes, while a
// stream fetches FetchSize (several windows) per GET.
const DefaultWindow = 64 << 10

// WindowFor is the window used with a fetch size of fetch bytes.
func WindowFor(fetch int64) int64 { return min(fetch, DefaultWindow) }

// entryOverhead approximates the memory of one entry beyond its bytes
// (key, slice header, the cache's node), so that the bound holds for many
// small entries too.
const entryOverhead = 128

// Options configure a Cache.
type Options struct {
	// MemoryBytes bounds the memory tier (bytes of data plus a per-entry
	// overhead). It must be positive: a disabled cache is a nil *Cache.
	MemoryBytes int64
	// Window is the size and alignment of an entry inside an object's data
	// area, a power of two in [MinWindow, MaxWindow].
	Window int64
	// FetchSize is what a read that streams, or reads much, fetches
	// around a miss: a power-of-two multiple of Window up to MaxWindow (0
	// means Window). The cache only carries it for the read path.
	FetchSize int64
	// Dir, when not empty, holds the disk tier, bounded by DiskBytes: it
	// survives a restart, and every window it serves is verified first
	// (see disk.go).
	Dir       string
	DiskBytes int64
	// Sealer, when set, encrypts and authenticates every disk-tier file
	// (an encrypted volume: the disk tier must never hold its
	// plaintext); the memory tier stays plaintext.
	Sealer Sealer
	Logger zerolog.Logger
	// PoisonRecycled (tests) overwrites every window buffer returned to
	// the pool, so that anyone still reading one after it was given up
	// reads garbage and fails a check instead of passing by luck.
	PoisonRecycled bool
}

// Sealer seals the disk tier's files of an encrypted volume
// (sealed.CacheSealer; docs/ARCHITECTURE.md §16.5). The cache only moves
// sealed bytes and never holds a key.
type Sealer interface {
	// Seal appends to dst the sealed form of plain, bound to ad.
	Seal(dst, plain, ad []byte) ([]byte, error)
	// Open verifies sealed against ad and appends its plaintext to dst,
	// which must not overlap sealed; an error means the file must not be
	// served.
	Open(dst, sealed, ad []byte) ([]byte, error)
	// Overhead is the bytes Seal adds to a plaintext.
	Overhead() int
}

// Key names one window of one object of one volume.
type Key struct {
	Volume string // superblock volume_id
	Object int64  // data key
	Window int64  // index of the window: data-area offset / window size
}

// Cache is the memory tier. All methods are safe for concurrent use.
type Cache struct {
	window  int64
	fetch   int64
	max     uint64
	mainMax int64 // bound of the main tier: max less the stream tier's
	// mainUsed is the weight of the entries in the main tier, pending
	// evictions included: otter's WeightedSize lags behind its writes,
	// and keepStream must not fill the main tier past its bound with it.
	mainUsed atomic.Int64
	mem      *otter.Cache[Key, *entry]
	stream   *streamTier // windows a stream takes once (stream.go)
	disk     *diskTier   // nil: memory only
	pool     pool        // window buffers to reuse (pool.go)
	log      zerolog.Logger
	c        counters
}

// New builds a cache bounded by o.MemoryBytes.
func New(o Options) (*Cache, error) {
	if o.MemoryBytes <= 0 {
		return nil, fmt.Errorf("cache memory size %d: must be positive", o.MemoryBytes)
	}
	if o.Window < MinWindow || o.Window > MaxWindow || bits.OnesCount64(uint64(o.Window)) != 1 {
		return nil, fmt.Errorf("cache window %d: must be a power of two from %d to %d bytes", o.Window, MinWindow, MaxWindow)
	}
	if o.FetchSize == 0 {
		o.FetchSize = o.Window
	}
	if o.FetchSize < o.Window || o.FetchSize > MaxWindow || bits.OnesCount64(uint64(o.FetchSize)) != 1 {
		return nil, fmt.Errorf("cache fetch size %d: must be a power of two from the window (%d) to %d bytes", o.FetchSize, o.Window, MaxWindow)
	}
	// An eighth of the memory holds the windows streams take once
	// (stream.go), the rest is the main tier.
	streamMax := o.MemoryBytes / StreamShare
	c := &Cache{window: o.Window, fetch: o.FetchSize, max: uint64(o.MemoryBytes), mainMax: o.MemoryBytes - streamMax, stream: newStreamTier(streamMax), log: o.Logger}
	mem, err := otter.New(&otter.Options[Key, *entry]{
		MaximumWeight: uint64(o.MemoryBytes - streamMax),
		Weigher: func(k Key, e *entry) uint32 {
			return uint32(weight(k, e))
		},
		// Inside the operation that removes the entry (eviction,
		// replacement, invalidation), so that mainUsed never lags.
		// It also drops the tier's reference (pool.go), after the
		// disk tier took its own.
		OnAtomicDeletion: func(e otter.DeletionEvent[Key, *entry]) {
			c.mainUsed.Add(-weight(e.Key, e.Value))
			if e.Cause.IsEviction() {
				c.evicted(e.Key, e.Value)
			}
			c.release(e.Value)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("create the memory cache: %w", err)
	}
	c.mem = mem
	c.stream.evicted = c.evicted
	c.stream.release = c.release
	// Buffers wait in the pool only between an eviction and the next
	// insertion, or while readers finish with evicted windows: an eighth
	// of the memory bound, beyond it (README, Read cache). Evictions come
	// in bursts; with a thirty-second, sustained 1 MiB writes overflowed
	// it and faulted in 10,000-14,000 new pages per GiB committed, with an
	// eighth 1,600-3,700 (docs/ARCHITECTURE.md §1, "Window memory").
	c.pool.max = max(int(o.MemoryBytes/8/o.Window), 64)
	c.pool.base = c.pool.max
	c.pool.poison = o.PoisonRecycled || poisonRecycled
	if o.Dir != "" {
		if o.DiskBytes <= 0 {
			return nil, fmt.Errorf("cache disk size %d: must be positive with a cache directory", o.DiskBytes)
		}
		// The write queue holds an eighth of the memory bound: a fast
		// cold read fetches windows faster than the disk takes them
		// (measured here: 256 windows kept 2,400–8,500 of a 1 GiB read's
		// ~20,000, 1,024 kept 5,000–15,000), and a queued window that
		// memory evicted meanwhile is held only by the queue, so this is
		// what the disk tier may hold beyond MemoryBytes.
		queue := int(o.MemoryBytes / 8 / o.Window)
		if c.disk, err = openDisk(o.Dir, o.DiskBytes, o.Window, queue, o.Sealer, o.Logger); err != nil {
			return nil, err
		}
		c.disk.release = c.release
		c.disk.buffer = c.Buffer
		c.disk.recycle = c.pool.put
	}
	return c, nil
}

// entry is a cached window. ahead marks a window readahead fetched that
// no read has used yet, so that the first read to use it counts a
// readahead hit.
type entry struct {
	data  []byte
	ahead atomic.Bool
	// diskSkipped: its disk write was skipped (a full queue), so memory
	// offers it to the disk again when it evicts it.
	diskSkipped atomic.Bool
	// pooled: data came from Buffer and is reused once refs, the
	// holders' references, falls to zero (pool.go).
	pooled bool
	refs   atomic.Int32
}

// Window is the size and alignment of an entry in bytes.
func (c *Cache) Window() int64 { return c.window }

// FetchSize is the span a streaming or large read fetches around a miss,
// a multiple of Window.
func (c *Cache) FetchSize() int64 { return c.fetch }

// get finds window k and takes a reference on it for the caller.
func (c *Cache) get(k Key, once bool) (*entry, bool) {
	e, ok := c.mem.GetIfPresent(k)
	if ok && !e.acquire() {
		ok = false // evicted meanwhile: its memory may be reused already
	}
	if !ok {
		var again bool
		if e, again, ok = c.stream.get(k); again {
			c.setMain(k, e)
		}
	}
	if !ok && c.disk != nil {
		e, ok = c.fromDisk(k, once, false)
	}
	if !ok {
		c.c.misses.Add(1)
		return nil, false
	}
	c.c.hits.Add(1)
	c.c.hitBytes.Add(int64(len(e.data)))
	if e.ahead.Load() && e.ahead.CompareAndSwap(true, false) {
		c.c.raHits.Add(1)
		c.c.raHitBytes.Add(int64(len(e.data)))
	}
	return e, true
}

// insert stores the new entry e as window k: in the disk tier and in
// the main tier, or where keepStream keeps a stream's window.
func (c *Cache) insert(k Key, e *entry, stream bool) {
	c.stored(k, e) // first: it marks e if the disk write is skipped
	if stream {
		c.keepStream(k, e)
		return
	}
	c.setMain(k, e)
	c.stream.drop(k)
}

// keepStream stores e, a window a stream takes once, in the main tier
// while it is less than three quarters full, else in the stream tier.
func (c *Cache) keepStream(k Key, e *entry) {
	if c.mainUsed.Load()+weight(k, e) <= c.mainMax/4*3 {
		c.setMain(k, e)
	} else {
		c.stream.put(k, e)
	}
}

// valid reports whether data can be the content of window k: not empty,
// at most a window (else a caller bug that must not poison the cache).
func (c *Cache) valid(k Key, data []byte) bool {
	return len(data) > 0 && int64(len(data)) <= c.window && k.Window >= 0 && k.Object >= 0
}

// setMain stores e as window k in the main tier, which takes a
// reference on it (the caller holds one).
func (c *Cache) setMain(k Key, e *entry) {
	e.hold()
	c.mainUsed.Add(weight(k, e))
	c.mem.Set(k, e)
}

// evicted gives a window leaving memory for room whose disk write was
// skipped (a full queue while a fast read fetched) a second chance at the
// disk tier. It never blocks (it runs inside the cache's eviction).
func (c *Cache) evicted(k Key, e *entry) {
	if c.disk != nil && e.diskSkipped.Load() {
		c.disk.put(k, e)
	}
}

// stored writes window k to the disk tier and counts it.
func (c *Cache) stored(k Key, e *entry) {
	if c.disk != nil && !c.disk.put(k, e) {
		e.diskSkipped.Store(true)
	}
	c.c.inserted.Add(1)
	c.c.insertedBytes.Add(int64(len(e.data)))
}

// PutObject caches the data area of object key of volume vol, just
// stored: it is copied window by window, so the caller may reuse data.
func (c *Cache) PutObject(vol string, key int64, data []byte) {
	for w := int64(0); w*c.window < int64(len(data)); w++ {
		end := min((w+1)*c.window, int64(len(data)))
		c.PutWindow(Key{Volume: vol, Object: key, Window: w}, data[w*c.window:end])
	}
}

// PutWindow caches a copy of data as window k, just stored: the caller
// may reuse data.
func (c *Cache) PutWindow(k Key, data []byte) {
	buf := c.Buffer(len(data))
	copy(buf, data)
	c.Keep(k, buf, false, false)
}

// MemoryUsed is the weight held now, after pending evictions are done.
func (c *Cache) MemoryUsed() int64 {
	c.mem.CleanUp()
	return int64(c.mem.WeightedSize()) + c.stream.weight()
}

// MemoryLimit is the bound of the memory tier.
func (c *Cache) MemoryLimit() int64 { return int64(c.max) }

// StreamShare is the share of the memory bound the stream tier takes:
// MemoryBytes/StreamShare.
const StreamShare = 8

// StreamLimit is the bound of the stream tier, part of MemoryLimit: a
// readahead that runs further ahead than it holds loses its windows
// before the stream takes them.
func (c *Cache) StreamLimit() int64 { return c.stream.max }

// Purge drops every entry of the memory tier (the disk tier stays).
func (c *Cache) Purge() {
	c.mem.InvalidateAll()
	c.stream.purge()
}

// Close finishes the queued disk writes, stops the cache's background
// work and drops the memory tier. Later calls find nothing and keep
// nothing.
func (c *Cache) Close() {
	if c.disk != nil {
		c.disk.close()
	}
	c.mem.InvalidateAll()
	c.stream.purge()
	c.mem.StopAllGoroutines()
}

// Sync waits until the disk writes queued so far are done (tests, and a
// caller that wants the disk tier current).
func (c *Cache) Sync() {
	if c.disk != nil {
		c.disk.sync()
	}
}

// DiskUsed is the bytes the disk tier counts against its limit (file
// sizes plus a per-file allowance); 0 without a disk tier.
func (c *Cache) DiskUsed() int64 {
	if c.disk == nil {
		return 0
	}
	return c.disk.usedBytes()
}

// CountFetch records a GET issued by the read path and the bytes it
// returned; readahead marks the GETs of prefetches.
func (c *Cache) CountFetch(n int, readahead bool) {
	c.c.fetches.Add(1)
	c.c.fetchedBytes.Add(int64(n))
	if readahead {
		c.c.raFetches.Add(1)
		c.c.raBytes.Add(int64(n))
	}
}

// CountReadahead records a prefetch started over bytes of the device.
func (c *Cache) CountReadahead(bytes int64) {
	c.c.raStarts.Add(1)
	c.c.raPlanned.Add(bytes)
}

// Contains reports whether window k is cached, in memory or on disk,
// without counting a hit or a miss and without loading it: planning a
// fetch asks this of many windows ahead, and loading them all would push
// out what is read now. A window on disk that then fails its checks is a
// miss for the read that gets it, which fetches it.
func (c *Cache) Contains(k Key) bool { return c.Where(k) != Missing }

// Place is where a window is cached.
type Place int

// The places Where reports.
const (
	Missing  Place = iota // not cached
	InMemory              // the main or the stream tier
	OnDisk                // the disk tier only
)

// Where reports where window k is cached, without loading it or counting
// a hit or a miss.
func (c *Cache) Where(k Key) Place {
	if _, ok := c.mem.GetIfPresent(k); ok || c.stream.contains(k) {
		return InMemory
	}
	if c.disk != nil && c.disk.contains(k) {
		return OnDisk
	}
	return Missing
}

// LoadAhead loads window k from the disk tier into memory for a stream's
// readahead, kept as Keep keeps a stream's window readahead fetched (the
// first read that uses it counts a readahead hit). False: it is not on
// disk, or its record failed its checks (and was dropped).
func (c *Cache) LoadAhead(k Key) bool {
	switch c.Where(k) {
	case InMemory:
		return true
	case OnDisk:
		e, ok := c.fromDisk(k, true, true)
		if ok {
			c.release(e) // the tier holds it; no reader does
		}
		return ok
	}
	return false
}

// fromDisk loads window k from the disk tier into memory: kept in the
// stream tier (once: a stream's read or its readahead) or in the main
// tier, marked as readahead if ahead. False: it is not on disk, or its record failed its checks.
func (c *Cache) fromDisk(k Key, once, ahead bool) (*entry, bool) {
	v, old, ok := c.disk.get(k)
	if !ok {
		return nil, false
	}
	// v is a pooled buffer: the reader's reference is the first.
	e := &entry{data: v, pooled: true}
	e.refs.Store(1)
	e.ahead.Store(ahead)
	if old { // about to be freed with its segment: keep it (best effort)
		e.hold()
		c.disk.enqueue(diskWrite{k: k, data: v, e: e, refresh: true})
	}
	if once {
		// Not keepStream: a stream read back from disk goes to the
		// stream tier even while the main tier has room. Filling the
		// main tier with it would fault in new memory for every window
		// (a restarted daemon reading 1 GiB from disk took ~125,000
		// page faults) to keep what disk serves again at disk speed;
		// the stream tier reuses its windows' memory.
		c.stream.put(k, e)
	} else {
		c.setMain(k, e)
	}
	return e, true
}

// CountReturned records bytes of mapped data returned to a reader.
func (c *Cache) CountReturned(n int64) { c.c.returnedBytes.Add(n) }

type counters struct {
	hits, misses, hitBytes  atomic.Int64
	inserted, insertedBytes atomic.Int64
	fetches, fetchedBytes   atomic.Int64
	returnedBytes           atomic.Int64
	raFetches, raBytes      atomic.Int64
	raHits, raHitBytes      atomic.Int64
	raStarts, raPlanned     atomic.Int64
}

// Stats is a snapshot of the cache counters, kept for the metrics export.
type Stats struct {
	Hits, Misses    int64 // window lookups
	HitBytes        int64 // bytes of the windows found
	Inserted        int64 // windows stored (commits and fetches)
	InsertedBytes   int64
	Fetches         int64 // GETs issued by the read path, readahead included
	FetchedBytes    int64 // bytes those GETs returned
	RAFetches       int64 // GETs issued by readahead
	RAFetchedBytes  int64
	RAHits          int64 // prefetched windows a read then used
	RAHitBytes      int64
	RAStarts        int64 // prefetches started
	RAPlannedBytes  int64 // device bytes those prefetches covered (cached or not)
	ReturnedBytes   int64 // mapped bytes returned to readers
	MemoryBytes     int64 // weight held now
	MemoryLimit     int64
	DiskHits        int64 // windows served from disk (verified)
	DiskDropped     int64 // records (or segment tails) dropped because a check failed
	DiskWritten     int64 // records appended
	DiskEvicted     int64 // records freed with their segment for room
	DiskWriteErrors int64 // appends that failed (full or broken disk): windows skipped
	DiskBytes       int64
	BuffersReused   int64 // window buffers taken from the pool (pool.go)
	BuffersFreed    int64 // window buffers no holder used any more
	RefErrors       int64 // releases past zero: a bug, never expected
}

// Stats returns the counters.
func (c *Cache) Stats() Stats {
	s := Stats{
		Hits: c.c.hits.Load(), Misses: c.c.misses.Load(), HitBytes: c.c.hitBytes.Load(),
		Inserted: c.c.inserted.Load(), InsertedBytes: c.c.insertedBytes.Load(),
		Fetches: c.c.fetches.Load(), FetchedBytes: c.c.fetchedBytes.Load(),
		ReturnedBytes: c.c.returnedBytes.Load(),
		RAFetches:     c.c.raFetches.Load(), RAFetchedBytes: c.c.raBytes.Load(),
		RAHits: c.c.raHits.Load(), RAHitBytes: c.c.raHitBytes.Load(),
		RAStarts: c.c.raStarts.Load(), RAPlannedBytes: c.c.raPlanned.Load(),
		MemoryBytes: int64(c.mem.WeightedSize()) + c.stream.weight(), MemoryLimit: int64(c.max),
		BuffersReused: c.pool.reused.Load(), BuffersFreed: c.pool.recycled.Load(), RefErrors: c.pool.refErrors.Load(),
	}
	if d := c.disk; d != nil {
		s.DiskHits, s.DiskDropped, s.DiskWritten, s.DiskEvicted = d.hits.Load(), d.dropped.Load(), d.written.Load(), d.evicted.Load()
		s.DiskWriteErrors = d.writeErrors.Load()
		s.DiskBytes = d.usedBytes()
	}
	return s
}

// MarshalZerologObject logs the counters: log.Debug().Object("cache", s).
func (s Stats) MarshalZerologObject(e *zerolog.Event) {
	e.Int64("hits", s.Hits).Int64("misses", s.Misses).Int64("hit_bytes", s.HitBytes).
		Int64("inserted", s.Inserted).Int64("inserted_bytes", s.InsertedBytes).
		Int64("fetches", s.Fetches).Int64("fetched_bytes", s.FetchedBytes).
		Int64("readahead_fetches", s.RAFetches).Int64("readahead_bytes", s.RAFetchedBytes).
		Int64("readahead_hits", s.RAHits).Int64("readahead_hit_bytes", s.RAHitBytes).
		Int64("readahead_starts", s.RAStarts).Int64("readahead_planned_bytes", s.RAPlannedBytes).
		Int64("returned_bytes", s.ReturnedBytes).
		Int64("memory_bytes", s.MemoryBytes).Int64("memory_limit", s.MemoryLimit).
		Int64("disk_hits", s.DiskHits).Int64("disk_dropped", s.DiskDropped).Int64("disk_written", s.DiskWritten).
		Int64("disk_evicted", s.DiskEvicted).Int64("disk_write_errors", s.DiskWriteErrors).Int64("disk_bytes", s.DiskBytes).
		Int64("buffers_reused", s.BuffersReused).Int64("buffers_freed", s.BuffersFreed).Int64("ref_errors", s.RefErrors)
}
