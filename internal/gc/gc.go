// Package gc owns the two garbage collectors of a volume (docs/ARCHITECTURE.md §7):
//
//   - dead GC, every gc.wait: objects that no map entry references any more
//     are deleted outright below the delete floor (the oldest retained
//     checkpoint's watermark, from which recovery may start) and replaced by
//     an empty placeholder at or above it, so that roll-forward still finds
//     contiguous keys; a placeholder is deleted once a later checkpoint
//     raises the floor above it.
//   - threshold GC, on demand (SIGUSR1, the systemd timer): objects whose
//     live data fraction is below gc.live_data are compacted: their live
//     extents are copied, with their original seqnos, into new chunks that
//     the volume commits under new keys; the sources then die and dead GC
//     reclaims them. The live fraction counts data blocks only (a first
//     map scan counts them): discard tombstones hold no data, so they do
//     not keep an object of dead data from being compacted; they are
//     copied along as discards, as recovery must still replay them. Live
//     data is read with ranged GETs that read through up to coalesceGap of
//     dead data rather than issue another request. Copies are packed in
//     device block order, so a compacted region reads back as long runs.
//   - defragmentation, on demand (SIGUSR2, of gc.defrag_range): the live
//     data of a block range is copied the same way, in block order, out of
//     every object holding some, whatever its live fraction. It and
//     threshold GC run one at a time.
//
// Objects that hold only discards (no data blocks) are never compacted;
// they cost one metadata area each and die when their discards are
// overwritten.
//
// A phase that lasts logs "GC progress" lines at a steady interval
// (internal/progress): dead pass in objects, live-data count and copy in
// device blocks.
//
// Both run at low priority on the map proxy and the object proxy, so user
// I/O overtakes them. The collector must never delete or empty an object
// that the map or an in-flight read references, never touch the newest
// object (key Watermark()-1) or any key not yet applied, never change map
// entries except through the volume's CommitCopies (which keeps seqnos, so
// a copy never beats a newer user write), and never hold the map proxy for
// more than one gc.step window at a time. It assumes it is the only
// collector of its volume.
package gc

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/progress"
)

// Defaults for zero Options fields (the configuration's defaults).
const (
	DefaultStep     = 1 << 20
	DefaultLiveData = 0.3
	DefaultWait     = 10 * time.Minute
)

// Options configure a Collector.
type Options struct {
	// Step is how many device blocks one map scan request covers
	// (gc.step): the longest the map proxy is held by GC at a time.
	Step int64
	// LiveData is the live fraction below which threshold GC compacts an
	// object (gc.live_data), in (0, 1].
	LiveData float64
	// Wait is the period of dead GC (gc.wait).
	Wait   time.Duration
	Logger zerolog.Logger
}

// Stats describe one run (a dead pass, or a threshold run with the dead
// pass that ends it).
type Stats struct {
	// Examined: objects considered for compaction (applied, not the
	// newest, holding data).
	Examined int64
	// Compacted: objects whose live extents were copied to new chunks.
	Compacted int64
	// Reclaimed: objects deleted from the bucket (dead data objects below
	// the delete floor, and placeholders whose turn came).
	Reclaimed int64
	// Placeholders: dead objects at or above the delete floor replaced by
	// an empty placeholder (their data is gone; the object goes later).
	Placeholders int64
	// InUse: dead objects left for a later pass because a read in
	// flight or a threshold run uses them.
	InUse int64
	// BytesRead and BytesWritten: data GC read from and uploaded to the
	// store for compaction.
	BytesRead, BytesWritten int64
	// BytesFreed: bytes of the objects deleted or emptied.
	BytesFreed int64
	Duration   time.Duration
}

func (s *Stats) add(o Stats) {
	s.Examined += o.Examined
	s.Compacted += o.Compacted
	s.Reclaimed += o.Reclaimed
	s.Placeholders += o.Placeholders
	s.InUse += o.InUse
	s.BytesRead += o.BytesRead
	s.BytesWritten += o.BytesWritten
	s.BytesFreed += o.BytesFreed
}

// ErrBusy is returned by Threshold while another threshold run is going.
var ErrBusy = errors.New("threshold GC is already running")

// ErrStopped is returned by runs started after Stop.
var ErrStopped = errors.New("garbage collector is stopped")

// Collector runs dead and threshold GC on one volume.
type Collector struct {
	v   Volume
	o   Options
	log zerolog.Logger

	// ctx is cancelled by Stop; every run listens to it.
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	started bool
	stopped bool
	wg      sync.WaitGroup // the dead-GC loop and runs in progress

	// busy is set while a threshold run is going.
	busy atomic.Bool

	// deadMu makes dead passes one at a time; empty (guarded by it) holds
	// the keys known to be empty placeholders in the bucket.
	deadMu sync.Mutex
	empty  map[int64]struct{}

	// compacting is the sorted list of the keys a threshold run may be
	// reading: dead GC leaves them alone until the run is over.
	compacting atomic.Pointer[[]int64]

	// gets bounds the ranged GETs of a threshold run in flight at once.
	gets int
	// gap is how many bytes of dead data one GET may span to read two
	// live pieces of an object at once.
	gap int64

	// now, if set (tests only), is the clock of the progress lines.
	now func() time.Time

	// hook, if set (tests only), is called at named points of a
	// threshold run: "read" once a chunk's data is read (no key taken
	// yet), "key" once its key is taken (before CommitCopies).
	hook func(stage string)

	totals totals // for Totals (totals.go)
}

