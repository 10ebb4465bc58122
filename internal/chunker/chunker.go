// Package chunker is the userspace counterpart of the BUSE kernel module:
// it turns the writes of the NBD and FUSE frontends into chunks in exactly
// the BUSE layout (collision-area splitting, per-area sequence numbers,
// 32-byte items) and hands each closed chunk to the volume engine, so every
// frontend shares one write path.
//
// Writes are acknowledged once copied into the open chunk (FUA writes once
// their chunk is committed). Until a chunk's map update is done, its writes
// are served to readers from chunk memory (the overlay) and, once the
// chunk's object is stored and its buffer released, from that object, so
// a read never returns data older than an acknowledged write. The chunker
// never talks to the object store or the map directly.
package chunker

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/frontend"
)

// Engine is what the chunker needs of the volume.
type Engine interface {
	Size() int64
	BlockSize() int64
	Layout() chunk.Layout
	// NextKey hands out the next key; called when a chunk is closed.
	NextKey() int64
	// Commit uploads the chunk as the object of key and applies it to the
	// map; buf may be reused once it returns.
	Commit(ctx context.Context, key int64, buf []byte, items int) error
	// Read fills buf with n blocks at block from the map and the store.
	Read(ctx context.Context, block, n int64, buf []byte) error
	// Mapped reports the runs of blocks that hold data in the map.
	Mapped(ctx context.Context, block, n int64, fn func(block, n int64)) error
}

// UnappliedReader is implemented by engines that call the stored hook
// (chunk.WithStoredHook) and can read a stored chunk's blocks before its
// apply: with such an engine a chunk buffer is reused as soon as its
// object is stored, so one slow upload does not hold the buffers of the
// chunks behind it (docs/ARCHITECTURE.md §4.4).
type UnappliedReader interface {
	ReadUnapplied(ctx context.Context, key, dataStart, dataOff, block, n int64, buf []byte) error
}

// WindowedEngine is an UnappliedReader that takes a chunk's data area in
// windows of its read cache: the chunker builds chunks in windows from
// the engine's source, and the engine uploads them as one body and keeps
// them as cached windows of the new object without copying them
// (docs/ARCHITECTURE.md §18).
type WindowedEngine interface {
	// ChunkWindow is the size of a data window and the source of new
	// windows of that size; size 0: the engine takes no windows now.
	// chunks is how many chunks the caller fills at once at most (its
	// buffers): the source keeps that many chunks' windows at hand.
	ChunkWindow(chunks int) (size int64, alloc func() []byte)
	// CommitWindows is Commit of a chunk whose metadata area is md and
	// whose data area is data, windows of ChunkWindow's size (the last
	// one cut at the end of the data). From the moment the engine calls
	// the stored hook (chunk.WithStoredHook) the windows are the
	// engine's, and the caller must not touch them again; until then,
	// and when it fails before, they stay the caller's.
	CommitWindows(ctx context.Context, key int64, md []byte, data [][]byte, items int) error
	// RecycleWindow takes back a window from ChunkWindow's source that
	// no chunk kept (a write's payload window that was copied).
	RecycleWindow(w []byte)
}

// StreamObserver is implemented by engines that read ahead of sequential
// streams: the chunker passes frontend.ReadObserver's calls on, in
// blocks.
type StreamObserver interface {
	ObserveRead(ctx context.Context, block, n int64) context.Context
}

// Options configure a Chunker.
type Options struct {
	// Durable: Flush waits until every earlier chunk is committed
	// (write.durable). Otherwise Flush only closes the open chunk, which
	// orders it before every later write.
	Durable bool
	// Buffers is the number of chunk buffers: one open chunk plus those
	// uploading. Writers wait when all are in use.
	Buffers int
	// MaxInflight bounds the chunks that have a key and are not applied
	// yet (uploading, or stored and waiting for a lower key), which the
	// volume's claim window must cover (volume Options.MaxInflight). 0:
	// Buffers. It only matters when the engine is an UnappliedReader.
	MaxInflight int
	// CollisionArea is the width in bytes of a sequence-number area
	// (write.collision_chunk_size).
	CollisionArea int64
	// MaxAge closes an open chunk holding data after this long, bounding
	// how long an acknowledged write stays only in memory.
	MaxAge time.Duration
	Logger zerolog.Logger
}

