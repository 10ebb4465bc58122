package crashtest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/crashpoint"
	bs3engine "github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/volume"
)

// The crash-point suite (in the style of Pebble's errorfs and
// FoundationDB's simulation). A scripted life of a volume runs over an
// in-memory bucket behind a crashpoint wrapper that crashes the machine
// at store call N: attach, writes, zeroings, flushes and FUA writes, an
// explicit checkpoint, more writes over the same blocks, a dead GC pass,
// a threshold GC run, more writes, a clean close, a second attach, a few
// writes, a flush and a clean close. Every N the clean life makes is
// tried (exhaustive), in both modes of a bucket-changing crash call: its
// effect lost, or landed with its reply lost. Without write.durable,
// every third chunk upload is held back until the next one is stored
// (cpReorder), so that crashes also leave chunks past a missing key.
//
// After each crash, the crashed engine is stopped so that nothing of it
// reaches the bucket any more, and a fresh attach over a new wrapper (the
// restarted machine) must succeed and read the whole device as a state
// the history allows, checked with the crash suite's checker
// (history.check): every write covered by a completed durable flush, a
// FUA write or a clean close is there; the state is that after a prefix
// of each attach's acknowledged writes; nothing foreign, stale, torn or
// misplaced. Then the structure of the bucket: that attach is crashed in
// turn and a second one, which replays the same keys from the same
// checkpoint, must read exactly the same device and close cleanly. For a
// sample of N (the first ones that left chunks past a gap, and every
// 75th), the recovery is itself crashed at every store call M of its own
// script (attach, writes, flush, dead GC, clean close) and recovered
// again: if the crashed recovery's attach had returned, the device must
// be the state it exposed plus an allowed outcome of its own writes;
// otherwise an allowed outcome of the first history.
//
// A violation names its case (seed, configuration, N and M, and the crash
// calls by object) and saves the order of the store calls of its runs;
// TestCrashPointReplay replays it with both, making the calls in the
// recorded order. Everything runs in-process on store/mem.

// Environment variables of the suite.
const (
	// cpSeedsEnv > 0 runs TestCrashPointRandom: that many random crash
	// points over random workloads.
	cpSeedsEnv = "BS3_CRASHPOINT_SEEDS"
	// cpSeedEnv is the first seed of the random mode (default: the time).
	cpSeedEnv = "BS3_CRASHPOINT_SEED"
	// cpReplayEnv replays one case, as printed with a violation.
	cpReplayEnv = "BS3_CRASHPOINT_REPLAY"
	// cpRepeatEnv is how many times the replay runs.
	cpRepeatEnv = "BS3_CRASHPOINT_REPEAT"
	// cpTraceEnv names a file of recorded call orders for the replay.
	cpTraceEnv = "BS3_CRASHPOINT_TRACE"
)

// Geometry: 16 blocks per chunk, 512 blocks per device.
const (
	cpDevSize   = 2 << 20
	cpChunkSize = 64 << 10
	cpBlocks    = cpDevSize / blockSize
	cpInflight  = 4
	cpHot       = 64 // blocks of the hot region most writes go to
	// cpLease is the lease interval of the configurations with a lease.
	cpLease = 10 * time.Millisecond
	// cpHang bounds how long a crashed engine may take to stop once its
	// object proxy is closed, and any attach or close of the checks.
	cpHang = 30 * time.Second
)

// cpCase names one run: the workload (seed, random or exhaustive sizes),
// the configuration, the crash point N of the scripted life and, for a
// crash during the recovery of that crash, the crash point M of the
// recovery's own script. It prints as the value of cpReplayEnv.
type cpCase struct {
	seed    uint64
	random  bool // workload sizes drawn from the seed (random mode)
	durable bool
	lease   bool
	n       int64 // 0: no crash
	applied bool
	m       int64 // 0: no second-level crash
	mApp    bool
	// call and mCall, when set, name the crash calls by operation, object
	// and rank (crashpoint.Call.Key) instead of by number: a replay then
	// crashes at the same call although the engine's goroutines
	// interleave differently.
	call, mCall string
}

func (c cpCase) String() string {
	s := fmt.Sprintf("seed=%d,random=%v,durable=%v,lease=%v,n=%d,applied=%v", c.seed, c.random, c.durable, c.lease, c.n, c.applied)
	if c.m > 0 {
		s += fmt.Sprintf(",m=%d,mapplied=%v", c.m, c.mApp)
	}
	if c.call != "" {
		s += ",call=" + c.call
	}
	if c.mCall != "" {
		s += ",mcall=" + c.mCall
	}
	return s
}

func parseCPCase(s string) (cpCase, error) {
	var c cpCase
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return c, fmt.Errorf("%q: want key=value", kv)
		}
		var err error
		switch k {
		case "seed":
			c.seed, err = strconv.ParseUint(v, 10, 64)
		case "random":
			c.random, err = strconv.ParseBool(v)
		case "durable":
			c.durable, err = strconv.ParseBool(v)
		case "lease":
			c.lease, err = strconv.ParseBool(v)
		case "n":
			c.n, err = strconv.ParseInt(v, 10, 64)
		case "applied":
			c.applied, err = strconv.ParseBool(v)
		case "m":
			c.m, err = strconv.ParseInt(v, 10, 64)
		case "mapplied":
			c.mApp, err = strconv.ParseBool(v)
		case "call":
			c.call = v
			_, err = crashpoint.ParseKey(v)
		case "mcall":
			c.mCall = v
			_, err = crashpoint.ParseKey(v)
		default:
			err = errors.New("unknown key")
		}
		if err != nil {
			return c, fmt.Errorf("%q: %w", kv, err)
		}
	}
	return c, nil
}

func (c cpCase) leaseInterval() time.Duration {
	if c.lease {
		return cpLease
	}
	return 0
}

// Script steps.
type cpStepKind uint8

const (
	cpAttach cpStepKind = iota + 1
	cpWrite
	cpZero
	cpFlush
	cpCheckpoint
	cpDeadGC
	cpThresholdGC
	cpClose
)

type cpStep struct {
	kind     cpStepKind
	block, n int64
	fua      bool // cpWrite
	discard  bool // cpZero
}

func (s cpStep) String() string {
	switch s.kind {
	case cpAttach:
		return "attach"
	case cpWrite:
		if s.fua {
			return fmt.Sprintf("FUA write %d+%d", s.block, s.n)
		}
		return fmt.Sprintf("write %d+%d", s.block, s.n)
	case cpZero:
		return fmt.Sprintf("zero %d+%d (discard %v)", s.block, s.n, s.discard)
	case cpFlush:
		return "flush"
	case cpCheckpoint:
		return "checkpoint"
	case cpDeadGC:
		return "dead GC pass"
	case cpThresholdGC:
		return "threshold GC run"
	case cpClose:
		return "clean close"
	}
	return fmt.Sprintf("step(%d)", s.kind)
}

