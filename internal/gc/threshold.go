package gc

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
)

const (
	// pipelineDepth is how many batches of copy chunks are being read or
	// committed at once (each holds a chunk buffer per chunk).
	pipelineDepth = 2
	// getConcurrency bounds the ranged GETs of one run in flight at once.
	// Priorities order the proxy's queues, but GETs already running share
	// the store with user reads: on MinIO, 4 kept user 4 KiB read latency
	// within ~1.5x of idle during a run where 16 tripled it, for a run
	// about 1.2–2x longer (BenchmarkThresholdGC).
	getConcurrency = 4
	// coalesceGap is how much dead data between two live pieces of one
	// object a GET reads through rather than splitting in two. A request
	// costs more than the bytes it saves: a GET's fixed cost (~1–5 ms on
	// MinIO, tens of ms on S3) buys about a megabyte of transfer. With
	// random 4 KiB overwrites (BenchmarkThresholdGC), 256 KiB made runs
	// 20–30x shorter than reading adjacent pieces only, for 6–8x the bytes
	// read (in-region transfer is free on S3; requests are not).
	coalesceGap = 256 << 10
	// batchBytes is how much copied data one batch of chunks holds: the
	// GETs of a batch are planned together, so an object whose live
	// pieces block order spreads over the batch's chunks is read once, not
	// once per chunk. A run holds pipelineDepth batches in memory.
	batchBytes = 16 << 20
)

// candidates is a snapshot of the objects a threshold run examines, in key
// order, with their data blocks still referenced by the map.
type candidates struct {
	keys     []int64
	total    []int64 // data blocks the object was written with
	dataLive []int64 // map entries with data (not tombstones) pointing to it
	last     int     // index cache: extents of one object come in runs
}

func (s *candidates) find(key int64) int {
	if s.last < len(s.keys) && s.keys[s.last] == key {
		return s.last
	}
	i := index(s.keys, key)
	if i >= 0 {
		s.last = i
	}
	return i
}

// piece is one extent to copy: n blocks at device block, stored in object
// key at block offset off, written with seqno seq; zero: a tombstone,
// copied as a discard without data.
type piece struct {
	block, n int64
	key, off int64
	seq      uint64
	zero     bool
}

// threshold is one run; the caller holds busy.
func (c *Collector) threshold(ctx context.Context) (Stats, error) {
	start := time.Now()
	c.log.Info().Float64("live_data", c.o.LiveData).Int64("step", c.o.Step).Msg("threshold GC run started")
	var st Stats
	err := c.v.Err()
	if err == nil {
		st, err = c.compactAll(ctx)
	}
	if err == nil {
		var ds Stats
		ds, err = c.CollectDead(ctx)
		st.add(ds)
	}
	st.Duration = time.Since(start)
	c.totals.record(KindThreshold, st, err)
	ev := c.log.Info()
	if err != nil {
		ev = c.log.Error().Err(err)
	}
	ev.Int64("examined", st.Examined).Int64("compacted", st.Compacted).
		Int64("bytes_read", st.BytesRead).Int64("bytes_written", st.BytesWritten).
		Int64("reclaimed", st.Reclaimed).Int64("placeholders", st.Placeholders).
		Int64("bytes_freed", st.BytesFreed).Float64("live_data", c.o.LiveData).
		Dur("duration_ms", st.Duration).Msg("threshold GC run")
	if err != nil {
		return st, fmt.Errorf("threshold GC: %w", err)
	}
	return st, nil
}

// compactAll selects the objects below LiveData and copies their live
// extents into new chunks.
func (c *Collector) compactAll(ctx context.Context) (Stats, error) {
	var st Stats
	v := c.v
	// 1. Snapshot the applied objects that hold data, except the newest.
	var cs candidates
	err := v.MapDo(ctx, mapproxy.Low, func(m *extentmap.Map) {
		wm := v.Watermark()
		m.Objects(func(key, live, total int64) bool {
			if key >= wm-1 {
				return false
			}
			if live > 0 && total > 0 {
				cs.keys = append(cs.keys, key)
				cs.total = append(cs.total, total)
			}
			return true
		})
	})
	if err != nil {
		return st, fmt.Errorf("list objects: %w", err)
	}
	st.Examined = int64(len(cs.keys))
	if len(cs.keys) == 0 {
		return st, nil
	}
	// 2. Count their live data blocks: the map's live counts include
	// tombstones, which hold no data, so they would hide an object whose
	// data is all dead behind a few discards.
	cs.dataLive = make([]int64, len(cs.keys))
	err = c.scan(ctx, func(e extentmap.Extent, _ uint64) {
		if e.Zero {
			return
		}
		if i := cs.find(e.Key); i >= 0 {
			cs.dataLive[i] += e.N
		}
	})
	if err != nil {
		return st, fmt.Errorf("count live data: %w", err)
	}
	var victims []int64
	for i, k := range cs.keys {
		if float64(cs.dataLive[i]) < c.o.LiveData*float64(cs.total[i]) {
			victims = append(victims, k)
		}
	}
	cs = candidates{} // free the snapshot before the copy pass
	st.Compacted = int64(len(victims))
	if len(victims) == 0 {
		return st, nil
	}
	// 3. Copy, over the whole device.
	st.BytesRead, st.BytesWritten, err = c.copyLive(ctx, victims, 0, c.v.Size()/c.v.BlockSize())
	return st, err
}