// pending is a chunk buffer from the moment it is opened until its commit
// is done.
type pending struct {
	b      *chunk.Builder // holds the chunk; nil once released (the object is stored)
	items  int            // items, counted at close
	key    int64          // -1 while open
	opened time.Time
	done   chan struct{}
	err    error
	// runs are the device block runs the chunk's items cover, adjacent
	// ones merged: what to drop from the overlay once it is applied.
	runs [][2]int64
	// dataStart is where the stored object's data area starts, valid
	// once b is nil.
	dataStart int64

	// What the chunk holds, for the report of a shutdown cut short. A
	// request counts in the chunk that got its last part (the one with
	// the highest key: if any part of it is not committed, that one is
	// not); its bytes count in the chunk of each part.
	writes, acked      int64 // requests, and those acknowledged
	bytes, ackedBytes  int64 // device bytes their parts cover here
	firstByte, endByte int64 // device byte range the parts cover
}

// count is the number of items in p: counted by its builder while open,
// at close afterwards.
func (p *pending) count() int {
	if p.key < 0 && p.b != nil {
		return p.b.Items()
	}
	return p.items
}

// part is the share of one request in one chunk.
type part struct {
	p     *pending
	bytes int64
}

// Chunker implements frontend.Device over an Engine.
type Chunker struct {
	e      Engine
	o      Options
	layout chunk.Layout
	bs     int64
	size   int64
	seq    *chunk.Sequencer
	log    zerolog.Logger

	ur     UnappliedReader // e, when it is one; nil otherwise
	we     WindowedEngine  // e, when its chunks are built in its windows; nil otherwise
	win    int64           // with we: the window size and source
	alloc  func() []byte
	md     int64 // metadata area size: data offsets in a buffer start here
	maxInf int

	mu       sync.Mutex
	cond     *sync.Cond
	open     *pending
	free     []*chunk.Builder // builders over free chunk buffers
	freeRuns [][][2]int64     // run lists of applied chunks, for reuse
	inflight map[int64]*pending
	overlay  *overlay
	touched  []part     // scratch of WriteAt and Zero, under mu
	err      error      // first commit failure: the device stops taking writes
	failed   []*pending // chunks whose commit failed, kept for Unstored
	closed   bool
	// durableThrough is the highest key a completed durable flush (or
	// Drain) waited for: every key up to it was committed.
	durableThrough int64
	loopStopped    bool

	stop     chan struct{}
	loopDone chan struct{}

	// adopted counts the payload windows chunks took without a copy.
	adopted atomic.Int64
}

var (
	_ frontend.Device       = (*Chunker)(nil)
	_ frontend.TryWriter    = (*Chunker)(nil)
	_ frontend.WindowWriter = (*Chunker)(nil)
	_ frontend.ReadObserver = (*Chunker)(nil)
)

// DefaultCollisionArea is CollisionArea when Options leave it 0, that of
// write.collision_chunk_size (internal/engine's tests hold the two
// together).
const DefaultCollisionArea = 1 << 20

// ErrClosed is returned for requests after Close.
var ErrClosed = errors.New("device is closed")

// New returns a Chunker writing through e.
func New(e Engine, o Options) *Chunker {
	if o.Buffers < 2 {
		o.Buffers = 2
	}
	if o.MaxAge <= 0 {
		o.MaxAge = 500 * time.Millisecond
	}
	if o.CollisionArea <= 0 {
		o.CollisionArea = DefaultCollisionArea
	}
	if o.MaxInflight < o.Buffers {
		o.MaxInflight = o.Buffers
	}
	l := e.Layout()
	c := &Chunker{
		e:              e,
		o:              o,
		layout:         l,
		bs:             e.BlockSize(),
		size:           e.Size(),
		seq:            chunk.NewSequencer(e.Size(), o.CollisionArea),
		log:            o.Logger,
		md:             l.MetadataSize(),
		maxInf:         o.MaxInflight,
		inflight:       make(map[int64]*pending),
		overlay:        newOverlay(e.BlockSize()),
		stop:           make(chan struct{}),
		durableThrough: -1,
		loopDone:       make(chan struct{}),
	}
	c.ur, _ = e.(UnappliedReader)
	var win int64
	var alloc func() []byte
	if we, ok := e.(WindowedEngine); ok && c.ur != nil {
		if win, alloc = we.ChunkWindow(o.Buffers); win > 0 {
			c.we, c.win, c.alloc = we, win, alloc
		}
	}
	c.cond = sync.NewCond(&c.mu)
	for i := 0; i < o.Buffers; i++ {
		if c.we != nil {
			c.free = append(c.free, chunk.NewWindowed(l, make([]byte, l.MetadataSize()), win, alloc))
		} else {
			c.free = append(c.free, chunk.NewBuilder(l, make([]byte, l.BufferSize())))
		}
	}
	go c.ageLoop()
	return c
}