// cpOps appends k device steps: writes of 1–6 blocks (mostly into the
// hot region, so that objects die and GC has work; one in twelve FUA),
// zeroings and flushes.
func cpOps(rng *rand.Rand, steps []cpStep, k int, hot int64) []cpStep {
	for range k {
		switch r := rng.IntN(100); {
		case r < 15:
			steps = append(steps, cpStep{kind: cpFlush})
		case r < 25:
			n := 1 + rng.Int64N(8)
			steps = append(steps, cpStep{kind: cpZero, block: hot + rng.Int64N(cpHot-n+1), n: n, discard: rng.IntN(2) == 0})
		default:
			n := 1 + rng.Int64N(6)
			block := hot + rng.Int64N(cpHot-n+1)
			if rng.IntN(5) == 0 {
				block = rng.Int64N(cpBlocks - n + 1)
			}
			steps = append(steps, cpStep{kind: cpWrite, block: block, n: n, fua: rng.IntN(12) == 0})
		}
	}
	return steps
}

// cpLife is the scripted life of the volume, first level.
func cpLife(c cpCase) []cpStep {
	rng := rand.New(rand.NewPCG(c.seed, 1))
	k := [4]int{12, 10, 4, 4}
	if c.random {
		for i := range k {
			k[i] = 2 + rng.IntN(14)
		}
	}
	hot := rng.Int64N(cpBlocks - cpHot + 1)
	s := []cpStep{{kind: cpAttach}}
	s = cpOps(rng, s, k[0], hot)
	s = append(s, cpStep{kind: cpFlush}, cpStep{kind: cpCheckpoint})
	s = cpOps(rng, s, k[1], hot)
	s = append(s, cpStep{kind: cpFlush}, cpStep{kind: cpDeadGC}, cpStep{kind: cpThresholdGC})
	s = cpOps(rng, s, k[2], hot)
	s = append(s, cpStep{kind: cpClose}, cpStep{kind: cpAttach})
	s = cpOps(rng, s, k[3], hot)
	s = append(s, cpStep{kind: cpFlush}, cpStep{kind: cpClose})
	return s
}

// cpRecoveryLife is the script of the attach after a first-level crash
// when it is crashed itself: attach, a few writes, a dead GC pass (the
// placeholders of the attach are dead objects), a clean close.
func cpRecoveryLife(c cpCase) []cpStep {
	rng := rand.New(rand.NewPCG(c.seed, 2))
	hot := rng.Int64N(cpBlocks - cpHot + 1)
	s := []cpStep{{kind: cpAttach}}
	s = cpOps(rng, s, 4, hot)
	return append(s, cpStep{kind: cpFlush}, cpStep{kind: cpDeadGC}, cpStep{kind: cpClose})
}

// cpEngine is one attach wired as main wires it for the userspace
// frontends, with small geometry and short retry delays.
type cpEngine struct {
	objs   *objproxy.Proxy
	vol    *volume.Volume
	gate   *cpGate
	dev    *chunker.Chunker
	closed bool
}

// cpOptions are the engine Options of an attach: small geometry and
// short retry delays; the chunker sees the volume through e's cpGate.
func cpOptions(e *cpEngine, st store.Store, c cpCase, durable bool, log zerolog.Logger) bs3engine.Options {
	return bs3engine.Options{
		Store: st,
		Proxy: objproxy.Options{
			Uploaders: 4, Downloaders: 4, AttemptTimeout: 5 * time.Second,
			BaseBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond,
		},
		Volume: volume.Options{
			Size: cpDevSize, BlockSize: blockSize, ChunkSize: cpChunkSize,
			ConditionalWrites:  true,
			CheckpointInterval: time.Hour, CheckpointObjects: 4,
			MaxInflight: cpInflight, MapIdleTimeout: 10 * time.Millisecond,
			LeaseInterval: c.leaseInterval(), RecoveryConcurrency: c.recoveryConcurrency(),
		},
		// MaxAge far out: chunks close on flushes and when full, not by time.
		Chunker:       &chunker.Options{Durable: durable, Buffers: cpInflight, CollisionArea: 256 << 10, MaxAge: time.Hour},
		ChunkerEngine: func(v *volume.Volume) chunker.Engine { e.gate = newCPGate(v); return e.gate },
		Logger:        log,
	}
}

// cpEngineOf fills e (whose gate cpOptions set, and whose proxy Proxied
// set: the teardown of a crash reads it) from an opened engine.
func cpEngineOf(e *cpEngine, be *bs3engine.Engine) *cpEngine {
	e.vol, e.dev = be.Volume, be.Chunker
	return e
}

// recoveryConcurrency is how many keys an attach reads or claims at
// once: 4 for the exhaustive cases (crashes then leave partly claimed
// windows), 1 or 4 drawn from the seed for random ones.
func (c cpCase) recoveryConcurrency() int {
	if c.random && mix(c.seed)%2 == 0 {
		return 1
	}
	return 4
}

// cpGate sits between the chunker and the volume and counts the chunk
// commits the chunker has scheduled (it takes a key for each, then
// commits it on a goroutine of its own) and not yet finished. Abandoning
// a crashed engine waits for them before stopping the volume, so the
// suite's teardown never runs Volume.Close concurrently with a commit
// that the chunker started just before the crash.
type cpGate struct {
	*volume.Volume
	mu   sync.Mutex
	idle *sync.Cond
	n    int
}

func newCPGate(v *volume.Volume) *cpGate {
	g := &cpGate{Volume: v}
	g.idle = sync.NewCond(&g.mu)
	return g
}

// NextKey implements chunker.Engine: a chunk commit is scheduled.
func (g *cpGate) NextKey() int64 {
	g.mu.Lock()
	g.n++
	g.mu.Unlock()
	return g.Volume.NextKey()
}

// Commit implements chunker.Engine.
func (g *cpGate) Commit(ctx context.Context, key int64, buf []byte, items int) error {
	err := g.Volume.Commit(ctx, key, buf, items)
	g.mu.Lock()
	g.n--
	g.idle.Broadcast()
	g.mu.Unlock()
	return err
}

// settle waits until every scheduled commit has returned. Call it after
// the chunker stopped taking writes.
func (g *cpGate) settle() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.n > 0 {
		g.idle.Wait()
	}
}

// cpAttachClean attaches for a check; nothing is left running on error.
func cpAttachClean(ctx context.Context, st store.Store, c cpCase, log zerolog.Logger) (*cpEngine, error) {
	e := &cpEngine{}
	o := cpOptions(e, st, c, true, log)
	o.Proxied = func(p *objproxy.Proxy) error { e.objs = p; return nil }
	be, err := bs3engine.Open(ctx, o)
	if err != nil {
		return nil, err
	}
	return cpEngineOf(e, be), nil
}

// close stops the engine cleanly (as SIGTERM does).
func (e *cpEngine) close(ctx context.Context) error {
	e.closed = true
	derr := e.dev.Close()
	if derr != nil {
		derr = fmt.Errorf("close chunker: %w", derr)
	}
	verr := e.vol.Close(ctx)
	if verr != nil {
		verr = fmt.Errorf("close volume: %w", verr)
	}
	e.objs.Close()
	return errors.Join(derr, verr)
}

