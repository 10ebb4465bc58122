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
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

const (
	// pipelineDepth is how many copy chunks are being read or committed
	// at once (each holds one chunk buffer).
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
	ev := c.log.Info()
	if err != nil {
		ev = c.log.Error().Err(err)
	}
	ev.Int64("examined", st.Examined).Int64("compacted", st.Compacted).
		Int64("bytes_read", st.BytesRead).Int64("bytes_written", st.BytesWritten).
		Int64("reclaimed", st.Reclaimed).Int64("placeholders", st.Placeholders).
		Int64("bytes_freed", st.BytesFreed).Float64("live_data", c.o.LiveData).
		Dur("duration", st.Duration).Msg("threshold GC run")
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
	err := v.Maps().Do(ctx, mapproxy.Low, func(m *extentmap.Map) {
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
	// 3. Copy. Dead GC leaves the victims alone meanwhile: a victim
	// whose last block a user overwrites now must stay readable until
	// the run is done with it.
	c.setCompacting(victims)
	defer c.setCompacting(nil)
	r := newCopier(c, ctx)
	vs := candidates{keys: victims}
	var data, zeros []piece
	err = c.scanWindows(ctx, func(e extentmap.Extent, seq uint64) {
		if vs.find(e.Key) < 0 {
			return
		}
		p := piece{block: e.Block, n: e.N, key: e.Key, off: e.Off, seq: seq, zero: e.Zero}
		if p.zero {
			zeros = append(zeros, p)
		} else {
			data = append(data, p)
		}
	}, func() error {
		// Data in source order: consecutive pieces of one object land
		// next to each other in the new chunk, so one ranged GET reads
		// them, and the copy keeps the order the data was written in.
		slices.SortFunc(data, func(a, b piece) int {
			return cmp.Or(cmp.Compare(a.key, b.key), cmp.Compare(a.off, b.off))
		})
		for _, p := range zeros {
			r.add(p)
		}
		for _, p := range data {
			r.add(p)
		}
		data, zeros = data[:0], zeros[:0]
		return r.failed()
	})
	if err == nil {
		r.flush()
	}
	cerr := r.wait()
	st.BytesRead = r.bytesRead.Load()
	st.BytesWritten = r.bytesWritten.Load()
	if err == nil {
		err = cerr
	}
	if err != nil {
		return st, fmt.Errorf("copy live extents: %w", err)
	}
	return st, nil
}

// scan calls fn for every written extent of the device, one Step-block
// window per low-priority map request.
func (c *Collector) scan(ctx context.Context, fn func(extentmap.Extent, uint64)) error {
	return c.scanWindows(ctx, fn, nil)
}

// scanWindows is scan with after called, off the map goroutine, after each
// window. It stops between windows when ctx ends or after fails.
func (c *Collector) scanWindows(ctx context.Context, fn func(extentmap.Extent, uint64), after func() error) error {
	blocks := c.v.Size() / c.v.BlockSize()
	for from := int64(0); from < blocks; from += c.o.Step {
		if err := ctx.Err(); err != nil {
			return err
		}
		err := c.v.Maps().Do(ctx, mapproxy.Low, func(m *extentmap.Map) {
			m.Scan(from, c.o.Step, func(e extentmap.Extent, seq uint64) bool {
				fn(e, seq)
				return true
			})
		})
		if err != nil {
			return fmt.Errorf("scan blocks %d+%d: %w", from, c.o.Step, err)
		}
		if after != nil {
			if err := after(); err != nil {
				return err
			}
		}
	}
	return nil
}

// copier packs pieces into chunks and commits them, pipelineDepth chunks
// at a time.
type copier struct {
	c           *Collector
	ctx         context.Context
	layout      chunk.Layout
	bs          int64
	maxItems    int
	chunkBlocks int64

	cur       []piece // the chunk being filled
	curBlocks int64   // data blocks in cur

	free chan []byte // chunk buffers not in use
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
		free:        make(chan []byte, pipelineDepth),
		gets:        make(chan struct{}, c.gets),
	}
	for range pipelineDepth {
		r.free <- nil // allocated on first use
	}
	return r
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
			r.flush()
		}
		r.cur = append(r.cur, p)
		return
	}
	for p.n > 0 {
		room := r.chunkBlocks - r.curBlocks
		if room == 0 || len(r.cur) >= r.maxItems {
			r.flush()
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

// flush hands the open chunk to a pipeline slot; it waits while all slots
// are busy.
func (r *copier) flush() {
	pieces := r.cur
	r.cur, r.curBlocks = nil, 0
	if len(pieces) == 0 || r.failed() != nil {
		return
	}
	var buf []byte
	select {
	case buf = <-r.free:
	case <-r.ctx.Done():
		r.fail(r.ctx.Err())
		return
	}
	if buf == nil {
		buf = make([]byte, r.layout.BufferSize())
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer func() { r.free <- buf }()
		if err := r.commit(pieces, buf); err != nil {
			r.fail(err)
		}
	}()
}

// wait waits for the chunks in the pipeline and returns the first error.
func (r *copier) wait() error {
	r.wg.Wait()
	return r.failed()
}

// commit reads the data of pieces into buf where the builder will place
// it, builds the chunk and commits it under a new key with the original
// seqnos.
func (r *copier) commit(pieces []piece, buf []byte) error {
	c := r.c
	v := c.v
	md := r.layout.MetadataSize()
	// Ranged GETs. Data pieces are placed in order from md; a piece that
	// continues the previous one in the same object, or follows it within
	// the gap allowance, extends its GET. A GET without gaps lands
	// straight in the data area, one with gaps in a staging buffer.
	type part struct{ src, dst, n int64 } // src: offset in the GET
	type get struct {
		key, objOff, n int64
		parts          []part
	}
	var gets []*get
	dst := md
	for _, p := range pieces {
		if p.zero {
			continue
		}
		objOff, n := md+p.off*r.bs, p.n*r.bs
		if k := len(gets) - 1; k >= 0 && gets[k].key == p.key {
			g := gets[k]
			if end := g.objOff + g.n; objOff >= end && objOff-end <= c.gap {
				g.parts = append(g.parts, part{src: objOff - g.objOff, dst: dst, n: n})
				g.n = objOff + n - g.objOff
				dst += n
				continue
			}
		}
		gets = append(gets, &get{key: p.key, objOff: objOff, n: n, parts: []part{{0, dst, n}}})
		dst += n
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
			direct := true
			for _, pt := range gt.parts {
				direct = direct && pt.dst-first.dst == pt.src
			}
			var into []byte
			if direct {
				into = buf[first.dst : first.dst+gt.n]
			} else {
				into = make([]byte, gt.n)
			}
			n, err := v.Objects().GetRange(gctx, objproxy.Low, store.DataName(gt.key), gt.objOff, into)
			r.bytesRead.Add(int64(n))
			if err != nil {
				return fmt.Errorf("read key %d at %d: %w", gt.key, gt.objOff, err)
			}
			if int64(n) != gt.n {
				return fmt.Errorf("read key %d at %d: object ends after %d of %d bytes", gt.key, gt.objOff, n, gt.n)
			}
			if !direct {
				for _, pt := range gt.parts {
					copy(buf[pt.dst:pt.dst+pt.n], into[pt.src:pt.src+pt.n])
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
	b := chunk.NewBuilder(r.layout, buf)
	dst = md
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
	body := b.Seal()
	// The key is taken last, when the chunk is complete: until it is
	// applied, no later key can be, so it must not wait for reads.
	key := v.NextKey()
	c.callHook("key")
	// Once the key is taken, the volume cannot apply later keys without
	// it: commit even if the run is being cancelled.
	if err := v.CommitCopies(context.WithoutCancel(r.ctx), key, buf, b.Items()); err != nil {
		return fmt.Errorf("commit copies as key %d: %w", key, err)
	}
	r.bytesWritten.Add(int64(len(body)))
	return nil
}
