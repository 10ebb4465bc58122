package volume

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sort"
	"sync"
	"time"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// maxReadPiece caps one ranged GET, so a large read of one object is
// fetched by several downloaders at once.
const maxReadPiece = 1 << 20

// coalesceGap is the largest hole between two ranges of one object that a
// read fetches through, in one GET, instead of issuing two: on S3 a GET's
// latency costs far more than 256 KiB of transfer. It is the gap threshold
// GC measured for its own reads (docs/ARCHITECTURE.md §7.2).
const coalesceGap = 256 << 10

// readPiece is a run of mapped blocks: off is the offset in the object's
// data area, buf the part of the caller's buffer it fills.
type readPiece struct {
	key    int64
	block  int64 // device block of its first byte
	off    int64
	length int64
	buf    []byte
}

// fetchRun is one GET: [start, end) of one object's data area. direct,
// when set, is the caller's buffer the bytes go to without a copy (cache
// off and the run is exactly one piece).
type fetchRun struct {
	key        int64
	start, end int64
	direct     []byte
	// once puts the windows in the cache's stream tier: a stream reads
	// through them once (docs/ARCHITECTURE.md §1, read path).
	once bool
	// disk: a readahead run that loads its windows from the cache's disk
	// tier instead of a GET.
	disk bool
}

// Read fills buf with n blocks starting at block: unmapped and discarded
// blocks read as zeros; mapped ones come from the read cache or from
// ranged GETs, concurrently across objects (docs/ARCHITECTURE.md §1, read
// path). The ranges of one object are coalesced: with the cache, missing
// windows are fetched and kept (a whole fetch span around a miss when the
// read streams or is large, only the windows it touches when it is an
// isolated small read), and a window another read or readahead is already
// fetching is waited for, not fetched twice; without the cache, the pieces
// themselves, read through gaps below coalesceGap.
func (v *Volume) Read(ctx context.Context, block, n int64, buf []byte) error {
	bs := v.o.BlockSize
	if block < 0 || n < 0 || (block+n)*bs > v.sb.Size || int64(len(buf)) < n*bs {
		return fmt.Errorf("read of %d blocks at block %d: outside the %d-byte device or buffer too small", n, block, v.sb.Size)
	}
	// Streams are recognized in the order reads arrive, not the order they
	// complete: a client with many reads in flight issues them in order,
	// but they finish in any order. A frontend that saw this read arrive
	// observed it then (ObserveRead); the order goroutines reach this
	// point in is not the client's.
	st, observed := observedStream(ctx, block, n)
	if !observed {
		st = v.observeRead(block, n)
	}
	stream := st != nil
	var pieces []readPiece
	var pinned []int64
	var dataSize map[int64]int64 // bytes in the data area of the objects a stream reads
	defer func() { v.unpin(pinned) }()
	err := v.maps.Do(ctx, mapproxy.High, func(m *extentmap.Map) {
		// Pinned on the map owner goroutine: dead GC decides there too,
		// so an object found here cannot be collected before unpin.
		m.Lookup(block, n, func(e extentmap.Extent) {
			start := (e.Block - block) * bs
			length := e.N * bs
			if e.Key < 0 || e.Zero {
				clear(buf[start : start+length])
				return
			}
			if k := len(pinned); k == 0 || pinned[k-1] != e.Key {
				pinned = append(pinned, e.Key)
				v.pin(e.Key)
				if _, total, ok := m.Live(e.Key); ok && stream && v.cache != nil {
					if dataSize == nil {
						dataSize = make(map[int64]int64)
					}
					dataSize[e.Key] = total * bs
				}
			}
			pieces = append(pieces, readPiece{key: e.Key, block: e.Block, off: e.Off * bs, length: length, buf: buf[start : start+length]})
		})
	})
	if err != nil {
		return fmt.Errorf("look up blocks %d+%d: %w", block, n, err)
	}
	if len(pieces) == 0 {
		return nil
	}
	keys, groups := groupByKey(pieces)
	byKey := make(map[int64][]readPiece, len(keys))
	for i, k := range keys {
		byKey[k] = groups[i]
	}
	var total int64
	for _, p := range pieces {
		total += p.length
	}
	if v.cache != nil {
		v.cache.CountReturned(total)
	}
	wide := v.cache != nil && (n*bs >= 2*v.cache.Window() || stream)
	// Every byte not served by the cache is inside one run or one window
	// another fetch is getting; the pins stay until every GET has returned
	// (the deferred unpin runs after the fetches).
	plans := make([]objectPlan, 0, len(keys))
	for i, k := range keys {
		var whole int64 // fetch the object's first whole bytes: it is scattered over a stream
		sparse := stream && scattered(groups[i], block*bs, n*bs, bs, v.o.ChunkSize)
		if sparse && v.firstWhole(st, k) {
			whole = dataSize[k]
		}
		plans = append(plans, v.planObject(k, groups[i], wide, whole, stream && !sparse, dataSize[k]))
	}
	var runs []fetchRun
	for i := range plans {
		runs = append(runs, plans[i].runs...)
	}
	err = v.fetchAll(ctx, runs, byKey)
	for i := range plans {
		v.release(&plans[i])
	}
	if err != nil {
		return err
	}
	// The windows other fetches were getting: wait, take them from the
	// cache, and fetch what is still missing (that fetch failed, or the
	// window was evicted already).
	runs = runs[:0]
	for i := range plans {
		r, err := v.awaitFlights(ctx, &plans[i])
		if err != nil {
			return err
		}
		runs = append(runs, r...)
	}
	return v.fetchAll(ctx, runs, byKey)
}