// abandon stops the goroutines of an engine whose machine crashed: its
// store fails every call and its proxy is closed, so nothing it does can
// reach the bucket; its errors are the crash and are ignored.
func (e *cpEngine) abandon() {
	e.objs.Close()
	if e.dev != nil {
		_ = e.dev.Close()
		e.gate.settle()
	}
	if e.vol != nil {
		_ = e.vol.Close(context.Background())
	}
}

// cpHist builds the history of one level: the crash suite's recorder,
// plus which completed flushes promise durability. A chunker flush does
// in durable mode; a FUA write and a clean close do in both modes (a FUA
// write is recorded as a flush that starts once it is acknowledged: by
// prefix consistency, its being kept keeps everything acknowledged before
// it; a clean close drains every chunk).
type cpHist struct {
	rec     *recorder
	durable map[*flushRec]bool
}

func newCPHist() *cpHist { return &cpHist{rec: newRecorder(), durable: make(map[*flushRec]bool)} }

func (h *cpHist) issue(eng int, kind opKind, id uint64, block, n int64) *op {
	return h.rec.issue(eng, kind, id, block, n)
}

func (h *cpHist) acked(o *op, fua bool) {
	h.rec.acked(o)
	if fua {
		f := h.rec.flushStart(o.eng)
		h.durable[f] = true
		h.rec.flushDone(f)
	}
}

// flushStart records a flush (durable: it promises durability once done)
// or, with durable set, the start of a clean close.
func (h *cpHist) flushStart(eng int, durable bool) *flushRec {
	f := h.rec.flushStart(eng)
	h.durable[f] = durable
	return f
}

func (h *cpHist) flushDone(f *flushRec) { h.rec.flushDone(f) }

// rules are the crash guarantees over this history: durability of the
// completed durable flushes, and prefix consistency of every engine.
func (h *cpHist) rules() rules {
	r := rules{durable: func(f *flushRec) bool { return h.durable[f] }, prefix: make(map[int]bool)}
	for _, o := range h.rec.h.ops {
		r.prefix[o.eng] = true
	}
	return r
}

// cpReorder holds back the upload of every third chunk (never two
// consecutive keys) until the next key's upload has been stored, so that
// the engine's uploads reach the store out of key order and crash points
// land between them: a crashed writer then leaves chunks past a missing
// key. It sits between the engine's object proxy and the crash wrapper,
// where a slow request would be. Holding depends on no timer, so a crash
// point replays; the script turns it off around the steps that wait for
// every chunk (FUA writes, closes, threshold GC), where the next key may
// never come, and the crash turns it off for good.
type cpReorder struct {
	store.Store
	seed uint64

	mu     sync.Mutex
	cond   *sync.Cond
	stored map[int64]bool
	off    bool
	dead   bool // off for good
}

func newCPReorder(s store.Store, seed uint64) *cpReorder {
	r := &cpReorder{Store: s, seed: seed, stored: make(map[int64]bool)}
	r.cond = sync.NewCond(&r.mu)
	return r
}

// hold turns holding on or off; off releases every held upload.
func (r *cpReorder) hold(on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.off = !on || r.dead
	r.cond.Broadcast()
}

// kill turns holding off for good (the machine crashed).
func (r *cpReorder) kill() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dead, r.off = true, true
	r.cond.Broadcast()
}

// Put implements store.Store.
func (r *cpReorder) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	k, data := store.ParseDataName(name)
	// Chunks are held, whatever their size (a compact chunk of one block
	// is small); placeholders and claim records are not chunks.
	if !data || len(body) == 0 || volume.IsClaimRecord(body) {
		return r.Store.Put(ctx, name, body, ifAbsent)
	}
	r.mu.Lock()
	for uint64(k)%3 == r.seed%3 && !r.off && !r.stored[k+1] {
		r.cond.Wait()
	}
	r.mu.Unlock()
	err := r.Store.Put(ctx, name, body, ifAbsent)
	if err == nil {
		r.mu.Lock()
		r.stored[k] = true
		r.cond.Broadcast()
		r.mu.Unlock()
	}
	return err
}

// cpRun executes one script over one crashpoint wrapper.
type cpRun struct {
	c      cpCase
	st     *crashpoint.Store
	front  store.Store // what the engine's proxy talks to: st, or reorder over it
	reord  *cpReorder  // nil with write.durable
	hist   *cpHist
	idBase uint64
	ids    uint64
	log    zerolog.Logger

	mu      sync.Mutex
	engines []*cpEngine
	dead    bool // the crash was handled: no new proxy may start
	stepNow atomic.Int64
	// crashStep is the step running when the crash call was made.
	crashStep atomic.Int64
	attaches  atomic.Int64
	// opened[i]: attach i returned successfully before the crash.
	opened []bool
}

// newCPRun prepares a run over bucket that crashes at call at (0: never).
// Write ids are idBase | a counter, so runs of different levels never
// share one.
func newCPRun(c cpCase, bucket store.Store, at int64, applied bool, key string, order []string, idBase uint64, log zerolog.Logger) *cpRun {
	r := &cpRun{c: c, hist: newCPHist(), idBase: idBase, log: log}
	o := crashpoint.Options{At: at, Applied: applied, Trace: true, Order: order, OnCrash: func(crashpoint.Call) {
		r.crashStep.Store(r.stepNow.Load())
		if r.reord != nil {
			r.reord.kill() // held uploads now fail: the machine is gone
		}
	}}
	if key != "" {
		// Checked when the case was parsed.
		o.Match, _ = crashpoint.ParseKey(key)
	}
	r.st = crashpoint.New(bucket, o)
	r.front = r.st
	if !c.durable && len(order) == 0 {
		// Only without write.durable do several chunks of the scripts
		// upload at once. (A replayed order has its inversions already.)
		r.reord = newCPReorder(r.st, c.seed)
		r.front = r.reord
	}
	return r
}

// errStop ends a script whose machine crashed.
var errStop = errors.New("machine crashed: script stopped")

// errPanic marks a panic of the engine caught on the script's goroutine.
var errPanic = errors.New("PANIC")

func (r *cpRun) register(e *cpEngine) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.engines = append(r.engines, e)
	if r.dead {
		e.objs.Close()
		return false
	}
	return true
}

// steps runs the script until its end or the first error.
func (r *cpRun) steps(ctx context.Context, script []cpStep) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w in step %d: %v", errPanic, r.stepNow.Load(), p)
		}
	}()
	var e *cpEngine
	eng := -1
	for i, s := range script {
		r.stepNow.Store(int64(i))
		if r.st.IsCrashed() {
			return errStop
		}
		if err := r.step(ctx, s, &e, &eng); err != nil {
			return fmt.Errorf("step %d (%v): %w", i, s, err)
		}
	}
	r.stepNow.Store(int64(len(script)))
	return nil
}