// copyLive copies the live extents (data and tombstones) of blocks
// [from, to) that the victims hold into new chunks, in device block order
// across the whole pass, and returns the bytes read and written.
//
// Block order: the map is scanned window by window in increasing block
// order and the open chunk carries over from one window to the next, so
// consecutive device blocks land next to each other in the new objects,
// in one chunk or the next (keys follow block order within a batch),
// without holding more than one window's extents at a time. A compacted
// region then reads back as long runs. The price is on the read side: the
// pieces of one chunk come from wherever their blocks were last written,
// so a chunk needs more GETs than one packed in source order would; commit
// plans the GETs of a batch of chunks together, by source object, to keep
// them coalesced.
//
// Only the order of items changes: each block has one live map entry, so
// no two pieces of a pass cover the same block, and every copy keeps its
// original seqno, so a user write that lands meanwhile still wins.
func (c *Collector) copyLive(ctx context.Context, victims []int64, from, to int64) (read, written int64, err error) {
	// Dead GC leaves the victims alone meanwhile: a victim whose last
	// block a user overwrites now must stay readable until the pass is
	// done with it.
	c.setCompacting(victims)
	defer c.setCompacting(nil)
	r := newCopier(c, ctx)
	if err := r.lookUpStarts(victims); err != nil {
		return 0, 0, err
	}
	vs := candidates{keys: victims}
	var pieces []piece
	// Progress in device blocks: the copy goes window by window over
	// [from, to), not object by object.
	rep := c.progress("copy live data", "blocks", "bytes_written", to-from)
	err = c.scanWindows(ctx, from, to, func(e extentmap.Extent, seq uint64) {
		if vs.find(e.Key) < 0 {
			return
		}
		pieces = append(pieces, piece{block: e.Block, n: e.N, key: e.Key, off: e.Off, seq: seq, zero: e.Zero})
	}, func(end int64) error {
		// Scan order is block order.
		for _, p := range pieces {
			r.add(p)
		}
		pieces = pieces[:0]
		rep.Set(end-from, r.bytesWritten.Load())
		return r.failed()
	})
	if err == nil {
		r.flush()
	}
	cerr := r.wait()
	rep.Set(to-from, r.bytesWritten.Load())
	rep.Finish()
	if err == nil {
		err = cerr
	}
	if err != nil {
		return r.bytesRead.Load(), r.bytesWritten.Load(), fmt.Errorf("copy live extents: %w", err)
	}
	return r.bytesRead.Load(), r.bytesWritten.Load(), nil
}

// scan calls fn for every written extent of the device, one Step-block
// window per low-priority map request.
func (c *Collector) scan(ctx context.Context, fn func(extentmap.Extent, uint64)) error {
	blocks := c.v.Size() / c.v.BlockSize()
	rep := c.progress("count live data", "blocks", "", blocks)
	err := c.scanWindows(ctx, 0, blocks, fn, func(end int64) error {
		rep.Set(end, 0)
		return nil
	})
	rep.Finish()
	return err
}

// scanWindows calls fn for every written extent of blocks [from, to), in
// block order, one Step-block window per low-priority map request, and
// after, off the map goroutine, after each window with the block the
// window ends at. It stops between windows when ctx ends or after fails.
func (c *Collector) scanWindows(ctx context.Context, from, to int64, fn func(extentmap.Extent, uint64), after func(end int64) error) error {
	for ; from < to; from += c.o.Step {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(c.o.Step, to-from)
		err := c.v.MapDo(ctx, mapproxy.Low, func(m *extentmap.Map) {
			m.Scan(from, n, func(e extentmap.Extent, seq uint64) bool {
				fn(e, seq)
				return true
			})
		})
		if err != nil {
			return fmt.Errorf("scan blocks %d+%d: %w", from, n, err)
		}
		if after != nil {
			if err := after(from + n); err != nil {
				return err
			}
		}
	}
	return nil
}