// fetchAll issues runs at high priority, concurrently.
func (v *Volume) fetchAll(ctx context.Context, runs []fetchRun, byKey map[int64][]readPiece) error {
	switch len(runs) {
	case 0:
		return nil
	case 1:
		return v.fetch(ctx, objproxy.High, runs[0], byKey[runs[0].key])
	}
	var wg sync.WaitGroup
	errs := make([]error, len(runs))
	for i, r := range runs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = v.fetch(ctx, objproxy.High, r, byKey[r.key])
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// flight is a fetch of some windows in progress: reads that need one of
// them wait for done instead of fetching it again. ahead marks readahead's
// fetches, which run at low priority and are waited for at most raWait.
type flight struct {
	done  chan struct{}
	ahead bool
}

// objectPlan is what one read does about one object: the GETs it issues
// itself (their windows claimed in the in-flight table until release) and
// the windows it waits for.
type objectPlan struct {
	key    int64
	pieces []readPiece
	runs   []fetchRun
	waits  map[int64]*flight // by window index
	mine   []cache.Key
	own    *flight
	once   bool // its windows go to the stream tier
}

// planObject serves what it can of the pieces of object key from the
// cache and plans the rest: windows nobody fetches are claimed and become
// this read's GETs; windows in flight are waited for. A wide read also
// fetches the missing windows of the fetch spans around its misses; a
// stream that takes scattered blocks of the object fetches the missing
// windows of its first whole bytes (its data area) at once.
//
// once marks an object a stream reads through: the windows fetched for it
// go to the cache's stream tier, not its main tier. size, when known (not
// 0), is the object's data size: a span is not fetched past it.
func (v *Volume) planObject(key int64, pieces []readPiece, wide bool, whole int64, once bool, size int64) objectPlan {
	plan := objectPlan{key: key, pieces: pieces, once: once}
	if v.cache == nil {
		var spans []span
		for _, p := range pieces {
			for off := int64(0); off < p.length; off += maxReadPiece {
				l := min(p.length-off, maxReadPiece)
				spans = append(spans, span{p.off + off, p.off + off + l, p.buf[off : off+l]})
			}
		}
		plan.runs = v.coalesce(key, spans, false)
		return plan
	}
	w := v.cache.Window()
	missing := v.serveCached(key, pieces, nil, once)
	if len(missing) == 0 && whole == 0 {
		return plan // all cached: the common case of a hot set
	}
	want := make(map[int64]bool, len(missing))
	for win := range missing {
		want[win] = true
	}
	if whole > 0 {
		// A stream takes a few scattered blocks of this object: random
		// writes that landed together in it are scattered over the
		// stream's way ahead too, so take the rest of it now (even when
		// this read found its own blocks cached), in GETs of up to
		// raMaxPiece, rather than span by span.
		for x := int64(0); x*w < whole; x++ {
			if !want[x] && !v.cache.Contains(v.cacheKey(key, x)) {
				want[x] = true
			}
		}
	} else if per := v.fetchSpan(once) / w; wide && per > 1 {
		for win := range missing {
			lo, hi := spanWindows(win, per, size, w)
			for x := lo; x < hi; x++ {
				if !want[x] && !v.cache.Contains(v.cacheKey(key, x)) {
					want[x] = true
				}
			}
		}
	}
	if len(want) == 0 {
		return plan
	}
	plan.own = &flight{done: make(chan struct{})}
	var spans []span
	v.ra.mu.Lock()
	if v.ra.pending == nil {
		v.ra.pending = make(map[cache.Key]*flight)
	}
	for win := range want {
		k := v.cacheKey(key, win)
		if f := v.ra.pending[k]; f != nil {
			if missing[win] {
				if plan.waits == nil {
					plan.waits = make(map[int64]*flight)
				}
				plan.waits[win] = f
			}
			continue
		}
		v.ra.pending[k] = plan.own
		plan.mine = append(plan.mine, k)
		spans = append(spans, span{start: win * w, end: (win + 1) * w})
	}
	v.ra.mu.Unlock()
	limit := int64(maxReadPiece)
	switch {
	case whole > 0:
		limit = raMaxPiece
	case once:
		limit = v.fetchSpan(true)
	}
	plan.runs = v.coalesceUpTo(key, spans, once, limit)
	return plan
}

// spanWindows is the windows [lo, hi) of the aligned span of per windows
// of w bytes that holds window win, cut at the object's data size when it
// is known (size > 0).
func spanWindows(win, per, size, w int64) (lo, hi int64) {
	lo, hi = win/per*per, (win/per+1)*per
	if size > 0 {
		hi = min(hi, (size+w-1)/w)
	}
	return lo, hi
}

// fetchSpan is the aligned span a wide read fetches around a miss:
// cache.fetch_size, or for an object a stream reads through (once) the
// larger GET of its readahead: on S3 (and MinIO) a GET costs about the
// same whatever its size up to a few MiB, so a stream whose readahead has
// not caught up yet fetches the chunk it reads on through in one GET,
// not in spans (measured on MinIO at 8 concurrent GETs: ~1 GB/s in 1 MiB
// GETs, ~3.5 GB/s in 4 MiB ones).
func (v *Volume) fetchSpan(once bool) int64 {
	if once {
		return max(v.cache.FetchSize(), v.raPiece())
	}
	return v.cache.FetchSize()
}

// groupByKey groups pieces by object, objects in the order they first
// appear and each object's pieces in their order (device order): keys[i]
// owns groups[i]. It makes one array for all groups: a map of growing
// slices per object cost a fifth of the CPU of a cold fragmented read's
// readahead planning, thousands of pieces per plan.
func groupByKey(pieces []readPiece) (keys []int64, groups [][]readPiece) {
	rank := make(map[int64]int32)
	ranks := make([]int32, len(pieces))
	var counts []int
	r := int32(-1)
	for i, p := range pieces {
		if i == 0 || p.key != pieces[i-1].key {
			var ok bool
			if r, ok = rank[p.key]; !ok {
				r = int32(len(keys))
				rank[p.key] = r
				keys = append(keys, p.key)
				counts = append(counts, 0)
			}
		}
		ranks[i] = r
		counts[r]++
	}
	if len(keys) == 1 {
		return keys, [][]readPiece{pieces}
	}
	// Counting sort: each group starts where the ones before it end.
	start := make([]int, len(keys)+1)
	for j, c := range counts {
		start[j+1] = start[j] + c
	}
	out := make([]readPiece, len(pieces))
	next := append([]int(nil), start[:len(keys)]...)
	for i, p := range pieces {
		out[next[ranks[i]]] = p
		next[ranks[i]]++
	}
	groups = make([][]readPiece, len(keys))
	for j := range keys {
		groups[j] = out[start[j]:start[j+1]]
	}
	return keys, groups
}

// scattered reports whether the pieces a read of readBytes at device
// byte readStart takes from one object are a small part of the read
// spread out: at most an eighth of it (of at most chunk bytes of it: a
// prefetch range of 32 MiB holds a whole 4 MiB object in an eighth), and
// not a dense run (at least half of the device range its pieces span)
// that is either longer than edgeSlack or at one end of the read. A
// dense run is part of an object the stream reads through: one the read
// only starts or ends in (a range rarely starts at an object's edge), or
// one written as several runs from different places (a client writing
// with many requests in flight fills a chunk out of device order). Taken for scattered, such objects
// were fetched whole into the main tier (measured: ~600 MiB of the
// 1.7 GiB fetched for a cold 1 GiB read through FUSE).
func scattered(pieces []readPiece, readStart, readBytes, bs, chunk int64) bool {
	var n int64
	for _, p := range pieces {
		n += p.length
	}
	if n*8 > min(readBytes, chunk) {
		return false
	}
	// Pieces come in device order.
	lo := pieces[0].block * bs
	hi := pieces[len(pieces)-1].block*bs + pieces[len(pieces)-1].length
	dense := n*2 >= hi-lo
	atEdge := lo-readStart <= edgeSlack || readStart+readBytes-hi <= edgeSlack
	return !(dense && (n > edgeSlack || atEdge))
}

// edgeSlack is how close to an end of a read a run must be to count as
// at that end: overwritten blocks may cut a run a few blocks short of it.
const edgeSlack = 64 << 10

// release ends the plan's claims on the in-flight table: its GETs have
// returned, and the windows they read are in the cache (or failed).
func (v *Volume) release(p *objectPlan) {
	if p.own == nil {
		return
	}
	v.ra.mu.Lock()
	for _, k := range p.mine {
		delete(v.ra.pending, k)
	}
	v.ra.mu.Unlock()
	close(p.own.done)
	p.own, p.mine = nil, nil
}

// serveCached copies into the pieces what the cache holds, and returns
// the windows it lacks. only, when not nil, limits it to those windows;
// once marks a stream's read (Cache.AcquireStream).
// Each window is looked up once, however many pieces it holds: a window
// of the stream tier moves to the main tier on its second use, and one
// read is one use (docs/ARCHITECTURE.md §1, read path).
func (v *Volume) serveCached(key int64, pieces []readPiece, only map[int64]*flight, once bool) map[int64]bool {
	acquire := v.cache.Acquire
	if once {
		acquire = v.cache.AcquireStream
	}
	// The windows found are held until their bytes are copied: the
	// cache reuses a window's memory once nothing holds it.
	var held []cache.View
	defer func() {
		for _, h := range held {
			h.Release()
		}
	}()
	get := func(k cache.Key) ([]byte, bool) {
		h, ok := acquire(k)
		if ok {
			held = append(held, h)
		}
		return h.Data, ok
	}
	w := v.cache.Window()
	var missing map[int64]bool
	var lastWin int64 = -1 // pieces come in device order, mostly in window order too
	var last []byte
	var seen map[int64][]byte
	for _, p := range pieces {
		for win := p.off / w; win*w < p.off+p.length; win++ {
			if only != nil && only[win] == nil {
				continue
			}
			if missing[win] {
				continue
			}
			lo, hi := max(p.off, win*w), min(p.off+p.length, (win+1)*w)
			data, ok := last, win == lastWin
			if !ok {
				if data, ok = seen[win]; !ok {
					data, ok = get(v.cacheKey(key, win))
					if ok {
						if lastWin >= 0 {
							if seen == nil {
								seen = make(map[int64][]byte)
							}
							seen[lastWin] = last
						}
						lastWin, last = win, data
					}
				}
			}
			if !ok || int64(len(data)) < hi-win*w {
				// A short entry is an object's last window; a piece
				// past it is refetched, and then reported as corrupt.
				if missing == nil {
					missing = make(map[int64]bool)
				}
				missing[win] = true
				continue
			}
			copy(p.buf[lo-p.off:hi-p.off], data[lo-win*w:hi-win*w])
		}
	}
	return missing
}

// awaitFlights waits for the windows of plan that other fetches were
// getting, serves them from the cache, and returns the GETs for what is
// still missing. Readahead's fetches are low priority and are waited for
// at most raWait, so that they never hold a read back.
func (v *Volume) awaitFlights(ctx context.Context, plan *objectPlan) ([]fetchRun, error) {
	if len(plan.waits) == 0 {
		return nil, nil
	}
	timer := time.NewTimer(raWait)
	defer timer.Stop()
	expired := false
	for _, f := range plan.waits {
		if f.ahead && expired {
			continue
		}
		var timeout <-chan time.Time
		if f.ahead {
			timeout = timer.C
		}
		select {
		case <-f.done:
		case <-timeout:
			expired = true
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for the fetch of key %d: %w", plan.key, ctx.Err())
		}
	}
	missing := v.serveCached(plan.key, plan.pieces, plan.waits, plan.once)
	w := v.cache.Window()
	var spans []span
	for win := range missing {
		spans = append(spans, span{start: win * w, end: (win + 1) * w})
	}
	return v.coalesce(plan.key, spans, plan.once), nil
}

// cacheKey names window win of object key of this volume.
func (v *Volume) cacheKey(key, win int64) cache.Key {
	return cache.Key{Volume: v.sb.VolumeID, Object: key, Window: win}
}

// span is a byte range of an object's data area a read needs.
type span struct {
	start, end int64
	direct     []byte
}

// coalesce turns the spans of object key into GETs: spans closer than
// coalesceGap share one GET, which is at most maxReadPiece (or one
// window) long. once marks the runs' windows for the stream tier.
func (v *Volume) coalesce(key int64, spans []span, once bool) []fetchRun {
	return v.coalesceUpTo(key, spans, once, maxReadPiece)
}

// coalesceUpTo is coalesce with GETs of at most limit bytes (or one
// window).
func (v *Volume) coalesceUpTo(key int64, spans []span, once bool, limit int64) []fetchRun {
	if len(spans) == 0 {
		return nil
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].start < spans[j].start })
	if v.cache != nil {
		limit = max(limit, v.cache.Window()) // a multiple of the window: runs stay aligned
	}
	var runs []fetchRun
	for _, s := range spans {
		if k := len(runs); k > 0 {
			last := &runs[k-1]
			if s.start-last.end <= coalesceGap && max(s.end, last.end)-last.start <= limit {
				last.end = max(last.end, s.end)
				last.direct = nil
				continue
			}
		}
		runs = append(runs, fetchRun{key: key, start: s.start, end: s.end, direct: s.direct, once: once})
	}
	return runs
}