func (r *cpRun) step(ctx context.Context, s cpStep, ep **cpEngine, eng *int) error {
	e := *ep
	if r.reord != nil && (s.fua || s.kind == cpClose || s.kind == cpThresholdGC) {
		// These wait for every chunk, the held one too.
		r.reord.hold(false)
		defer r.reord.hold(true)
	}
	switch s.kind {
	case cpAttach:
		e = &cpEngine{}
		o := cpOptions(e, r.front, r.c, r.c.durable, r.log)
		o.Proxied = func(p *objproxy.Proxy) error {
			e.objs = p
			if !r.register(e) {
				return errStop
			}
			r.attaches.Add(1)
			return nil
		}
		be, err := bs3engine.Open(ctx, o)
		if errors.Is(err, errStop) {
			return errStop
		}
		if err != nil {
			return fmt.Errorf("attach: %w", err)
		}
		cpEngineOf(e, be)
		*ep = e
		*eng++
		r.opened = append(r.opened, !r.st.IsCrashed())
	case cpWrite:
		r.ids++
		id := r.idBase | r.ids
		data := stamped(id, s.block, s.n)
		o := r.hist.issue(*eng, opWrite, id, s.block, s.n)
		if err := e.dev.WriteAt(ctx, data, s.block*blockSize, s.fua); err != nil {
			return err
		}
		r.hist.acked(o, s.fua)
	case cpZero:
		r.ids++
		o := r.hist.issue(*eng, opZero, r.idBase|r.ids, s.block, s.n)
		if err := e.dev.Zero(ctx, s.block*blockSize, s.n*blockSize, s.discard, false); err != nil {
			return err
		}
		r.hist.acked(o, false)
	case cpFlush:
		f := r.hist.flushStart(*eng, r.c.durable)
		if err := e.dev.Flush(ctx); err != nil {
			return err
		}
		r.hist.flushDone(f)
	case cpCheckpoint:
		return e.vol.Checkpoint(ctx)
	case cpDeadGC, cpThresholdGC:
		c := gc.New(e.vol, gc.Options{Step: 64, LiveData: 0.5, Logger: r.log})
		defer c.Stop()
		var err error
		if s.kind == cpDeadGC {
			_, err = c.CollectDead(ctx)
		} else {
			_, err = c.Threshold(ctx)
		}
		return err
	case cpClose:
		f := r.hist.flushStart(*eng, true)
		if err := e.dev.Close(); err != nil {
			return fmt.Errorf("close chunker: %w", err)
		}
		r.hist.flushDone(f)
		e.closed = true
		err := e.vol.Close(ctx)
		e.objs.Close()
		if err != nil {
			return fmt.Errorf("close volume: %w", err)
		}
	default:
		return fmt.Errorf("unknown step %v", s)
	}
	return nil
}

// cpOutcome is what became of one script run.
type cpOutcome struct {
	crashed bool
	call    crashpoint.Call // the crash call (when crashed)
	applied bool
	step    int   // the step the crash landed in (len(script): after the end)
	err     error // the script's error; nil: it ran to its end
	hung    string
	calls   int64
	// trace is the keys of the calls up to the crash call (all of them
	// without a crash), in the order they were made.
	trace    []string
	attaches int64
	// diverged: a replayed call order was given up.
	diverged bool
}

// drive runs script over r.st and, if the machine crashes, waits until
// nothing of the crashed engine can reach the bucket any more.
func (r *cpRun) drive(ctx context.Context, script []cpStep) cpOutcome {
	done := make(chan error, 1)
	go func() { done <- r.steps(ctx, script) }()
	var out cpOutcome
	select {
	case out.err = <-done:
	case <-r.st.Crashed():
		r.st.Wait()
		r.mu.Lock()
		r.dead = true
		for _, e := range r.engines {
			e.objs.Close() // calls retrying ErrCrashed end now
		}
		r.mu.Unlock()
		select {
		case out.err = <-done:
		case <-time.After(cpHang):
			out.hung = fmt.Sprintf("the crashed engine's script did not return within %v of closing its object proxy (step %d)", cpHang, r.stepNow.Load())
			return out
		}
	}
	out.crashed = r.st.IsCrashed()
	out.step = len(script)
	if out.crashed {
		out.step = int(r.crashStep.Load())
	}
	if out.crashed || out.err != nil {
		// A script that failed without a crash is a violation; its
		// engine is stopped like a crashed one, and must not change the
		// bucket any more either.
		r.st.Crash()
		if r.reord != nil {
			r.reord.kill()
		}
		r.st.Wait()
		r.mu.Lock()
		r.dead = true
		engines := r.engines
		r.mu.Unlock()
		stopped := make(chan struct{})
		go func() {
			for _, e := range engines {
				if !e.closed {
					e.abandon()
				}
			}
			close(stopped)
		}()
		select {
		case <-stopped:
		case <-time.After(cpHang):
			out.hung = fmt.Sprintf("the crashed engines did not stop within %v", cpHang)
		}
	}
	out.call, out.applied, _ = r.st.CrashPoint()
	out.calls = r.st.Count()
	out.diverged = r.st.OrderAbandoned()
	for _, c := range r.st.Trace() {
		if out.crashed && out.call.N > 0 && c.N > out.call.N {
			break
		}
		out.trace = append(out.trace, c.Key())
	}
	out.attaches = r.attaches.Load()
	return out
}

// cpCheck is the verdict on a bucket after a crash.
type cpCheck struct {
	state    map[int64]uint64 // every block, as the first attach read it
	findings []string
	attaches int
}

// cpAllBlocks lists every block of the device.
var cpAllBlocks = func() []int64 {
	b := make([]int64, cpBlocks)
	for i := range b {
		b[i] = int64(i)
	}
	return b
}()

// cpVerify attaches the bucket on a restarted machine and checks it: the
// attach must succeed, and the whole device must read as a state the
// history allows (h, base, r). Then the structure of the bucket: that
// attach is crashed in turn (no final checkpoint), and a second attach,
// which replays the same keys from the same checkpoint, must read exactly
// the same device (every key the first one applied is still there, or
// counts as a placeholder); it must then close cleanly.
func cpVerify(ctx context.Context, bucket store.Store, c cpCase, h *history, base func(int64) uint64, r rules, log zerolog.Logger) (res cpCheck) {
	defer func() {
		if p := recover(); p != nil {
			res.findings = append(res.findings, fmt.Sprintf("PANIC while checking: %v", p))
		}
	}()
	attach := func(what string) (*cpEngine, *crashpoint.Store) {
		res.attaches++
		st := crashpoint.New(bucket, crashpoint.Options{})
		e, err := cpAttachClean(ctx, st, c, log)
		if err != nil {
			res.findings = append(res.findings, fmt.Sprintf("%s failed: %v", what, err))
			return nil, nil
		}
		return e, st
	}
	read := func(e *cpEngine, what string) map[int64]uint64 {
		got, bad, err := readBlocks(ctx, e.dev, cpAllBlocks)
		if err != nil {
			res.findings = append(res.findings, fmt.Sprintf("%s: read the device: %v", what, err))
			return nil
		}
		for _, b := range slices.Sorted(maps.Keys(bad)) {
			res.findings = append(res.findings, fmt.Sprintf("%s: block %d: %v", what, b, bad[b]))
		}
		return got
	}
	e, st := attach("attach after the crash")
	if e == nil {
		return res
	}
	got := read(e, "attach after the crash")
	res.state = got
	if got != nil {
		res.findings = append(res.findings, h.check(base, got, r)...)
	}
	st.Crash()
	st.Wait()
	e.abandon()
	e2, _ := attach("re-attach after crashing the checking attach")
	if e2 == nil {
		return res
	}
	got2 := read(e2, "re-attach")
	if got != nil && got2 != nil {
		res.findings = append(res.findings, cpDiff(got, got2)...)
	}
	if err := e2.close(ctx); err != nil {
		res.findings = append(res.findings, fmt.Sprintf("clean close of the re-attach failed: %v", err))
	}
	return res
}