// Size implements frontend.Device.
func (c *Chunker) Size() int64 { return c.size }

// BlockSize implements frontend.Device.
func (c *Chunker) BlockSize() int64 { return c.bs }

func (c *Chunker) check(off, length int64) error {
	if off < 0 || length < 0 || off%c.bs != 0 || length%c.bs != 0 || off+length > c.size {
		return fmt.Errorf("%w: %d bytes at %d on a %d-byte device with %d-byte blocks", frontend.ErrInvalid, length, off, c.size, c.bs)
	}
	return nil
}

// usableLocked reports why the device cannot take writes, if it cannot.
func (c *Chunker) usableLocked() error {
	if c.closed {
		return ErrClosed
	}
	if c.err != nil {
		return fmt.Errorf("device failed earlier: %w", c.err)
	}
	return nil
}

// openLocked returns the open chunk, opening one when a buffer is free
// and waiting (with c.mu released) when none is.
func (c *Chunker) openLocked() (*pending, error) {
	for c.open == nil {
		if err := c.usableLocked(); err != nil {
			return nil, err
		}
		// Keys handed out and not applied stay within MaxInflight (the
		// claim window of the next attach covers them).
		if n := len(c.free); n > 0 && len(c.inflight) < c.maxInf {
			b := c.free[n-1]
			c.free = c.free[:n-1]
			b.Reset()
			c.open = &pending{b: b, key: -1, opened: time.Now(), done: make(chan struct{}), firstByte: -1}
			if k := len(c.freeRuns); k > 0 {
				c.open.runs = c.freeRuns[k-1][:0]
				c.freeRuns = c.freeRuns[:k-1]
			}
			break
		}
		c.cond.Wait()
	}
	return c.open, nil
}

// closeLocked closes the open chunk: it takes the next key (so keys follow
// closing order) and starts the commit.
func (c *Chunker) closeLocked() {
	p := c.open
	if p == nil {
		return
	}
	c.open = nil
	p.items = p.b.Items()
	if p.items == 0 {
		c.releaseLocked(p)
		return
	}
	// No Seal: Commit gets the item count and finishes the metadata
	// itself (docs/ARCHITECTURE.md §3).
	p.key = c.e.NextKey()
	c.inflight[p.key] = p
	go c.commit(p, p.items)
}

func (c *Chunker) commit(p *pending, items int) {
	ctx := chunk.WithDataCRC(context.Background(), p.b.DataCRC())
	if c.ur != nil {
		ctx = chunk.WithStoredHook(ctx, func(dataStart int64) { c.stored(p, dataStart) })
	}
	var err error
	if p.b.Windowed() {
		err = c.we.CommitWindows(ctx, p.key, p.b.Metadata(), p.b.Data(), items)
	} else {
		err = c.e.Commit(ctx, p.key, p.b.Buffer(), items)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.inflight, p.key)
	p.err = err
	if err != nil {
		// The writes were acknowledged: keep serving them from memory
		// or their stored object (a buffer still held is not reused)
		// and refuse further writes.
		if c.err == nil {
			c.err = err
		}
		c.failed = append(c.failed, p)
		c.log.Error().Err(err).Int64("key", p.key).Msg("chunk commit failed; device stops taking writes")
	} else {
		c.overlay.drop(p)
		c.releaseLocked(p)
		c.freeRuns = append(c.freeRuns, p.runs)
		p.runs = nil
	}
	close(p.done)
	c.cond.Broadcast()
}

// stored is the engine's stored hook of p: the object is in the store, so
// the buffer goes back to the free list and reads of p's blocks go to the
// object until the apply (docs/ARCHITECTURE.md §4.4).
func (c *Chunker) stored(p *pending, dataStart int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p.dataStart = dataStart
	if p.b != nil {
		// A windowed chunk's windows are the engine's now (it caches
		// them once this returns); no reader copies from them after
		// this, since readers copy under c.mu.
		p.b.DropWindows()
	}
	c.releaseLocked(p)
	c.cond.Broadcast()
}