// fetch issues the GET of r, copies the bytes the pieces need and, with
// the cache, keeps every window it read.
func (v *Volume) fetch(ctx context.Context, prio objproxy.Priority, r fetchRun, pieces []readPiece) error {
	// Compact objects have a shorter metadata area (docs/ARCHITECTURE.md §3).
	md, err := v.dataStart(ctx, prio, r.key)
	if err != nil {
		return fmt.Errorf("read key %d: %w", r.key, err)
	}
	if r.direct == nil && v.cache != nil && r.start%v.cache.Window() == 0 && v.objs.Vectored() {
		return v.fetchIntoWindows(ctx, prio, r, pieces, md)
	}
	dst := r.direct
	if dst == nil {
		buf := getFetchBuf(r.end - r.start)
		defer putFetchBuf(buf)
		dst = *buf
	}
	got, err := v.objs.GetRange(ctx, prio, store.DataName(r.key), md+r.start, dst)
	if errors.Is(err, store.ErrCorrupt) {
		// A sealed object failed its check (docs/ARCHITECTURE.md §16):
		// the read fails with EIO; the log names what to inspect.
		v.log.Error().Err(err).Int64("key", r.key).Int64("offset", md+r.start).Msg("damaged object: read refused")
	}
	if err != nil {
		return fmt.Errorf("read key %d at %d: %w", r.key, md+r.start, err)
	}
	if v.cache != nil {
		v.cache.CountFetch(got, prio == objproxy.Low)
	}
	avail := r.start + int64(got) // the object ends here if got is short
	if r.direct != nil {
		if avail != r.end {
			return fmt.Errorf("read key %d at %d: object ends after %d of %d bytes (corrupt or truncated object)", r.key, md+r.start, got, len(dst))
		}
		return nil
	}
	for _, p := range pieces {
		lo, hi := max(p.off, r.start), min(p.off+p.length, r.end)
		if lo >= hi {
			continue
		}
		if hi > avail {
			return fmt.Errorf("read key %d at %d: object ends after %d of the %d bytes the map points to (corrupt or truncated object)", r.key, md+lo, max(avail-lo, 0), hi-lo)
		}
		copy(p.buf[lo-p.off:hi-p.off], dst[lo-r.start:hi-r.start])
	}
	if v.cache != nil {
		w := v.cache.Window()
		for win := r.start / w; win*w < avail; win++ {
			end := min((win+1)*w, avail)
			if end < (win+1)*w && avail == r.end {
				break // a window cut by the run, not by the object's end
			}
			data := v.cache.Buffer(int(end - win*w))
			copy(data, dst[win*w-r.start:end-r.start])
			v.cache.Keep(v.cacheKey(r.key, win), data, r.once, prio == objproxy.Low)
		}
	}
	return nil
}