// cpDiff compares what two attaches of one bucket read on every block.
func cpDiff(first, second map[int64]uint64) []string {
	var out []string
	diff := 0
	for _, b := range cpAllBlocks {
		x, okx := first[b]
		y, oky := second[b]
		if x != y || okx != oky {
			if diff < 8 {
				out = append(out, fmt.Sprintf("re-attach differs: block %d reads %#x, the attach before it (crashed, no checkpoint) read %#x", b, y, x))
			}
			diff++
		}
	}
	if diff > 8 {
		out = append(out, fmt.Sprintf("re-attach differs: ... %d blocks in all", diff))
	}
	return out
}

// cpMissingKeys returns the watermark of the newest checkpoint in the
// bucket (0 without one) and the data keys from there up to (not
// including) upTo that the bucket lacks.
func cpMissingKeys(ctx context.Context, bucket store.Store, upTo int64) (int64, []int64, error) {
	present := make(map[int64]bool)
	var wm int64
	err := bucket.List(ctx, "", func(name string, _ int64) error {
		if k, ok := store.ParseDataName(name); ok {
			present[k] = true
			return nil
		}
		if h, ok := strings.CutPrefix(name, store.CheckpointPrefix); ok {
			w, err := strconv.ParseUint(h, 16, 64)
			if err != nil {
				return fmt.Errorf("checkpoint name %q: %w", name, err)
			}
			wm = max(wm, int64(w))
		}
		return nil
	})
	if err != nil {
		return 0, nil, err
	}
	var missing []int64
	for k := wm; k < upTo; k++ {
		if !present[k] {
			missing = append(missing, k)
		}
	}
	return wm, missing, nil
}

// cpGapShape describes the data keys past the newest checkpoint: the
// first missing key, how many keys exist beyond it, and how many of those
// hold chunks (not placeholders or other short objects): uploads of a
// crashed writer that landed before an earlier key's, the shape that
// tests an attach hardest.
func cpGapShape(ctx context.Context, bucket store.Store) (gap int64, past, pastChunks int, err error) {
	wm, _, err := cpMissingKeys(ctx, bucket, 0)
	if err != nil {
		return 0, 0, 0, err
	}
	size := make(map[int64]int64)
	err = bucket.List(ctx, "", func(name string, n int64) error {
		if k, ok := store.ParseDataName(name); ok {
			size[k] = n
		}
		return nil
	})
	if err != nil {
		return 0, 0, 0, err
	}
	gap = wm
	for {
		if _, ok := size[gap]; !ok {
			break
		}
		gap++
	}
	md := (cpChunkSize / blockSize) * 32 // the chunk's metadata area
	for k, n := range size {
		if k > gap {
			past++
			if n > int64(md) {
				pastChunks++
			}
		}
	}
	return gap, past, pastChunks, nil
}

// cpClone copies every object of src into a new in-memory bucket.
func cpClone(ctx context.Context, src store.Store) (*mem.Store, error) {
	dst := mem.New()
	type obj struct {
		name string
		size int64
	}
	var objs []obj
	if err := src.List(ctx, "", func(name string, size int64) error {
		objs = append(objs, obj{name, size})
		return nil
	}); err != nil {
		return nil, fmt.Errorf("list: %w", err)
	}
	for _, o := range objs {
		buf := make([]byte, o.size)
		n, err := src.GetRange(ctx, o.name, 0, buf)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", o.name, err)
		}
		if err := dst.Put(ctx, o.name, buf[:n], false); err != nil {
			return nil, fmt.Errorf("copy %s: %w", o.name, err)
		}
	}
	return dst, nil
}

// cpStats are the counts a suite reports.
type cpStats struct {
	runs, crashes, appliedCrashes, inAttach, noCrash int
	level2Ns, level2Runs                             int
	gapShapes, chunkGapShapes                        int
	attaches                                         int64
	violations                                       int
	byOp                                             map[crashpoint.Op]int
	// byStep counts the crashes per step of the scripts they landed in.
	byStep map[string]int
	// diverged counts replays whose recorded call order was given up.
	diverged int
	// Second level: the crashed recovery had attached, or not; and how
	// often the next recovery, after an interrupted one, read another
	// state than the first level's recovery (allowed, but notable).
	l2Attached, l2Interrupted, l2Divergent int
}

// add sums o into s.
func (s *cpStats) add(o *cpStats) {
	s.runs += o.runs
	s.crashes += o.crashes
	s.appliedCrashes += o.appliedCrashes
	s.inAttach += o.inAttach
	s.noCrash += o.noCrash
	s.level2Ns += o.level2Ns
	s.level2Runs += o.level2Runs
	s.gapShapes += o.gapShapes
	s.chunkGapShapes += o.chunkGapShapes
	s.attaches += o.attaches
	s.violations += o.violations
	s.l2Attached += o.l2Attached
	s.l2Interrupted += o.l2Interrupted
	s.l2Divergent += o.l2Divergent
	s.diverged += o.diverged
	if s.byOp == nil {
		s.byOp = make(map[crashpoint.Op]int)
		s.byStep = make(map[string]int)
	}
	for k, v := range o.byOp {
		s.byOp[k] += v
	}
	for k, v := range o.byStep {
		s.byStep[k] += v
	}
}