// releaseLocked returns p's buffer (and its builder) to the free list,
// once. p.b must not be used afterwards; p.items keeps the item count.
func (c *Chunker) releaseLocked(p *pending) {
	if p.b != nil {
		c.free = append(c.free, p.b)
		p.b = nil
	}
}

// noteLocked records n blocks at block, written to p at buffer offset off
// (-1: zeros), as their newest pending write: it is, since seqnos are
// taken under c.mu (§4.1).
func (c *Chunker) noteLocked(p *pending, block, n, off int64) {
	c.overlay.set(block, n, p, off)
	if k := len(p.runs); k > 0 && p.runs[k-1][0]+p.runs[k-1][1] == block {
		p.runs[k-1][1] += n
	} else {
		p.runs = append(p.runs, [2]int64{block, n})
	}
}

// payload is a write's data: one slice, or the windows of WriteWindows,
// which a windowed chunk takes as they are where they line up with its
// own windows.
type payload struct {
	b    []byte
	wins [][]byte
	crcs []uint32 // with wins: their checksums, or nil
	win  int64    // with wins: their size
}

// appendLocked adds one item of length bytes at off to open chunks,
// splitting it when a chunk fills up, and records the chunks it went to.
// Its data is src from byte at; src is nil for data-less ops.
func (c *Chunker) appendLocked(off, length int64, src *payload, at int64, op uint64, seq uint64, touched *[]part) error {
	data := src != nil
	for length > 0 {
		p, err := c.openLocked()
		if err != nil {
			return err
		}
		n, need := length, int64(0) // need: data bytes the item takes
		if data {
			room := (c.layout.BufferSize() - p.b.Len()) / c.bs * c.bs
			n = min(n, room)
			need = n
		}
		if n == 0 || !p.b.Fits(need) {
			c.closeLocked()
			continue
		}
		it := chunk.Item{Sector: uint64(off / chunk.SectorSize), Length: uint64(n / chunk.SectorSize), Seqno: seq, Flag: op}
		var dataOff int64
		switch {
		case !data:
			dataOff = p.b.Add(it, nil)
		case src.wins != nil:
			dataOff = p.b.AddWindows(it, src.wins, src.crcs, src.win, at)
		default:
			dataOff = p.b.Add(it, src.b[at:at+n])
		}
		at += n
		c.noteLocked(p, off/c.bs, n/c.bs, dataOff)
		if k := len(*touched); k == 0 || (*touched)[k-1].p != p {
			*touched = append(*touched, part{p: p})
		}
		(*touched)[len(*touched)-1].bytes += n
		p.bytes += n
		if p.firstByte < 0 || off < p.firstByte {
			p.firstByte = off
		}
		p.endByte = max(p.endByte, off+n)
		off += n
		length -= n
	}
	return nil
}

// finishLocked records the request that put touched into chunks: it
// counts in its last chunk, and unless fua it is acknowledged now. With
// fua it closes the chunks that are still open and waits until all of
// them are committed.
func (c *Chunker) finishLocked(touched []part, fua bool) error {
	if len(touched) == 0 {
		return nil
	}
	touched[len(touched)-1].p.writes++
	if !fua {
		for _, t := range touched {
			t.p.ackedBytes += t.bytes
		}
		touched[len(touched)-1].p.acked++
		return nil
	}
	for _, t := range touched {
		if c.open == t.p {
			c.closeLocked()
		}
	}
	// touched is c.touched's array, which the next request reuses once
	// c.mu is released.
	touched = append([]part(nil), touched...)
	c.mu.Unlock()
	defer c.mu.Lock()
	for _, t := range touched {
		<-t.p.done
		if t.p.err != nil {
			return t.p.err
		}
	}
	return nil
}

// WriteAt implements frontend.Device.
func (c *Chunker) WriteAt(ctx context.Context, data []byte, off int64, fua bool) error {
	if err := c.check(off, int64(len(data))); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usableLocked(); err != nil {
		return err
	}
	return c.writeLocked(&payload{b: data}, int64(len(data)), off, fua)
}

// MaxTryWrite is the largest write TryWriteAt takes: small enough that it
// always fits the open chunk plus one fresh one, whatever the chunk size.
const MaxTryWrite = 128 << 10