// fetchIntoWindows is fetch with the cache, on a store that reads into
// several buffers: the GET's body lands in the window buffers the cache
// keeps, and the pieces are copied out of them. Through one fetch buffer
// every fetched byte was copied once more (docs/ARCHITECTURE.md §1).
// r.start is a window boundary.
func (v *Volume) fetchIntoWindows(ctx context.Context, prio objproxy.Priority, r fetchRun, pieces []readPiece, md int64) error {
	w := v.cache.Window()
	bufs := make([][]byte, 0, (r.end-r.start+w-1)/w)
	for lo := r.start; lo < r.end; lo += w {
		bufs = append(bufs, v.cache.Buffer(int(min(lo+w, r.end)-lo)))
	}
	recycle := func(from int) {
		for _, b := range bufs[from:] {
			v.cache.Recycle(b)
		}
	}
	got, err := v.objs.GetRangeV(ctx, prio, store.DataName(r.key), md+r.start, bufs)
	if errors.Is(err, store.ErrCorrupt) {
		v.log.Error().Err(err).Int64("key", r.key).Int64("offset", md+r.start).Msg("damaged object: read refused")
	}
	if err != nil {
		recycle(0)
		return fmt.Errorf("read key %d at %d: %w", r.key, md+r.start, err)
	}
	v.cache.CountFetch(got, prio == objproxy.Low)
	avail := r.start + int64(got) // the object ends here if got is short
	for _, p := range pieces {
		lo, hi := max(p.off, r.start), min(p.off+p.length, r.end)
		if lo >= hi {
			continue
		}
		if hi > avail {
			recycle(0)
			return fmt.Errorf("read key %d at %d: object ends after %d of the %d bytes the map points to (corrupt or truncated object)", r.key, md+lo, max(avail-lo, 0), hi-lo)
		}
		for x := lo; x < hi; {
			i := (x - r.start) / w
			x += int64(copy(p.buf[x-p.off:hi-p.off], bufs[i][x-r.start-i*w:]))
		}
	}
	for i, b := range bufs {
		lo := r.start + int64(i)*w
		end := min(lo+w, avail)
		if end <= lo || (end < lo+w && avail == r.end) {
			// Nothing of the object, or a window cut by the run rather
			// than by the object's end: not a whole window to keep.
			recycle(i)
			break
		}
		v.cache.Keep(v.cacheKey(r.key, lo/w), b[:end-lo], r.once, prio == objproxy.Low)
	}
	return nil
}