func (s *cpStats) String() string {
	ops := make([]string, 0, len(s.byOp))
	for _, o := range []crashpoint.Op{crashpoint.OpPut, crashpoint.OpDelete, crashpoint.OpGet, crashpoint.OpSize, crashpoint.OpList} {
		if s.byOp[o] > 0 {
			ops = append(ops, fmt.Sprintf("%v %d", o, s.byOp[o]))
		}
	}
	steps := make([]string, 0, len(s.byStep))
	for _, k := range slices.Sorted(maps.Keys(s.byStep)) {
		steps = append(steps, fmt.Sprintf("%s %d", k, s.byStep[k]))
	}
	return fmt.Sprintf("%d runs: %d crashed (%d with the crash call applied, reply lost; %d inside an attach; on %s; in %s), %d ran to the end; %d first-level crash points left keys past a gap (%d of them chunks); %d crash points also crashed during their recovery (%d runs: %d after its attach returned, %d inside it, %d of those recovering another state than the first recovery); %d attaches; %d runs with violations",
		s.runs, s.crashes, s.appliedCrashes, s.inAttach, strings.Join(ops, ", "), strings.Join(steps, ", "), s.noCrash, s.gapShapes, s.chunkGapShapes,
		s.level2Ns, s.level2Runs, s.l2Attached, s.l2Interrupted, s.l2Divergent, s.attaches, s.violations)
}

// cpSuite runs cases and collects violations.
type cpSuite struct {
	t     *testing.T
	ctx   context.Context
	stats cpStats
	// cats groups the violations by what was violated.
	cats map[string]*cpCategory

	// Hooks for the suite's own tests, which inject faults to show that
	// violations are found. wrap wraps the bucket under the crash wrapper
	// of every first-level run; tamper changes the bucket after a
	// first-level run, before its recovery; quiet records violations
	// without failing the test.
	wrap   func(store.Store) store.Store
	tamper func(*mem.Store)
	quiet  bool

	// order replays recorded call orders (cpTraceEnv): first level, and
	// second level.
	order [2][]string
}

type cpCategory struct {
	runs     int
	examples []string
}

func newCPSuite(t *testing.T) *cpSuite {
	return &cpSuite{t: t, ctx: context.Background(), stats: cpStats{byOp: make(map[crashpoint.Op]int), byStep: make(map[string]int)}, cats: make(map[string]*cpCategory)}
}

// cpExamples is how many violations of each category are printed in full.
const cpExamples = 4

// cpClassify names what a finding says was violated.
func cpClassify(f string) string {
	for _, c := range []struct{ sub, cat string }{
		{"PANIC", "panic"},
		{"did not return", "hang"},
		{"did not stop", "hang"},
		{"failed without a crash", "engine failed without a crash"},
		{"attach after the crash failed", "attach after a crash refused"},
		{"re-attach after crashing the checking attach failed", "second attach refused"},
		{"made durable", "durable write lost (completed durable flush, FUA or clean close)"},
		{"not a prefix", "not a prefix of the acknowledged writes"},
		{"never issued", "stale or foreign data"},
		{"must not be visible", "stale or foreign data"},
		{"reads zeros", "zeros where data must be"},
		{"issued to blocks", "misplaced data"},
		{"misplaced", "misplaced data"},
		{"torn", "torn or corrupt block"},
		{"re-attach differs", "re-attach reads a different device (roll-forward not repeatable)"},
		{"read the device", "device read failed"},
		{"clean close", "clean close failed"},
	} {
		if strings.Contains(f, c.sub) {
			return c.cat
		}
	}
	return "other"
}

// violation records a failed run; report prints them.
func (s *cpSuite) violation(c cpCase, where string, findings []string, logs *logBuffer, traces ...[]string) {
	s.t.Helper()
	if !s.quiet {
		s.t.Fail()
	}
	s.stats.violations++
	seen := make(map[string]bool)
	for _, f := range findings {
		cat := cpClassify(f)
		if seen[cat] {
			continue
		}
		seen[cat] = true
		k := s.cats[cat]
		if k == nil {
			k = &cpCategory{}
			s.cats[cat] = k
		}
		k.runs++
		if len(k.examples) < cpExamples {
			trace := ""
			if path, err := cpWriteTrace(c, traces); err != nil {
				trace = fmt.Sprintf(" (call order not saved: %v)", err)
			} else if path != "" {
				trace = fmt.Sprintf(" %s=%s", cpTraceEnv, path)
			}
			k.examples = append(k.examples, fmt.Sprintf("[%s] %s (%d findings):%s\n    replay: %s=%q%s go test -race -count=1 -run '^TestCrashPointReplay$' ./internal/crashtest/\n    log tail:\n%s",
				c, where, len(findings), summarize(findings), cpReplayEnv, c.String(), trace, indent(tail(logs.String(), 8))))
		}
	}
}

// catNames lists the categories of the violations found so far.
func (s *cpSuite) catNames() []string { return slices.Sorted(maps.Keys(s.cats)) }

// cpWriteTrace saves the call orders of a violating case for its replay
// (cpTraceEnv) under the temporary directory, and returns the file.
func cpWriteTrace(c cpCase, traces [][]string) (string, error) {
	if len(traces) == 0 {
		return "", nil
	}
	dir := filepath.Join(os.TempDir(), "bs3-crashpoint")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	var b strings.Builder
	for level, tr := range traces {
		for _, k := range tr {
			fmt.Fprintf(&b, "%d %s\n", level+1, k)
		}
	}
	path := filepath.Join(dir, fmt.Sprintf("%016x.trace", cpHash(c.String())))
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return "", err
	}
	return path, nil
}

// cpReadTrace loads the call orders saved by cpWriteTrace.
func cpReadTrace(path string) ([2][]string, error) {
	var order [2][]string
	raw, err := os.ReadFile(path)
	if err != nil {
		return order, err
	}
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		level, key, ok := strings.Cut(line, " ")
		if !ok || (level != "1" && level != "2") {
			return order, fmt.Errorf("%s: bad line %q", path, line)
		}
		order[level[0]-'1'] = append(order[level[0]-'1'], key)
	}
	return order, nil
}

func cpHash(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := range len(s) {
		h = (h ^ uint64(s[i])) * 1099511628211
	}
	return h
}

// report fails the test once per category of violation, with examples.
func (s *cpSuite) report() {
	s.t.Helper()
	for _, cat := range slices.Sorted(maps.Keys(s.cats)) {
		k := s.cats[cat]
		s.t.Errorf("VIOLATION %q in %d runs; first %d:\n%s", cat, k.runs, len(k.examples), strings.Join(k.examples, "\n"))
	}
}

func indent(s string) string { return "      " + strings.ReplaceAll(s, "\n", "\n      ") }

// cleanCount runs script without a crash over a copy of bucket (nil: an
// empty one) and returns how many store calls it made.
func (s *cpSuite) cleanCount(c cpCase, bucket store.Store, script []cpStep) (int64, error) {
	b := store.Store(mem.New())
	if bucket != nil {
		var err error
		if b, err = cpClone(s.ctx, bucket); err != nil {
			return 0, err
		}
	}
	r := newCPRun(c, b, 0, false, "", nil, 3<<40, zerolog.Nop())
	out := r.drive(s.ctx, script)
	s.stats.attaches += out.attaches
	if out.err != nil {
		return 0, fmt.Errorf("clean run of the script: %w", out.err)
	}
	return out.calls, nil
}