// copier packs pieces into chunks and commits them batchChunks chunks at
// a time, pipelineDepth batches at once.
type copier struct {
	c           *Collector
	ctx         context.Context
	layout      chunk.Layout
	bs          int64
	maxItems    int
	chunkBlocks int64
	batchChunks int

	cur       []piece   // the chunk being filled
	curBlocks int64     // data blocks in cur
	batch     [][]piece // full chunks waiting for the batch to fill
	// starts holds the data start of the source objects whose data area
	// does not begin after the layout's whole metadata area.
	starts map[int64]int64

	free chan [][]byte // chunk buffers of a batch not in use
	gets chan struct{}
	wg   sync.WaitGroup

	mu  sync.Mutex
	err error

	bytesRead, bytesWritten atomic.Int64
}

func newCopier(c *Collector, ctx context.Context) *copier {
	l := c.v.Layout()
	r := &copier{
		c:           c,
		ctx:         ctx,
		layout:      l,
		bs:          l.BlockSize,
		maxItems:    int(l.MaxItems()),
		chunkBlocks: l.ChunkSize / l.BlockSize,
		batchChunks: int(max(1, batchBytes/l.ChunkSize)),
		free:        make(chan [][]byte, pipelineDepth),
		gets:        make(chan struct{}, c.gets),
		starts:      make(map[int64]int64),
	}
	for range pipelineDepth {
		r.free <- nil // allocated on first use
	}
	return r
}

// lookUpStarts records where the data area of each source object starts
// (compact objects differ, docs/ARCHITECTURE.md §3). Sources are victims,
// which stay tracked while they are being compacted.
func (r *copier) lookUpStarts(keys []int64) error {
	v := r.c.v
	md := r.layout.MetadataSize()
	err := v.MapDo(r.ctx, mapproxy.Low, func(m *extentmap.Map) {
		for _, k := range keys {
			if s := v.DataStartIn(m, k); s != md {
				r.starts[k] = s
			}
		}
	})
	if err != nil {
		return fmt.Errorf("look up data starts of the sources: %w", err)
	}
	return nil
}

func (r *copier) fail(err error) {
	r.mu.Lock()
	if r.err == nil {
		r.err = err
	}
	r.mu.Unlock()
}

func (r *copier) failed() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// add appends p to the open chunk, splitting it over chunks as needed.
func (r *copier) add(p piece) {
	if p.zero {
		if len(r.cur) >= r.maxItems {
			r.next()
		}
		r.cur = append(r.cur, p)
		return
	}
	for p.n > 0 {
		room := r.chunkBlocks - r.curBlocks
		if room == 0 || len(r.cur) >= r.maxItems {
			r.next()
			continue
		}
		q := p
		q.n = min(p.n, room)
		r.cur = append(r.cur, q)
		r.curBlocks += q.n
		p.block += q.n
		p.off += q.n
		p.n -= q.n
	}
}

// next closes the open chunk into the batch, and hands the batch on once
// it is full.
func (r *copier) next() {
	if len(r.cur) > 0 {
		r.batch = append(r.batch, r.cur)
	}
	r.cur, r.curBlocks = nil, 0
	if len(r.batch) >= r.batchChunks {
		r.flushBatch()
	}
}

// flush hands the open chunk and the batch to a pipeline slot; it waits
// while all slots are busy.
func (r *copier) flush() {
	if len(r.cur) > 0 {
		r.batch = append(r.batch, r.cur)
	}
	r.cur, r.curBlocks = nil, 0
	r.flushBatch()
}

func (r *copier) flushBatch() {
	chunks := r.batch
	r.batch = nil
	if len(chunks) == 0 || r.failed() != nil {
		return
	}
	var bufs [][]byte
	select {
	case bufs = <-r.free:
	case <-r.ctx.Done():
		r.fail(r.ctx.Err())
		return
	}
	for len(bufs) < len(chunks) {
		bufs = append(bufs, make([]byte, r.layout.BufferSize()))
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer func() { r.free <- bufs }()
		if err := r.commit(chunks, bufs); err != nil {
			r.fail(err)
		}
	}()
}

// wait waits for the chunks in the pipeline and returns the first error.
func (r *copier) wait() error {
	r.wg.Wait()
	return r.failed()
}