// Mapped calls fn for the runs of blocks in [block, block+n) that hold
// data in the map (neither unwritten nor discarded). The chunker uses it
// to drop discards of space that holds nothing.
func (v *Volume) Mapped(ctx context.Context, block, n int64, fn func(block, n int64)) error {
	var runs [][2]int64
	err := v.maps.Do(ctx, mapproxy.High, func(m *extentmap.Map) {
		m.Lookup(block, n, func(e extentmap.Extent) {
			if e.Key >= 0 && !e.Zero {
				runs = append(runs, [2]int64{e.Block, e.N})
			}
		})
	})
	if err != nil {
		return fmt.Errorf("look up blocks %d+%d: %w", block, n, err)
	}
	for _, r := range runs {
		fn(r[0], r[1])
	}
	return nil
}

// pin marks key as referenced by a read in flight.
func (v *Volume) pin(key int64) {
	v.pinMu.Lock()
	v.pins[key]++
	v.pinMu.Unlock()
}

func (v *Volume) unpin(keys []int64) {
	if len(keys) == 0 {
		return
	}
	v.pinMu.Lock()
	for _, k := range keys {
		if v.pins[k]--; v.pins[k] <= 0 {
			delete(v.pins, k)
		}
	}
	v.pinMu.Unlock()
}

// Pinned reports whether a read in flight references key. Dead GC must
// call it from inside a map proxy request (where reads pin), and skip
// pinned objects until a later round.
func (v *Volume) Pinned(key int64) bool {
	v.pinMu.Lock()
	defer v.pinMu.Unlock()
	return v.pins[key] > 0
}