// New returns a collector for v. Zero Options fields take the defaults.
func New(v Volume, o Options) *Collector {
	if o.Step <= 0 {
		o.Step = DefaultStep
	}
	if !(o.LiveData > 0 && o.LiveData <= 1) {
		o.LiveData = DefaultLiveData
	}
	if o.Wait <= 0 {
		o.Wait = DefaultWait
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Collector{
		v:      v,
		o:      o,
		log:    o.Logger,
		ctx:    ctx,
		cancel: cancel,
		empty:  make(map[int64]struct{}),
		gets:   getConcurrency,
		gap:    coalesceGap,
	}
}

// progress starts the progress lines of one phase of a run ("GC
// progress", with the phase named): total units of unit, and bytes under
// bytesName ("" for none).
func (c *Collector) progress(phase, unit, bytesName string, total int64) *progress.Reporter {
	return progress.New(c.log.With().Str("phase", phase).Logger(), "GC progress",
		progress.Options{Unit: unit, BytesName: bytesName, Total: total, Now: c.now})
}

// enter registers a run (or the loop) so that Stop waits for it; false
// once stopped.
func (c *Collector) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return false
	}
	c.wg.Add(1)
	return true
}

// Start runs a dead-GC pass every Wait until Stop. Calling it again does
// nothing.
func (c *Collector) Start() {
	c.mu.Lock()
	if c.started || c.stopped {
		c.mu.Unlock()
		return
	}
	c.started = true
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		t := time.NewTicker(c.o.Wait)
		defer t.Stop()
		for {
			select {
			case <-c.ctx.Done():
				return
			case <-t.C:
			}
			// Errors are logged by the pass; the next tick retries.
			_, _ = c.CollectDead(c.ctx)
		}
	}()
}

// Stop cancels the dead-GC loop and any threshold run and waits for them:
// a run stops between steps; a chunk whose key is taken is still
// committed, because the volume cannot apply later keys without it.
// Runs started afterwards return ErrStopped.
func (c *Collector) Stop() {
	c.mu.Lock()
	c.stopped = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
}

// runCtx is ctx, also cancelled by Stop.
func (c *Collector) runCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(c.ctx, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// Threshold runs one threshold GC (compaction of objects below LiveData)
// followed by a dead pass, and returns what it did. It returns ErrBusy at
// once if a run is already going.
func (c *Collector) Threshold(ctx context.Context) (Stats, error) {
	return c.exclusive(ctx, c.threshold)
}

// exclusive runs one threshold or defragmentation run: ErrBusy at once if
// one is going, ErrStopped after Close.
func (c *Collector) exclusive(ctx context.Context, run func(context.Context) (Stats, error)) (Stats, error) {
	if !c.busy.CompareAndSwap(false, true) {
		return Stats{}, ErrBusy
	}
	defer c.busy.Store(false)
	if !c.enter() {
		return Stats{}, ErrStopped
	}
	defer c.wg.Done()
	ctx, cancel := c.runCtx(ctx)
	defer cancel()
	return run(ctx)
}

// Trigger starts a threshold run in the background (the SIGUSR1 handler)
// and returns true, or logs and returns false when a run is already going
// or the collector is stopped. The run logs its outcome.
func (c *Collector) Trigger() bool {
	return c.trigger("threshold GC", func(ctx context.Context) { _, _ = c.threshold(ctx) })
}

// trigger runs run in the background unless a threshold or
// defragmentation run is going or the collector is stopped (then it logs
// what was ignored and returns false). run logs its own result and error.
func (c *Collector) trigger(what string, run func(ctx context.Context)) bool {
	if !c.busy.CompareAndSwap(false, true) {
		c.log.Warn().Str("run", what).Msg("GC run requested while a threshold GC or defragmentation run is going; ignored")
		return false
	}
	if !c.enter() {
		c.busy.Store(false)
		c.log.Warn().Str("run", what).Msg("GC run requested after the collector stopped; ignored")
		return false
	}
	go func() {
		defer c.wg.Done()
		defer c.busy.Store(false)
		ctx, cancel := c.runCtx(context.Background())
		defer cancel()
		run(ctx)
	}()
	return true
}

// Running reports whether a threshold run is going.
func (c *Collector) Running() bool { return c.busy.Load() }

func (c *Collector) setCompacting(keys []int64) {
	if keys == nil {
		c.compacting.Store(nil)
		return
	}
	c.compacting.Store(&keys)
}

// isCompacting reports whether a threshold run may be reading key.
func (c *Collector) isCompacting(key int64) bool {
	p := c.compacting.Load()
	return p != nil && contains(*p, key)
}

// contains reports whether the sorted keys hold key.
func contains(keys []int64, key int64) bool {
	return index(keys, key) >= 0
}

// index returns the position of key in the sorted keys, or -1.
func index(keys []int64, key int64) int {
	i, j := 0, len(keys)
	for i < j {
		h := int(uint(i+j) >> 1)
		if keys[h] < key {
			i = h + 1
		} else {
			j = h
		}
	}
	if i < len(keys) && keys[i] == key {
		return i
	}
	return -1
}

func (c *Collector) callHook(stage string) {
	if c.hook != nil {
		c.hook(stage)
	}
}