// TryWriteAt implements frontend.TryWriter: it is WriteAt without fua for
// a caller that must not wait (the NBD reader takes small writes on its own
// goroutine, docs/ARCHITECTURE.md §20). When the open chunk, or the open
// chunk and one free buffer, can take the write now, it writes it and
// returns true with WriteAt's result. Otherwise, and for writes over
// MaxTryWrite, it returns false and changes nothing (no seqno is taken).
func (c *Chunker) TryWriteAt(data []byte, off int64) (bool, error) {
	n := int64(len(data))
	if n > MaxTryWrite || n > c.layout.ChunkSize {
		return false, nil
	}
	if err := c.check(off, n); err != nil {
		return true, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usableLocked(); err != nil {
		return true, err
	}
	if !c.canTakeLocked(off, n) {
		return false, nil
	}
	return true, c.writeLocked(&payload{b: data}, n, off, false)
}

// PayloadWindow implements frontend.WindowWriter: a window of the
// engine's read cache, the memory the chunks are built in; nil when the
// chunks are not built in windows (no read cache).
func (c *Chunker) PayloadWindow() []byte {
	if c.we == nil {
		return nil
	}
	return c.alloc()[:c.win]
}

// WriteWindows implements frontend.WindowWriter: WriteAt of the n bytes
// in wins, windows from PayloadWindow, with their checksums crcs (or
// nil). Windows that line up with the chunk's own become its windows as
// they are (chunk.Builder.AddWindows), so a large aligned write reaches
// its chunk without a copy; the others are copied and recycled
// (docs/ARCHITECTURE.md §18).
func (c *Chunker) WriteWindows(ctx context.Context, wins [][]byte, crcs []uint32, n, off int64, fua bool) error {
	defer func() { // after c.mu is released
		for _, w := range wins {
			if w == nil {
				c.adopted.Add(1)
			}
		}
		c.RecycleWindows(wins) // those no chunk took
	}()
	if !c.fillsWindows(wins, n) {
		return fmt.Errorf("write of %d bytes in %d windows not filled as %d-byte windows from PayloadWindow: %w", n, len(wins), c.win, frontend.ErrInvalid)
	}
	if err := c.check(off, n); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usableLocked(); err != nil {
		return err
	}
	if len(crcs) != len(wins) {
		crcs = nil
	}
	return c.writeLocked(&payload{wins: wins, crcs: crcs, win: c.win}, n, off, fua)
}

// fillsWindows reports whether wins hold n bytes as WriteWindows takes
// them: every window full but the last, which is not empty.
func (c *Chunker) fillsWindows(wins [][]byte, n int64) bool {
	if c.we == nil || len(wins) == 0 {
		return false
	}
	for i, w := range wins {
		if int64(cap(w)) < c.win || (i < len(wins)-1 && int64(len(w)) != c.win) {
			return false
		}
	}
	return len(wins[len(wins)-1]) > 0 && int64(len(wins)-1)*c.win+int64(len(wins[len(wins)-1])) == n
}

// RecycleWindows implements frontend.WindowWriter: the windows of wins
// that are not nil go back to the engine's source.
func (c *Chunker) RecycleWindows(wins [][]byte) {
	for i, w := range wins {
		if w != nil && c.we != nil {
			c.we.RecycleWindow(w)
		}
		wins[i] = nil
	}
}

// canTakeLocked reports whether a write of n bytes at off goes into
// chunks without waiting for a buffer: it fits the open chunk whole, or a
// buffer is free to open once the open chunk closes (n is at most one
// chunk, so the rest always fits the fresh one).
func (c *Chunker) canTakeLocked(off, n int64) bool {
	// Items the write needs: one per collision area it touches (§4.1);
	// at most two for a write no longer than an area.
	items := 1
	if off/c.o.CollisionArea != (off+n-1)/c.o.CollisionArea {
		items = 2
	}
	inflight := len(c.inflight)
	if p := c.open; p != nil {
		if p.b.FitsItems(items, n) {
			return true
		}
		inflight++ // appendLocked closes it first
	}
	return len(c.free) > 0 && inflight < c.maxInf
}

// writeLocked puts a checked write of n bytes into chunks and
// acknowledges it (with fua, once committed).
func (c *Chunker) writeLocked(data *payload, n, off int64, fua bool) error {
	touched := c.touched[:0]
	var err error
	c.seq.Split(off, n, func(o, l int64, seq uint64) {
		if err != nil {
			return
		}
		err = c.appendLocked(o, l, data, o-off, chunk.OpWrite, seq, &touched)
	})
	if err != nil {
		if len(touched) > 0 {
			touched[len(touched)-1].p.writes++ // not acknowledged
		}
		return err
	}
	c.touched = touched[:0] // reused by the next request: no allocation per write
	return c.finishLocked(touched, fua)
}

// Zero implements frontend.Device. Only blocks that hold data (in the map
// or in a pending chunk) get an item: zeroing never-written space would
// only cost map memory and log space. The check happens under c.mu, so no
// write to those blocks can be acknowledged in between.
func (c *Chunker) Zero(ctx context.Context, off, length int64, discard, fua bool) error {
	if err := c.check(off, length); err != nil {
		return err
	}
	op := uint64(chunk.OpWriteZeroes)
	if discard {
		op = chunk.OpDiscard
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usableLocked(); err != nil {
		return err
	}
	block, n := off/c.bs, length/c.bs
	var runs [][2]int64
	c.overlay.each(block, block+n, func(e ovExt) bool {
		lo, hi := max(e.start, block), min(e.end(), block+n)
		runs = append(runs, [2]int64{lo, hi - lo})
		return true
	})
	if err := c.e.Mapped(ctx, block, n, func(b, n int64) { runs = append(runs, [2]int64{b, n}) }); err != nil {
		return err
	}
	touched := c.touched[:0]
	for _, r := range mergeRuns(runs) {
		var err error
		c.seq.Split(r[0]*c.bs, r[1]*c.bs, func(o, l int64, seq uint64) {
			if err == nil {
				err = c.appendLocked(o, l, nil, 0, op, seq, &touched)
			}
		})
		if err != nil {
			if len(touched) > 0 {
				touched[len(touched)-1].p.writes++ // not acknowledged
			}
			return err
		}
	}
	c.touched = touched[:0]
	return c.finishLocked(touched, fua)
}

// mergeRuns sorts runs of blocks and merges the overlapping or adjacent.
func mergeRuns(runs [][2]int64) [][2]int64 {
	if len(runs) < 2 {
		return runs
	}
	sort.Slice(runs, func(i, j int) bool { return runs[i][0] < runs[j][0] })
	out := runs[:1]
	for _, r := range runs[1:] {
		last := &out[len(out)-1]
		if r[0] <= last[0]+last[1] {
			last[1] = max(last[1], r[0]+r[1]-last[0])
			continue
		}
		out = append(out, r)
	}
	return out
}

// storedRun is a run of blocks whose newest write is in a stored chunk
// whose buffer was released: read from its object (ReadUnapplied).
type storedRun struct {
	key, dataStart, dataOff int64
	block, n                int64
}

// ObserveRead implements frontend.ReadObserver: it passes the read on to
// the engine when the engine reads ahead of streams. A read the overlay
// serves in part still counts for its stream: the stream is the client's
// order of reads, wherever their blocks are.
func (c *Chunker) ObserveRead(ctx context.Context, off, length int64) context.Context {
	so, ok := c.e.(StreamObserver)
	if !ok || c.check(off, length) != nil {
		return ctx
	}
	return so.ObserveRead(ctx, off/c.bs, length/c.bs)
}

// ReadAt implements frontend.Device: blocks with a pending write are
// copied from chunk memory, or read from the chunk's object once it is
// stored and its buffer released; the rest come from the engine. A block
// absent from the overlay has its newest acknowledged write in the map
// already, because entries leave the overlay only after the map update.
func (c *Chunker) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := c.check(off, int64(len(p))); err != nil {
		return err
	}
	block, n := off/c.bs, int64(len(p))/c.bs
	c.mu.Lock()
	if c.overlay.len() == 0 {
		c.mu.Unlock()
		return c.e.Read(ctx, block, n, p)
	}
	var runs [][2]int64 // blocks to read from the engine
	var stored []storedRun
	next := block
	c.overlay.each(block, block+n, func(e ovExt) bool {
		lo, hi := max(e.start, block), min(e.end(), block+n)
		if lo > next {
			runs = append(runs, [2]int64{next, lo - next})
		}
		next = hi
		dst := p[(lo-block)*c.bs : (hi-block)*c.bs]
		switch {
		case e.off < 0:
			clear(dst)
		case e.p.b != nil:
			e.p.b.ReadData(e.off+(lo-e.start)*c.bs, dst)
		default:
			stored = append(stored, storedRun{key: e.p.key, dataStart: e.p.dataStart, dataOff: e.off - c.md + (lo-e.start)*c.bs, block: lo, n: hi - lo})
		}
		return true
	})
	if next < block+n {
		runs = append(runs, [2]int64{next, block + n - next})
	}
	c.mu.Unlock()
	for _, r := range stored {
		s := (r.block - block) * c.bs
		if err := c.ur.ReadUnapplied(ctx, r.key, r.dataStart, r.dataOff, r.block, r.n, p[s:s+r.n*c.bs]); err != nil {
			return err
		}
	}
	for _, r := range runs {
		s := (r[0] - block) * c.bs
		if err := c.e.Read(ctx, r[0], r[1], p[s:s+r[1]*c.bs]); err != nil {
			return err
		}
	}
	return nil
}

// Flush implements frontend.Device: it closes the open chunk, which gives
// it a key below every later chunk (an ordering barrier), and with Durable
// waits until it and every earlier chunk are committed.
func (c *Chunker) Flush(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	c.closeLocked()
	if !c.o.Durable {
		return c.err
	}
	return c.drainLocked()
}

// Drain closes the open chunk and waits until every chunk written so far
// is committed, whatever the durability mode (a durable flush).
func (c *Chunker) Drain(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	c.closeLocked()
	return c.drainLocked()
}

// drainLocked waits until every chunk in flight now is committed.
func (c *Chunker) drainLocked() error {
	var last int64 = -1
	for k := range c.inflight {
		last = max(last, k)
	}
	for {
		if c.err != nil {
			return c.err
		}
		busy := false
		for k := range c.inflight {
			if k <= last {
				busy = true
				break
			}
		}
		if !busy {
			c.durableThrough = max(c.durableThrough, last)
			return nil
		}
		c.cond.Wait()
	}
}

// Close commits everything written so far and stops taking requests. It
// is Shutdown without a time limit.
func (c *Chunker) Close() error {
	return c.Shutdown(context.Background())
}

// Shutdown stops taking requests (writes waiting for a buffer fail with
// ErrClosed), closes the open chunk and waits until every chunk is
// committed, a commit fails, or ctx ends. When writes are left that are
// not committed, it returns a *NotStoredError saying what they are;
// commits still running go on in the background. Calling it again waits
// again for what is left.
func (c *Chunker) Shutdown(ctx context.Context) error {
	c.mu.Lock()
	if !c.closed {
		c.closeLocked()
		c.closed = true
		c.cond.Broadcast()
	}
	stopLoop := !c.loopStopped
	c.loopStopped = true
	wake := context.AfterFunc(ctx, func() {
		c.mu.Lock()
		c.cond.Broadcast()
		c.mu.Unlock()
	})
	for len(c.inflight) > 0 && c.err == nil && ctx.Err() == nil {
		c.cond.Wait()
	}
	u := c.unstoredLocked()
	cause := c.err
	if cause == nil {
		cause = ctx.Err()
	}
	c.mu.Unlock()
	wake()
	if stopLoop {
		close(c.stop)
		<-c.loopDone
	}
	if u.Chunks == 0 {
		return nil
	}
	if cause == nil {
		cause = errors.New("writes left in memory")
	}
	return &NotStoredError{Unstored: u, Err: cause}
}

// Unstored describes the writes the chunker holds that are not committed
// to the engine: chunks being uploaded, chunks whose commit failed and the
// open chunk.
type Unstored struct {
	// Chunks is the number of such chunks (the open one included).
	Chunks int
	// FirstKey and LastKey are the range of their keys; -1 when none has
	// a key yet (only the open chunk).
	FirstKey, LastKey int64
	// Writes and Bytes are the write and zero requests with a part in
	// them and the device bytes those parts cover.
	Writes, Bytes int64
	// Acked and AckedBytes are the part of Writes and Bytes that was
	// acknowledged to the frontend (FUA requests never are until stored).
	Acked, AckedBytes int64
	// Flushed and FlushedBytes are the acknowledged requests a completed
	// durable flush promised were stored. The chunker never lets that
	// happen; a non-zero value is a bug, reported rather than hidden.
	Flushed, FlushedBytes int64
	// FirstByte and EndByte bound the device bytes the parts cover.
	FirstByte, EndByte int64
	// Durable is Options.Durable: whether flushes waited for the store.
	Durable bool
}

// Unstored reports what is not committed now.
func (c *Chunker) Unstored() Unstored {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.unstoredLocked()
}

func (c *Chunker) unstoredLocked() Unstored {
	u := Unstored{FirstKey: -1, LastKey: -1, FirstByte: -1, Durable: c.o.Durable}
	add := func(p *pending) {
		if p == nil || p.count() == 0 {
			return
		}
		u.Chunks++
		if p.key >= 0 {
			if u.FirstKey < 0 || p.key < u.FirstKey {
				u.FirstKey = p.key
			}
			u.LastKey = max(u.LastKey, p.key)
			if p.key <= c.durableThrough {
				u.Flushed += p.acked
				u.FlushedBytes += p.ackedBytes
			}
		}
		u.Writes += p.writes
		u.Bytes += p.bytes
		u.Acked += p.acked
		u.AckedBytes += p.ackedBytes
		if p.firstByte >= 0 && (u.FirstByte < 0 || p.firstByte < u.FirstByte) {
			u.FirstByte = p.firstByte
		}
		u.EndByte = max(u.EndByte, p.endByte)
	}
	for _, p := range c.failed {
		add(p)
	}
	for _, p := range c.inflight {
		add(p)
	}
	add(c.open)
	return u
}

// Summary says in one sentence what the writes not stored mean for the
// user: with durable flushes, whether any flushed write is among them;
// without, how many acknowledged writes they are.
func (u Unstored) Summary() string {
	if u.Chunks == 0 {
		return "every write is stored"
	}
	unacked, unackedBytes := u.Writes-u.Acked, u.Bytes-u.AckedBytes
	if u.Durable {
		s := "no flushed write is lost"
		if u.Flushed > 0 {
			s = fmt.Sprintf("BUG: %d writes (%d bytes) covered by a completed flush are lost", u.Flushed, u.FlushedBytes)
		}
		return fmt.Sprintf("%s; %d unflushed writes (%d bytes) were not stored", s, u.Writes-u.Flushed, u.Bytes-u.FlushedBytes)
	}
	return fmt.Sprintf("%d acknowledged writes (%d bytes) were not stored and are lost; %d more writes (%d bytes) were not acknowledged yet",
		u.Acked, u.AckedBytes, unacked, unackedBytes)
}

// MarshalZerologObject logs every count of u.
func (u Unstored) MarshalZerologObject(e *zerolog.Event) {
	e.Int("chunks", u.Chunks).Int64("first_key", u.FirstKey).Int64("last_key", u.LastKey).
		Int64("writes", u.Writes).Int64("bytes", u.Bytes).
		Int64("acked_writes", u.Acked).Int64("acked_bytes", u.AckedBytes).
		Int64("flushed_writes", u.Flushed).Int64("flushed_bytes", u.FlushedBytes).
		Int64("first_byte", u.FirstByte).Int64("end_byte", u.EndByte).Bool("durable", u.Durable)
}

// NotStoredError is returned by Shutdown when writes were left that are
// not committed; Err is why (the context's error or the commit failure).
type NotStoredError struct {
	Unstored Unstored
	Err      error
}

func (e *NotStoredError) Error() string {
	keys := "no key yet"
	if e.Unstored.FirstKey >= 0 {
		keys = fmt.Sprintf("keys %d..%d", e.Unstored.FirstKey, e.Unstored.LastKey)
	}
	return fmt.Sprintf("%d chunks (%s) not committed: %s: %v", e.Unstored.Chunks, keys, e.Unstored.Summary(), e.Err)
}

func (e *NotStoredError) Unwrap() error { return e.Err }

// ageLoop closes open chunks that have held data for MaxAge.
func (c *Chunker) ageLoop() {
	defer close(c.loopDone)
	t := time.NewTicker(c.o.MaxAge / 4)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		c.mu.Lock()
		if c.open != nil && c.open.b.Items() > 0 && time.Since(c.open.opened) >= c.o.MaxAge {
			c.closeLocked()
		}
		c.mu.Unlock()
	}
}