// level1 runs the life of the volume with a crash at c.n and checks the
// recovery. It returns the bucket as the crash left it (for second-level
// crashes), what the recovery read, the outcome and the history.
type cpLevel1 struct {
	c        cpCase // the case, with the crash call's key
	snapshot *mem.Store
	state    map[int64]uint64
	out      cpOutcome
	hist     *cpHist
	gapPast  int // keys past the first gap
	gapChunk int // chunks among them
	ok       bool
}

func (s *cpSuite) level1(c cpCase, keepSnapshot bool) cpLevel1 {
	s.t.Helper()
	var logs logBuffer
	log := zerolog.New(&logs).Level(zerolog.InfoLevel)
	bucket := mem.New()
	script := cpLife(c)
	under := store.Store(bucket)
	if s.wrap != nil {
		under = s.wrap(bucket)
	}
	r := newCPRun(c, under, c.n, c.applied, c.call, s.order[0], 1<<40, log)
	out := r.drive(s.ctx, script)
	s.count(out, script, 1)
	if out.crashed && c.call == "" {
		c.call = out.call.Key()
	}
	res := cpLevel1{c: c, out: out, hist: r.hist}
	where := cpWhere(out, script)
	if out.hung != "" {
		s.violation(c, where, []string{out.hung}, &logs, out.trace)
		return res
	}
	if !out.crashed && out.err != nil {
		s.violation(c, where, []string{fmt.Sprintf("the script failed without a crash: %v", out.err)}, &logs, out.trace)
		return res
	}
	if errors.Is(out.err, errPanic) {
		s.violation(c, where, []string{out.err.Error()}, &logs, out.trace)
		return res
	}
	var err error
	if _, res.gapPast, res.gapChunk, err = cpGapShape(s.ctx, bucket); err != nil {
		s.t.Fatal(err)
	}
	if res.gapPast > 0 {
		s.stats.gapShapes++
	}
	if res.gapChunk > 0 {
		s.stats.chunkGapShapes++
	}
	if s.tamper != nil {
		s.tamper(bucket)
	}
	if keepSnapshot {
		if res.snapshot, err = cpClone(s.ctx, bucket); err != nil {
			s.t.Fatal(err)
		}
	}
	logs.reset()
	h := r.hist.rec.history()
	chk := cpVerify(s.ctx, bucket, c, h, func(int64) uint64 { return 0 }, r.hist.rules(), log)
	s.stats.attaches += int64(chk.attaches)
	if len(chk.findings) > 0 {
		s.violation(c, where+fmt.Sprintf("; the crash left %d keys past the first gap (%d chunks)", res.gapPast, res.gapChunk), chk.findings, &logs, out.trace)
		return res
	}
	res.state, res.ok = chk.state, true
	return res
}

// level2 crashes the recovery of a first-level crash (whose bucket is
// l1.snapshot) at c.m and checks the next recovery: if the crashed
// recovery's attach had returned, the device must be what it recovered
// (l1.state) plus an allowed outcome of its own writes; otherwise an
// allowed outcome of the first level's history.
func (s *cpSuite) level2(c cpCase, l1 cpLevel1) cpOutcome {
	s.t.Helper()
	var logs logBuffer
	log := zerolog.New(&logs).Level(zerolog.InfoLevel)
	bucket, err := cpClone(s.ctx, l1.snapshot)
	if err != nil {
		s.t.Fatal(err)
	}
	script := cpRecoveryLife(c)
	r := newCPRun(c, bucket, c.m, c.mApp, c.mCall, s.order[1], 2<<40, log)
	out := r.drive(s.ctx, script)
	s.count(out, script, 2)
	c.call = l1.c.call
	if out.crashed && c.mCall == "" {
		c.mCall = out.call.Key()
	}
	s.stats.level2Runs++
	where := "recovery crashed at " + cpWhere(out, script)
	if out.hung != "" {
		s.violation(c, where, []string{out.hung}, &logs, l1.out.trace, out.trace)
		return out
	}
	if out.err != nil && (!out.crashed || errors.Is(out.err, errPanic)) {
		s.violation(c, where, []string{fmt.Sprintf("the recovery's script failed without a crash: %v", out.err)}, &logs, l1.out.trace, out.trace)
		return out
	}
	logs.reset()
	var chk cpCheck
	if len(r.opened) > 0 && r.opened[0] {
		// The crashed recovery attached: it exposed l1.state.
		s.stats.l2Attached++
		state := l1.state
		chk = cpVerify(s.ctx, bucket, c, r.hist.rec.history(), func(b int64) uint64 { return state[b] }, r.hist.rules(), log)
		where += " (its attach had completed)"
	} else {
		s.stats.l2Interrupted++
		chk = cpVerify(s.ctx, bucket, c, l1.hist.rec.history(), func(int64) uint64 { return 0 }, l1.hist.rules(), log)
		where += " (inside its attach)"
		if chk.state != nil && len(cpDiff(l1.state, chk.state)) > 0 {
			s.stats.l2Divergent++
		}
	}
	s.stats.attaches += int64(chk.attaches)
	if len(chk.findings) > 0 {
		s.violation(c, where, chk.findings, &logs, l1.out.trace, out.trace)
	}
	return out
}

func (s *cpSuite) count(out cpOutcome, script []cpStep, level int) {
	s.stats.runs++
	if out.diverged {
		s.stats.diverged++
	}
	s.stats.attaches += out.attaches
	if !out.crashed {
		s.stats.noCrash++
		return
	}
	s.stats.crashes++
	if out.applied {
		s.stats.appliedCrashes++
	}
	if out.step < len(script) && script[out.step].kind == cpAttach {
		s.stats.inAttach++
	}
	s.stats.byOp[out.call.Op]++
	s.stats.byStep[cpStepName(script, out.step, level)]++
}

// cpStepName names a step for the statistics: its kind, attaches by
// their order in the life, and the recovery script's steps as such.
func cpStepName(script []cpStep, i, level int) string {
	if i >= len(script) {
		return "after the script"
	}
	name := ""
	switch k := script[i].kind; k {
	case cpWrite, cpZero:
		name = "write/zero"
	case cpAttach:
		n := 0
		for _, st := range script[:i+1] {
			if st.kind == cpAttach {
				n++
			}
		}
		name = fmt.Sprintf("attach %d", n)
	default:
		name = cpStep{kind: k}.String()
	}
	if level == 2 {
		return "recovery " + name
	}
	return name
}

// cpWhere says where a crash landed.
func cpWhere(out cpOutcome, script []cpStep) string {
	if !out.crashed {
		return fmt.Sprintf("no crash (%d calls)", out.calls)
	}
	step := "after the script"
	if out.step < len(script) {
		step = fmt.Sprintf("step %d (%v)", out.step, script[out.step])
	}
	mode := "not applied"
	if out.applied {
		mode = "applied, reply lost"
	}
	return fmt.Sprintf("crash at %v [%s] in %s", out.call, mode, step)
}