// Readahead (with the cache only): a read that starts where an earlier
// read ended (a large one: near it, see observeRead) continues a stream;
// from the second read of a stream on, the next raBytes (at least two
// reads' worth, at most half the cache's stream tier) after it are
// fetched into the cache in the background, in aligned GETs of up to
// raMaxPiece, at low priority on both proxies, with the objects pinned
// like any read (docs/ARCHITECTURE.md §1, readahead). At most raStreams streams are tracked and
// raInflight prefetches run at once; a stream pushed out of the table, an
// error or Close cancels its prefetch. Prefetching only warms the cache:
// what a read returns still comes from the map lookup of that read.
const (
	raStreams  = 16
	raInflight = 4
	raBytes    = 32 << 20
	raMaxPiece = 4 << 20 // the largest GET of a prefetch (see raPiece)
	raTimeout  = 30 * time.Second
	raWait     = 200 * time.Millisecond // longest a read waits for a prefetch
	raParallel = 8                      // GETs one prefetch issues at once
	raSlack    = 4                      // a large read within this many of its own sizes of a stream's end continues it
	// raSmallReads is the reads in a row that make a stream of reads
	// smaller than a window (see observeRead).
	raSmallReads = 3
	// diskAheadRun is the windows one readahead run loads from the disk
	// tier (1 MiB of 64 KiB windows).
	diskAheadRun = 16
)

type readahead struct {
	mu       sync.Mutex
	streams  []*raStream // most recently continued last
	inflight int
	closed   bool
	wg       sync.WaitGroup
	// pending maps the windows being fetched (by a read or a prefetch) to
	// their flight, so that a read waits instead of fetching them again.
	pending map[cache.Key]*flight
}

type raStream struct {
	next  int64 // block the stream's next read starts at
	reads int
	ahead int64 // blocks before this are prefetched or being prefetched
	// ctx is made by the stream's first prefetch: most reads are random
	// and never continue a stream, and a context per read costs the hot
	// path a registration with the parent.
	ctx    context.Context
	cancel context.CancelFunc
	// whole holds the objects this stream fetched whole (Read, scattered):
	// once per stream, so that when the cache cannot hold every such
	// object until the stream has passed all its blocks, a window evicted
	// early costs a fetch span, not the object again (docs/ARCHITECTURE.md
	// §1, read path).
	whole map[int64]bool
}

// stop cancels the stream's prefetches, if it started any.
func (s *raStream) stop() {
	if s.cancel != nil {
		s.cancel()
	}
}

// firstWhole reports whether stream st has not fetched object key whole
// yet, and records that it now does.
func (v *Volume) firstWhole(st *raStream, key int64) bool {
	v.ra.mu.Lock()
	defer v.ra.mu.Unlock()
	if st.whole[key] {
		return false
	}
	if st.whole == nil {
		st.whole = make(map[int64]bool)
	}
	st.whole[key] = true
	return true
}

// observeRead notes a read of n blocks at block as it arrives, returns
// the stream it continues (nil when it continues none), and starts a
// prefetch when it does.
func (v *Volume) observeRead(block, n int64) *raStream {
	if v.cache == nil || n == 0 {
		return nil
	}
	ra := &v.ra
	ra.mu.Lock()
	defer ra.mu.Unlock()
	if ra.closed {
		return nil
	}
	// A large read may arrive a little out of order and still continue
	// a stream: a client keeps several in flight, and a loop device over
	// FUSE splits each of its requests in two (at 128 segments) that are
	// served concurrently. Small reads must start exactly where the
	// stream ends, or random reads would pass for streams.
	slack := int64(0)
	if n*v.o.BlockSize >= v.cache.Window() {
		slack = raSlack * n
	}
	var s *raStream
	late := false // a read the stream has passed: it arrived after later ones
	for i, x := range ra.streams {
		switch {
		case block >= x.next && block <= x.next+slack:
		case block < x.next && block >= x.next-slack:
			late = true
		default:
			continue
		}
		s = x
		copy(ra.streams[i:], ra.streams[i+1:])
		ra.streams[len(ra.streams)-1] = s
		break
	}
	if s != nil && late {
		// Part of the stream if it is one, but nothing to advance: a
		// read repeated where a stream began does not make one.
		if s.reads < 2 {
			return nil
		}
		return s
	}
	if s == nil {
		if len(ra.streams) == raStreams {
			ra.streams[0].stop() // that stream stopped
			ra.streams = ra.streams[1:]
		}
		ra.streams = append(ra.streams, &raStream{next: block + n, reads: 1, ahead: block + n})
		return nil
	}
	s.next, s.reads = max(s.next, block+n), s.reads+1
	// Evidence before cost, for small reads. Random 4 KiB reads over a
	// hot set continue one of the tracked streams by chance (16 streams
	// over 64 MiB: about one read in a thousand), and planning a
	// full-distance prefetch over a fragmented range costs far more CPU
	// than the read; so a stream of reads smaller than a window needs a
	// third read in a row, and its distance then ramps up, doubling with
	// every read, as the kernel's readahead does. Large reads keep the
	// full distance from their second read: a stream of them that loses
	// its place (reads out of order) starts again and must not crawl.
	ramp := int64(math.MaxInt64)
	if n*v.o.BlockSize < v.cache.Window() {
		if s.reads < raSmallReads {
			return s
		}
		ramp = 2 * n << min(s.reads-raSmallReads+1, 20)
	}
	// At least two reads ahead, at most half the cache's stream tier, so
	// that prefetched windows are not evicted before they are read; a
	// stream tier too small for that gets no readahead: what it fetched
	// would push out what it fetched before, and the reads fetch it again.
	dist := min(max(raBytes/v.o.BlockSize, 2*n), ramp, v.cache.StreamLimit()/2/v.o.BlockSize)
	if dist < 2*n {
		return s
	}
	target := min(s.next+dist, v.sb.Size/v.o.BlockSize)
	s.ahead = max(s.ahead, s.next)
	// Top up once half the distance is used, so prefetches are few and big.
	if target-s.ahead < dist/2 || ra.inflight >= raInflight {
		return s
	}
	if s.ctx == nil {
		s.ctx, s.cancel = context.WithCancel(v.bgCtx)
	}
	from, cnt, ctx := s.ahead, target-s.ahead, s.ctx
	s.ahead = target
	ra.inflight++
	v.cache.CountReadahead(cnt * v.o.BlockSize)
	ra.wg.Add(1)
	go func() {
		defer ra.wg.Done()
		if err := v.prefetch(ctx, s, from, cnt); err != nil && ctx.Err() == nil {
			v.log.Debug().Err(err).Int64("block", from).Int64("blocks", cnt).Msg("readahead failed; reads fetch for themselves")
		}
		ra.mu.Lock()
		ra.inflight--
		ra.mu.Unlock()
	}()
	return s
}