// commit reads the data of a batch of chunks into bufs (chunk i into
// bufs[i]) where the builder will place it, builds the chunks and commits
// them under new keys, in order, with the original seqnos.
func (r *copier) commit(chunks [][]piece, bufs [][]byte) error {
	c := r.c
	v := c.v
	md := r.layout.MetadataSize()
	// Ranged GETs. Data pieces are placed in chunk (block) order from md
	// of their chunk's buffer; the GETs of the whole batch go in source
	// order: sorted by object and offset, a piece that continues the
	// previous one in the same object, or follows it within the gap
	// allowance, extends its GET. Reading a batch of chunks at once, not
	// one, lets one GET serve the pieces of an object that block order
	// spreads over several chunks. A GET whose pieces land back to back in
	// the same order in one buffer goes straight there, any other into a
	// staging buffer that is then scattered.
	type part struct {
		src, dst, n int64 // src: offset in the object, then in the GET
		buf         int
	}
	type get struct {
		key, objOff, n int64
		parts          []part
	}
	type source struct {
		key int64
		part
	}
	var srcs []source
	for i, pieces := range chunks {
		dst := md
		for _, p := range pieces {
			if p.zero {
				continue
			}
			n := p.n * r.bs
			base, ok := r.starts[p.key]
			if !ok {
				base = md
			}
			srcs = append(srcs, source{key: p.key, part: part{src: base + p.off*r.bs, dst: dst, n: n, buf: i}})
			dst += n
		}
	}
	slices.SortFunc(srcs, func(a, b source) int {
		return cmp.Or(cmp.Compare(a.key, b.key), cmp.Compare(a.src, b.src))
	})
	var gets []*get
	for _, s := range srcs {
		if k := len(gets) - 1; k >= 0 && gets[k].key == s.key {
			g := gets[k]
			if end := g.objOff + g.n; s.src >= end && s.src-end <= c.gap {
				g.parts = append(g.parts, part{src: s.src - g.objOff, dst: s.dst, n: s.n, buf: s.buf})
				g.n = s.src + s.n - g.objOff
				continue
			}
		}
		gets = append(gets, &get{key: s.key, objOff: s.src, n: s.n, parts: []part{{0, s.dst, s.n, s.buf}}})
	}
	g, gctx := errgroup.WithContext(r.ctx)
	for _, gt := range gets {
		acquired := false
		select {
		case r.gets <- struct{}{}:
			acquired = true
		case <-gctx.Done():
		}
		if !acquired {
			break
		}
		g.Go(func() error {
			defer func() { <-r.gets }()
			first := gt.parts[0]
			// Direct only without gaps, into one buffer: the bytes of
			// a gap would land on whatever piece the chunk places there.
			direct := true
			sum := int64(0)
			for _, pt := range gt.parts {
				direct = direct && pt.buf == first.buf && pt.dst-first.dst == pt.src
				sum += pt.n
			}
			direct = direct && sum == gt.n
			var into []byte
			if direct {
				into = bufs[first.buf][first.dst : first.dst+gt.n]
			} else {
				into = make([]byte, gt.n)
			}
			n, err := v.ReadObject(gctx, gt.key, gt.objOff, into)
			r.bytesRead.Add(int64(n))
			if err != nil {
				return fmt.Errorf("read key %d at %d: %w", gt.key, gt.objOff, err)
			}
			if int64(n) != gt.n {
				return fmt.Errorf("read key %d at %d: object ends after %d of %d bytes", gt.key, gt.objOff, n, gt.n)
			}
			if !direct {
				for _, pt := range gt.parts {
					copy(bufs[pt.buf][pt.dst:pt.dst+pt.n], into[pt.src:pt.src+pt.n])
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	c.callHook("read")
	// Last point where the run can stop without leaving anything behind.
	if err := r.ctx.Err(); err != nil {
		return err
	}

	spb := uint64(r.bs / chunk.SectorSize)
	builders := make([]*chunk.Builder, len(chunks))
	for i, pieces := range chunks {
		buf := bufs[i]
		b := chunk.NewBuilder(r.layout, buf)
		dst := md
		for _, p := range pieces {
			it := chunk.Item{Sector: uint64(p.block) * spb, Length: uint64(p.n) * spb, Seqno: p.seq, Flag: chunk.OpWrite}
			if p.zero {
				it.Flag = chunk.OpDiscard
				b.Add(it, nil)
				continue
			}
			n := p.n * r.bs
			// The data is already where Add puts it; the copy moves nothing.
			if got := b.Add(it, buf[dst:dst+n]); got != dst {
				return fmt.Errorf("chunk builder placed data at %d, read at %d", got, dst)
			}
			dst += n
		}
		b.Seal()
		builders[i] = b
	}
	// The keys are taken last, when the chunks are complete, in block
	// order: until one is applied, no later key can be, so none may wait
	// for reads. Once a key is taken, the volume cannot apply later keys
	// without it: its chunk is committed even if the run is being
	// cancelled.
	cg := errgroup.Group{}
	for i, b := range builders {
		key := v.NextKey()
		c.callHook("key")
		buf := bufs[i]
		cg.Go(func() error {
			body := b.Seal()
			if err := v.CommitCopies(context.WithoutCancel(r.ctx), key, buf, b.Items()); err != nil {
				return fmt.Errorf("commit copies as key %d: %w", key, err)
			}
			r.bytesWritten.Add(int64(len(body)))
			return nil
		})
	}
	return cg.Wait()
}