// exhaustive runs every crash point of the life of c's workload, in both
// modes for bucket-changing calls, and crashes the recovery of a sample
// of them at every point of its own script.
func (s *cpSuite) exhaustive(c cpCase) {
	s.t.Helper()
	total, err := s.cleanCount(c, nil, cpLife(c))
	if err != nil {
		s.t.Fatalf("[%s] %v", c, err)
	}
	// Second-level sample: the first crash points that leave chunks
	// past a gap, and every stride-th one.
	const gapSample, stride = 2, 75
	gapped := 0
	for n := int64(1); n <= total+1; n++ {
		modes := []bool{false}
		for i := 0; i < len(modes); i++ {
			cn := c
			cn.n, cn.applied = n, modes[i]
			sample := n%stride == 0 && !cn.applied
			l1 := s.level1(cn, sample || gapped < gapSample)
			if !cn.applied && l1.out.crashed && l1.out.call.Op.Mutating() {
				// Only a call that changes the bucket differs when its
				// effect lands.
				modes = append(modes, true)
			}
			shaped := gapped < gapSample && l1.gapChunk > 0
			if !l1.ok || l1.snapshot == nil || !(sample || shaped) {
				continue
			}
			if shaped {
				gapped++
			}
			s.level2All(cn, l1)
		}
	}
	s.t.Logf("[seed=%d durable=%v lease=%v] clean life: %d store calls; crash points 1..%d, each in both modes where the call changes the bucket", c.seed, c.durable, c.lease, total, total+1)
}

// level2All crashes the recovery of l1's crash at every store call of the
// recovery script, in both modes for bucket-changing calls.
func (s *cpSuite) level2All(c cpCase, l1 cpLevel1) {
	s.t.Helper()
	s.stats.level2Ns++
	total, err := s.cleanCount(c, l1.snapshot, cpRecoveryLife(c))
	if err != nil {
		s.violation(c, "clean run of the recovery script", []string{err.Error()}, &logBuffer{})
		return
	}
	for m := int64(1); m <= total+1; m++ {
		modes := []bool{false}
		for i := 0; i < len(modes); i++ {
			cm := c
			cm.m, cm.mApp = m, modes[i]
			out := s.level2(cm, l1)
			if !cm.mApp && out.crashed && out.call.Op.Mutating() {
				modes = append(modes, true)
			}
		}
	}
}

// TestCrashPointExhaustive crashes the scripted life of a volume at every
// store call, on both durability modes with and without a lease (one
// parallel subtest each), and checks every recovery (see the top of this
// file). It fails on any violation with the case to replay.
func TestCrashPointExhaustive(t *testing.T) {
	if testing.Short() {
		t.Skip("exhaustive crash points take a few minutes")
	}
	start := time.Now()
	configs := []cpCase{
		{seed: 1, durable: true},
		{seed: 2, durable: false},
		{seed: 3, durable: true, lease: true},
		{seed: 4, durable: false, lease: true},
	}
	suites := make([]*cpSuite, len(configs))
	t.Run("configs", func(t *testing.T) {
		for i, c := range configs {
			t.Run(fmt.Sprintf("durable=%v,lease=%v", c.durable, c.lease), func(t *testing.T) {
				t.Parallel()
				s := newCPSuite(t)
				suites[i] = s
				s.exhaustive(c)
				t.Logf("%v", &s.stats)
				s.report()
			})
		}
	})
	var total cpStats
	for _, s := range suites {
		if s != nil {
			total.add(&s.stats)
		}
	}
	t.Logf("exhaustive, all configurations: %v in %v", &total, time.Since(start).Round(time.Millisecond))
}

// TestCrashPointRandom runs BS3_CRASHPOINT_SEEDS random crash points over
// random workloads (random script lengths, modes, lease, crash call and
// whether it lands; one in four also crashes the recovery at a random
// call). Seeds start at BS3_CRASHPOINT_SEED (default: the time).
func TestCrashPointRandom(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv(cpSeedsEnv))
	if n <= 0 {
		t.Skipf("set %s=1000 to run 1,000 random crash points", cpSeedsEnv)
	}
	first := uint64(time.Now().UnixNano())
	if v := os.Getenv(cpSeedEnv); v != "" {
		var err error
		if first, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("%s=%q: %v", cpSeedEnv, v, err)
		}
	}
	t.Logf("seeds %d..%d (%s=%d replays them)", first, first+uint64(n)-1, cpSeedEnv, first)
	start := time.Now()
	s := newCPSuite(t)
	for i := range uint64(n) {
		seed := first + i
		rng := rand.New(rand.NewPCG(seed, 99))
		c := cpCase{seed: seed, random: true, durable: rng.IntN(2) == 0, lease: rng.IntN(3) == 0}
		total, err := s.cleanCount(c, nil, cpLife(c))
		if err != nil {
			s.violation(c, "clean run", []string{err.Error()}, &logBuffer{})
			continue
		}
		c.n, c.applied = 1+rng.Int64N(total), rng.IntN(2) == 0
		level2 := rng.IntN(4) == 0
		l1 := s.level1(c, level2)
		if !level2 || !l1.ok {
			continue
		}
		m2, err := s.cleanCount(c, l1.snapshot, cpRecoveryLife(c))
		if err != nil {
			s.violation(c, "clean run of the recovery script", []string{err.Error()}, &logBuffer{})
			continue
		}
		s.stats.level2Ns++
		c.m, c.mApp = 1+rng.Int64N(m2), rng.IntN(2) == 0
		s.level2(c, l1)
	}
	t.Logf("random: %d seeds; %v in %v", n, &s.stats, time.Since(start).Round(time.Millisecond))
	s.report()
}

// TestCrashPointReplay replays the one case in BS3_CRASHPOINT_REPLAY, as a
// violation prints it, BS3_CRASHPOINT_REPEAT times (default 10; the
// engine's goroutines interleave differently each time, so a violation
// may need a few tries). It fails if any try violates.
func TestCrashPointReplay(t *testing.T) {
	v := os.Getenv(cpReplayEnv)
	if v == "" {
		t.Skipf("set %s to a case printed by a violation", cpReplayEnv)
	}
	c, err := parseCPCase(v)
	if err != nil {
		t.Fatalf("%s: %v", cpReplayEnv, err)
	}
	repeat := 10
	if r := os.Getenv(cpRepeatEnv); r != "" {
		if repeat, err = strconv.Atoi(r); err != nil || repeat < 1 {
			t.Fatalf("%s=%q: want a positive count", cpRepeatEnv, r)
		}
	}
	s := newCPSuite(t)
	if p := os.Getenv(cpTraceEnv); p != "" {
		if s.order, err = cpReadTrace(p); err != nil {
			t.Fatalf("%s: %v", cpTraceEnv, err)
		}
	}
	for range repeat {
		l1 := s.level1(c, c.m > 0)
		if c.m > 0 && l1.ok {
			s.level2(c, l1)
		}
	}
	t.Logf("%d replays of %s: %v; %d runs gave the recorded call order up", repeat, c, &s.stats, s.stats.diverged)
	s.report()
}