// observation is what ObserveRead saw of a read as it arrived, carried
// by the read's context to Read.
type observation struct {
	block, n int64
	stream   *raStream // nil: the read continues no stream
}

type observationKey struct{}

// ObserveRead implements chunker.StreamObserver: a frontend that serves
// reads concurrently calls it as each read arrives, in the client's
// order, and Read takes the stream decision from the returned context
// instead of observing the read again. Measured in the fragmented cold
// read through NBD (fio, 1 MiB at iodepth 8): Go's scheduler runs the
// goroutine started last first, so reads reached Read up to seven
// places out of order, past observeRead's slack, and each jump began a
// new stream: ~70 new streams for 1 GiB, which planned 3.9 GiB of
// readahead and issued up to a quarter more GETs than the same read at
// engine level (403-495 against 388). Reads smaller than a
// window are left to Read: most are random, and this runs on the
// frontend's one request-reading goroutine.
func (v *Volume) ObserveRead(ctx context.Context, block, n int64) context.Context {
	if v.cache == nil || n*v.o.BlockSize < v.cache.Window() || block < 0 || (block+n)*v.o.BlockSize > v.sb.Size {
		return ctx
	}
	return context.WithValue(ctx, observationKey{}, &observation{block: block, n: n, stream: v.observeRead(block, n)})
}

// observedStream returns the stream ObserveRead found for the read that
// ctx carries, when blocks [block, block+n) are that read or part of it
// (the chunker reads around blocks it holds itself).
func observedStream(ctx context.Context, block, n int64) (*raStream, bool) {
	o, ok := ctx.Value(observationKey{}).(*observation)
	if !ok || block < o.block || block+n > o.block+o.n {
		return nil, false
	}
	return o.stream, true
}

// prefetch fetches the windows of the mapped blocks in [block, block+n)
// that the cache lacks, at low priority, for stream s. An object whose
// blocks are scattered over the range is fetched whole, once per stream,
// as Read does: window by window it would cost a GET per block.
func (v *Volume) prefetch(ctx context.Context, s *raStream, block, n int64) error {
	ctx, cancel := context.WithTimeout(ctx, raTimeout)
	defer cancel()
	bs := v.o.BlockSize
	// A fragmented range is thousands of pieces: their slice is reused
	// from one prefetch to the next (nothing keeps it past the return).
	pp := raPieces.Get().(*[]readPiece)
	pieces := (*pp)[:0]
	defer func() { *pp = pieces[:0]; raPieces.Put(pp) }()
	var pinned []int64
	dataSize := make(map[int64]int64)
	defer func() { v.unpin(pinned) }()
	err := v.maps.Do(ctx, mapproxy.Low, func(m *extentmap.Map) {
		// Pinned on the map owner goroutine, as in Read.
		m.Lookup(block, n, func(e extentmap.Extent) {
			if e.Key < 0 || e.Zero {
				return
			}
			if k := len(pinned); k == 0 || pinned[k-1] != e.Key {
				pinned = append(pinned, e.Key)
				v.pin(e.Key)
				if _, total, ok := m.Live(e.Key); ok {
					dataSize[e.Key] = total * bs
				}
			}
			pieces = append(pieces, readPiece{key: e.Key, block: e.Block, off: e.Off * bs, length: e.N * bs})
		})
	})
	if err != nil {
		return fmt.Errorf("readahead: look up blocks %d+%d: %w", block, n, err)
	}
	w := v.cache.Window()
	objs, groups := groupByKey(pieces)
	// The windows the cache lacks, and those only its disk tier holds
	// (Where looks at the disk tier's index, so not under the lock).
	var lacking, onDisk []cache.Key
	need := func(k cache.Key) {
		switch v.cache.Where(k) {
		case cache.Missing:
			lacking = append(lacking, k)
		case cache.OnDisk:
			onDisk = append(onDisk, k)
		}
	}
	once := make(map[int64]bool) // objects the stream reads through: stream tier
	for i, key := range objs {
		ps := groups[i]
		sparse := scattered(ps, block*bs, n*bs, bs, v.o.ChunkSize)
		once[key] = !sparse
		if whole := dataSize[key]; whole > 0 && sparse && v.firstWhole(s, key) {
			for win := int64(0); win*w < whole; win++ {
				need(v.cacheKey(key, win))
			}
			continue
		}
		if sparse { // fetched whole once already: only what the range needs
			for _, p := range ps {
				for win := p.off / w; win*w < p.off+p.length; win++ {
					need(v.cacheKey(key, win))
				}
			}
			continue
		}
		// Whole aligned GETs of maxReadPiece around what the range maps
		// to: the stream reads on through the object, and a range that
		// starts or ends mid-object (or around windows reads claimed
		// already) would otherwise cost several smaller GETs.
		per := max(v.raPiece()/w, 1)
		seen := make(map[int64]bool)
		for _, p := range ps {
			for win := p.off / w / per * per; win*w < p.off+p.length; win += per {
				if seen[win] {
					continue
				}
				seen[win] = true
				lo, hi := spanWindows(win, per, dataSize[key], w)
				for x := lo; x < hi; x++ {
					need(v.cacheKey(key, x))
				}
			}
		}
	}
	// Those nobody fetches yet become runs; each run is claimed as one
	// flight, so a read waits only for the GET that brings its window.
	spans := make(map[int64][]span)
	var keys []int64
	v.ra.mu.Lock()
	for _, k := range lacking {
		if v.ra.pending[k] != nil {
			continue
		}
		if spans[k.Object] == nil {
			keys = append(keys, k.Object)
		}
		spans[k.Object] = append(spans[k.Object], span{start: k.Window * w, end: (k.Window + 1) * w})
	}
	v.ra.mu.Unlock()
	// Claim every run first (one flight each, so a read waits only for
	// the GET that brings its window), then fetch raParallel at a time:
	// a prefetch of a fragmented range is many small GETs, and one after
	// the other they would fall behind the stream they serve.
	var runs []fetchRun
	var plans []objectPlan
	v.ra.mu.Lock()
	if v.ra.pending == nil {
		v.ra.pending = make(map[cache.Key]*flight)
	}
	for _, key := range keys {
		for _, r := range v.coalesceUpTo(key, spans[key], once[key], v.raPiece()) {
			plan := objectPlan{key: key, own: &flight{done: make(chan struct{}), ahead: true}}
			for win := r.start / w; win*w < r.end; win++ {
				if k := v.cacheKey(key, win); v.ra.pending[k] == nil {
					v.ra.pending[k] = plan.own
					plan.mine = append(plan.mine, k)
				}
			}
			runs, plans = append(runs, r), append(plans, plan)
		}
	}
	// Windows on disk are loaded ahead of the stream too, a run of up to
	// diskAheadRun at a time beside the GETs: one after the other, the
	// stream's own reads would wait for each, one disk read deep.
	for len(onDisk) > 0 {
		plan := objectPlan{own: &flight{done: make(chan struct{}), ahead: true}}
		for len(onDisk) > 0 && len(plan.mine) < diskAheadRun {
			if k := onDisk[0]; v.ra.pending[k] == nil {
				v.ra.pending[k] = plan.own
				plan.mine = append(plan.mine, k)
			}
			onDisk = onDisk[1:]
		}
		if len(plan.mine) > 0 {
			runs, plans = append(runs, fetchRun{disk: true}), append(plans, plan)
		} else {
			close(plan.own.done)
		}
	}
	v.ra.mu.Unlock()
	sem := make(chan struct{}, raParallel)
	var wg sync.WaitGroup
	errs := make([]error, len(runs))
	for i := range runs {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			// A prefetch the stream's reads have passed (they fetched
			// for themselves) would only fetch again what the stream
			// no longer needs.
			switch {
			case ctx.Err() != nil || v.passed(s, block+n):
			case runs[i].disk:
				for _, k := range plans[i].mine {
					v.cache.LoadAhead(k) // a failed check: the read fetches it
				}
			default:
				errs[i] = v.fetch(ctx, objproxy.Low, runs[i], nil)
			}
			v.release(&plans[i])
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("readahead: %w", err)
	}
	return ctx.Err()
}

var raPieces = sync.Pool{New: func() any { return new([]readPiece) }}

// passed reports whether the reads of stream s have all gone past block
// end.
func (v *Volume) passed(s *raStream, end int64) bool {
	v.ra.mu.Lock()
	defer v.ra.mu.Unlock()
	return s.next >= end
}

// raPiece is the largest GET of a prefetch: raMaxPiece, or a quarter of
// the cache's stream tier if that is less (a power of two), so that the
// windows of a few GETs in flight do not push each other out of it before
// the stream takes them.
func (v *Volume) raPiece() int64 {
	p := int64(raMaxPiece)
	for p > v.cache.Window() && p > v.cache.StreamLimit()/4 {
		p /= 2
	}
	return p
}

// stopReadahead cancels every prefetch and waits for them.
func (v *Volume) stopReadahead() {
	v.ra.mu.Lock()
	v.ra.closed = true
	for _, s := range v.ra.streams {
		s.stop()
	}
	v.ra.streams = nil
	v.ra.mu.Unlock()
	v.ra.wg.Wait()
}
