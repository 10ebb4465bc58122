package crashtest

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// The crash suite: the test binary re-executes itself as a writer process
// (TestCrashChild), kills it with SIGKILL after a random time, recovers the
// volume in-process and checks every block against the journal the child
// kept of what it issued, had acknowledged and flushed.

// childEnv carries the child's configuration (JSON); TestCrashChild does
// nothing without it.
const childEnv = "BS3_CRASHTEST_CHILD"

// seedEnv fixes the random seed of the crash suite, to replay a failure's
// workload (the timing of the kill cannot be replayed).
const seedEnv = "BS3_CRASHTEST_SEED"

const (
	crashCycles  = 30
	crashDevSize = 64 << 20
	hotBlocks    = 512 // 2 MiB hot regions
)

type childConfig struct {
	Endpoint, Region, Bucket, AccessKey, SecretKey string

	Durable bool
	Seed    uint64
	Cycle   uint64 // write ids are Cycle<<32 | n, unique across cycles
	Journal string
	Size    int64
	Hot     []int64 // first blocks of the hot regions
}

// Journal records: 32 bytes each, appended with one write(2) and fsync'ed
// before the call they announce is made (issue, flush start) or before the
// next call after the one they report (ack, flush done). A record is never
// written for an event that did not happen; an event may lack its record if
// the kill landed between it and the write, which only weakens the checks.
const (
	recSize        = 32
	recOpened      = 1 // the engine accepts I/O
	recWriteIssue  = 2 // id, block, n
	recWriteAck    = 3 // id
	recZeroIssue   = 4 // id, block, n
	recZeroAck     = 5 // id
	recFlushStart  = 6 // flush id
	recFlushDone   = 7 // flush id
	childExitFatal = 3
)

type journal struct {
	mu  sync.Mutex
	f   *os.File
	buf [recSize]byte
}

func (j *journal) rec(typ byte, id uint64, a, b int64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	clear(j.buf[:])
	j.buf[0] = typ
	binary.LittleEndian.PutUint64(j.buf[8:], id)
	binary.LittleEndian.PutUint64(j.buf[16:], uint64(a))
	binary.LittleEndian.PutUint64(j.buf[24:], uint64(b))
	if _, err := j.f.Write(j.buf[:]); err != nil {
		childFatal("append to journal: %v", err)
	}
	if err := j.f.Sync(); err != nil {
		childFatal("fsync journal: %v", err)
	}
}

// childFatal ends the child with a status the parent reports as a failure
// (the parent expects the child to die by SIGKILL only).
func childFatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "CHILD FATAL: "+format+"\n", args...)
	os.Exit(childExitFatal)
}

// parseJournal turns a journal into a history (one engine, 0); positions
// are record numbers. A torn last record is ignored. opened reports whether
// the child's engine had accepted I/O.
func parseJournal(raw []byte) (h *history, opened bool, err error) {
	h = newHistory()
	flushes := make(map[uint64]*flushRec)
	for i := 0; i+recSize <= len(raw); i += recSize {
		r := raw[i : i+recSize]
		p := int64(i / recSize)
		id := binary.LittleEndian.Uint64(r[8:])
		a := int64(binary.LittleEndian.Uint64(r[16:]))
		b := int64(binary.LittleEndian.Uint64(r[24:]))
		switch r[0] {
		case recOpened:
			opened = true
		case recWriteIssue, recZeroIssue:
			k := opWrite
			if r[0] == recZeroIssue {
				k = opZero
			}
			h.add(&op{id: id, kind: k, block: a, n: b, issue: p, ack: never})
		case recWriteAck, recZeroAck:
			o := h.byID[id]
			if o == nil {
				return nil, false, fmt.Errorf("journal record %d acknowledges op %#x, never issued", p, id)
			}
			o.ack = p
		case recFlushStart:
			f := &flushRec{start: p, done: never}
			flushes[id] = f
			h.flushes = append(h.flushes, f)
		case recFlushDone:
			f := flushes[id]
			if f == nil {
				return nil, false, fmt.Errorf("journal record %d completes flush %d, never started", p, id)
			}
			f.done = p
		default:
			return nil, false, fmt.Errorf("journal record %d has unknown type %d", p, r[0])
		}
	}
	return h, opened, nil
}

// TestCrashChild is the writer process of TestCrashRecovery; it runs only
// when re-executed by it (childEnv set) and never returns: the parent
// kills it.
func TestCrashChild(t *testing.T) {
	raw := os.Getenv(childEnv)
	if raw == "" {
		t.Skip("helper process of TestCrashRecovery; runs only when re-executed by it")
	}
	var c childConfig
	if err := json.Unmarshal([]byte(raw), &c); err != nil {
		childFatal("decode %s: %v", childEnv, err)
	}
	jf, err := os.OpenFile(c.Journal, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		childFatal("open journal: %v", err)
	}
	j := &journal{f: jf}
	ctx := context.Background()
	log := zerolog.New(os.Stderr).With().Timestamp().Logger().Level(zerolog.InfoLevel)
	st, err := s3.New(ctx, s3.Options{
		Endpoint: c.Endpoint, Region: c.Region, Bucket: c.Bucket,
		AccessKey: c.AccessKey, SecretKey: c.SecretKey, MaxConns: 32, Logger: log,
	})
	if err != nil {
		childFatal("open s3 store: %v", err)
	}
	// Some uploads are held back, so that chunks reach MinIO out of key
	// order and kills often leave keys past a gap (docs/ARCHITECTURE.md §4.3), and some
	// checkpoint uploads too, so that kills land while one is in flight.
	fst := faulty.New(st)
	var mu sync.Mutex
	drng := rand.New(rand.NewPCG(c.Seed, 7))
	chance := func(pct int) bool {
		mu.Lock()
		defer mu.Unlock()
		return drng.IntN(100) < pct
	}
	fst.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Delay: 250 * time.Millisecond, Match: func(name string) bool {
		_, data := store.ParseDataName(name)
		return (data && chance(10)) || (strings.HasPrefix(name, store.CheckpointPrefix) && chance(50))
	}})
	fst.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Delay: 60 * time.Millisecond, Match: func(name string) bool {
		_, data := store.ParseDataName(name)
		return data && chance(20)
	}})
	e, err := openEngine(ctx, fst, engineOpts{size: c.Size, durable: c.Durable, log: log})
	if err != nil {
		childFatal("open engine: %v", err)
	}
	j.rec(recOpened, 0, 0, 0)

	var ids, flushIDs atomic.Uint64
	nextID := func() uint64 { return c.Cycle<<32 | ids.Add(1) }
	blocks := c.Size / blockSize
	flush := func() {
		fid := flushIDs.Add(1)
		j.rec(recFlushStart, fid, 0, 0)
		if err := e.dev.Flush(ctx); err != nil {
			childFatal("flush: %v", err)
		}
		j.rec(recFlushDone, fid, 0, 0)
	}
	// where picks n blocks: mostly inside a hot region, so writes overlap
	// heavily, otherwise anywhere on the device.
	where := func(rng *rand.Rand, n int64) int64 {
		if rng.IntN(10) < 6 {
			h := c.Hot[rng.IntN(len(c.Hot))]
			return h + rng.Int64N(hotBlocks-n+1)
		}
		return rng.Int64N(blocks - n + 1)
	}
	for g := range 3 {
		go func() {
			rng := rand.New(rand.NewPCG(c.Seed, uint64(g)))
			for {
				switch r := rng.IntN(100); {
				case r < 4:
					flush()
				case r < 11:
					n := 1 + rng.Int64N(128)
					block := where(rng, min(n, hotBlocks))
					n = min(n, blocks-block)
					id := nextID()
					j.rec(recZeroIssue, id, block, n)
					if err := e.dev.Zero(ctx, block*blockSize, n*blockSize, rng.IntN(2) == 0, false); err != nil {
						childFatal("zero blocks %d+%d: %v", block, n, err)
					}
					j.rec(recZeroAck, id, 0, 0)
				default:
					var n int64
					switch s := rng.IntN(10); {
					case s < 5:
						n = 1 + rng.Int64N(4)
					case s < 8:
						n = 5 + rng.Int64N(12)
					default:
						n = 17 + rng.Int64N(48)
					}
					block := where(rng, n)
					id := nextID()
					data := stamped(id, block, n)
					j.rec(recWriteIssue, id, block, n)
					if err := e.dev.WriteAt(ctx, data, block*blockSize, false); err != nil {
						childFatal("write blocks %d+%d: %v", block, n, err)
					}
					j.rec(recWriteAck, id, 0, 0)
				}
			}
		}()
	}
	go func() {
		rng := rand.New(rand.NewPCG(c.Seed, 99))
		for {
			time.Sleep(time.Duration(5+rng.IntN(55)) * time.Millisecond)
			flush()
		}
	}()
	// The parent kills us within seconds; a minute means it is gone.
	time.Sleep(time.Minute)
	childFatal("not killed within a minute")
}

// TestCrashRecovery runs crashCycles kill/recover cycles on one volume per
// durability mode. In each cycle a child process writes (3 goroutines of
// overlapping 4–256 KiB writes and discards, flushes from those and a
// fourth goroutine) and is SIGKILLed 0.3–3 s after its engine opened (in
// one cycle of six, at a random moment of its start-up instead, so that
// kills also land in attach and recovery). The child's store (real MinIO
// behind a faulty wrapper) holds back some data uploads by 60 or 250 ms
// and half of the checkpoint uploads by 250 ms, so that chunks reach the
// bucket out of key order and kills often leave keys past a gap, or land
// while a checkpoint is uploading. The parent then attaches the volume and
// reads every block the child touched plus 512 random others. It asserts:
//
//   - every block holds either zeros or an intact stamp of a write issued
//     to that very block in this cycle, or exactly what it held before the
//     cycle (no stale, misplaced, torn or foreign data; zeros only where
//     a zeroing was issued or the block held zeros before);
//   - durable mode: no op acknowledged before the start of the last
//     completed flush is lost: the block's content is not older than it
//     (older: acknowledged before that op was issued);
//   - both modes, prefix consistency: if any write issued at position p is
//     visible, no op acknowledged before p is lost in that sense. (This
//     includes the flush form of the property: a visible write issued
//     after flush F completed implies every op acknowledged before F
//     started is kept.)
//
// After checking, the parent writes and discards stamped data over a
// sample of blocks with its own engine (a newer generation, whose
// per-area seqnos restart at 1 while the child's ran high), flushes
// durably, reads it back (the new data must win everywhere), and closes
// cleanly; the next cycle expects exactly that state wherever its child did
// not write. After the last cycle, a fresh attach must read the expected
// state on every block.
func TestCrashRecovery(t *testing.T) {
	srv := minio.Start(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(seedEnv); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", seedEnv, s, err)
		}
		seed = v
	}
	t.Logf("seed %d (set %s to replay the workload)", seed, seedEnv)
	for _, durable := range []bool{true, false} {
		t.Run(fmt.Sprintf("durable=%v", durable), func(t *testing.T) {
			t.Parallel()
			runCrashCycles(t, srv, seed, durable)
		})
	}
}

// TestCrashHarnessDetectsLoss makes sure the crash suite's machinery (the
// child, its journal, the read-back and the checker) notices lost data: a
// durable child is killed after running 1.5 s, one of its data objects
// from early in the run is deleted before recovery, so recovery stops at
// that gap and drops everything after it, and the check must report
// flushed writes as lost. (The checkpoints are deleted too, so that
// recovery replays from key 0.)
func TestCrashHarnessDetectsLoss(t *testing.T) {
	srv := minio.Start(t)
	ctx := context.Background()
	bucket := srv.Bucket(t)
	st := srv.Store(t, bucket)
	dir := t.TempDir()
	h := runChild(t, srv, childConfig{
		Bucket: bucket, Durable: true, Seed: 5, Cycle: 1,
		Journal: filepath.Join(dir, "journal"), Size: crashDevSize,
		Hot: []int64{0, 4096, 8192, 12288},
	}, filepath.Join(dir, "child.log"), false, 1500*time.Millisecond)
	var keys []int64
	var ckpts []string
	if err := st.List(ctx, "", func(name string, size int64) error {
		// Only objects with data: placeholders and claim records
		// (small) in an attach's window may go missing harmlessly.
		if k, ok := store.ParseDataName(name); ok && size > 4096 {
			keys = append(keys, k)
		}
		if strings.HasPrefix(name, store.CheckpointPrefix) {
			ckpts = append(ckpts, name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// Without checkpoints recovery replays from key 0 and stops at the
	// deleted object (a checkpoint past it would make reads fail instead).
	for _, n := range ckpts {
		if err := st.Delete(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(keys)
	if len(keys) < 6 || countDone(h.flushes) < 3 {
		t.Fatalf("the child left %d data objects and completed %d flushes in 1.5 s; too little to test with", len(keys), countDone(h.flushes))
	}
	victim := keys[len(keys)/3]
	if err := st.Delete(ctx, store.DataName(victim)); err != nil {
		t.Fatal(err)
	}
	e, err := openEngine(ctx, st, engineOpts{size: crashDevSize, durable: true, log: zerolog.Nop()})
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	defer closeChecked(t, e, "the engine")
	got, bad, err := readBlocks(ctx, e.dev, h.touched())
	if err != nil {
		t.Fatal(err)
	}
	for b, err := range bad {
		t.Errorf("block %d: %v", b, err)
	}
	f := h.check(func(int64) uint64 { return 0 }, got, rules{durable: allFlushes, prefix: map[int]bool{0: true}})
	if len(f) == 0 {
		t.Fatalf("object %d of %d deleted before recovery, yet the check found no lost write (%d ops, %d flushes completed)", victim, len(keys), len(h.ops), countDone(h.flushes))
	}
	if !strings.Contains(strings.Join(f, "\n"), "made durable") {
		t.Errorf("the check found %d problems but no lost durable write:%s", len(f), summarize(f))
	}
	t.Logf("deleted key %d of %d: the check reports %d blocks, e.g. %s", victim, len(keys), len(f), f[0])
}

// logBuffer collects an engine's JSON log lines for assertions and for
// failure reports.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.b.Reset()
}

func runCrashCycles(t *testing.T, srv *minio.Server, seed uint64, durable bool) {
	ctx := context.Background()
	mode := uint64(1)
	if !durable {
		mode = 2
	}
	rng := rand.New(rand.NewPCG(seed, mode))
	bucket := srv.Bucket(t)
	st := srv.Store(t, bucket)
	dir := t.TempDir()
	devBlocks := int64(crashDevSize / blockSize)
	hot := make([]int64, 4)
	for i := range hot {
		hot[i] = rng.Int64N(devBlocks - hotBlocks + 1)
	}
	all := make([]int64, devBlocks)
	for b := range all {
		all[b] = int64(b)
	}
	base := make([]uint64, devBlocks) // what every block holds between cycles
	baseOf := func(b int64) uint64 { return base[b] }
	var logs logBuffer
	plog := zerolog.New(&logs).Level(zerolog.InfoLevel)
	r := rules{prefix: map[int]bool{0: true}}
	if durable {
		r.durable = allFlushes
	}

	var stats struct{ early, ops, acked, flushes, dropped, visible int }
	for cycle := uint64(1); cycle <= crashCycles; cycle++ {
		early := rng.IntN(6) == 0
		delay := 300*time.Millisecond + time.Duration(rng.Int64N(int64(2700*time.Millisecond)))
		if early {
			delay = time.Duration(rng.Int64N(int64(400 * time.Millisecond)))
		}
		t0 := time.Now()
		h := runChild(t, srv, childConfig{
			Bucket: bucket, Durable: durable, Seed: rng.Uint64(), Cycle: cycle,
			Journal: filepath.Join(dir, fmt.Sprintf("journal-%d", cycle)),
			Size:    crashDevSize, Hot: hot,
		}, filepath.Join(dir, fmt.Sprintf("child-%d.log", cycle)), early, delay)

		t1 := time.Now()
		logs.reset()
		e, err := openEngine(ctx, st, engineOpts{size: crashDevSize, durable: true, log: plog})
		if err != nil {
			t.Fatalf("cycle %d: attach after the kill: %v\nengine log:\n%s", cycle, err, logs.String())
		}
		if strings.Contains(logs.String(), "dropped_keys") {
			stats.dropped++
		}
		t2 := time.Now()
		got, bad, err := readBlocks(ctx, e.dev, toRead(h, rng, devBlocks))
		t3 := time.Now()
		if err != nil {
			e.close() //nolint:errcheck // failing already; the read error says more
			t.Fatalf("cycle %d: read the device back: %v", cycle, err)
		}
		for b, err := range bad {
			t.Errorf("cycle %d: block %d: %v", cycle, b, err)
		}
		if f := h.check(baseOf, got, r); len(f) > 0 {
			t.Errorf("cycle %d: %d blocks violate the crash guarantees (durable=%v, journal %s):%s",
				cycle, len(f), durable, filepath.Join(dir, fmt.Sprintf("journal-%d", cycle)), summarize(f))
		}
		if t.Failed() {
			e.close() //nolint:errcheck // failing already; the read error says more
			t.Fatalf("stopping after cycle %d; engine log of the attach:\n%s", cycle, tail(logs.String(), 30))
		}
		for b, id := range got {
			base[b] = id
		}
		stats.ops += len(h.ops)
		stats.flushes += countDone(h.flushes)
		for _, o := range h.ops {
			if o.ack != never {
				stats.acked++
			}
		}
		stats.visible += countVisible(h, got)
		if early {
			stats.early++
		}

		overwriteSample(t, e, cycle, rng, base, hot)
		t4 := time.Now()
		if err := e.close(); err != nil {
			t.Fatalf("cycle %d: close the parent's engine: %v", cycle, err)
		}
		t.Logf("cycle %d: %d ops, %d flushes completed; child ran %v, attach %v, read %v, check and overwrite %v, close %v",
			cycle, len(h.ops), countDone(h.flushes), t1.Sub(t0).Round(time.Millisecond), t2.Sub(t1).Round(time.Millisecond),
			t3.Sub(t2).Round(time.Millisecond), t4.Sub(t3).Round(time.Millisecond), time.Since(t4).Round(time.Millisecond))
	}

	// A last attach must find exactly the state the cycles left.
	e, err := openEngine(ctx, st, engineOpts{size: crashDevSize, durable: true, log: plog})
	if err != nil {
		t.Fatalf("final attach: %v", err)
	}
	defer func() {
		if err := e.close(); err != nil {
			t.Errorf("final close: %v", err)
		}
	}()
	got, bad, err := readBlocks(ctx, e.dev, all)
	if err != nil {
		t.Fatalf("final read: %v", err)
	}
	for b, err := range bad {
		t.Errorf("final state: block %d: %v", b, err)
	}
	wrong := 0
	for b, id := range got {
		if id != base[b] {
			if wrong < 10 {
				t.Errorf("final state: block %d holds write %#x, want %#x", b, id, base[b])
			}
			wrong++
		}
	}
	if wrong > 0 {
		t.Errorf("final state: %d blocks differ from the state the last cycle left", wrong)
	}
	t.Logf("durable=%v: %d cycles (%d killed during start-up), %d ops issued, %d acknowledged, %d flushes completed, %d ops visible after recovery, %d recoveries dropped keys past a gap",
		durable, crashCycles, stats.early, stats.ops, stats.acked, stats.flushes, stats.visible, stats.dropped)
	if stats.acked == 0 || stats.flushes == 0 {
		t.Errorf("the children acknowledged %d ops and completed %d flushes in all cycles: the crash suite tested nothing", stats.acked, stats.flushes)
	}
}

// toRead returns the blocks a cycle checks: every block the child touched
// and a random sample of 512 others, where nothing may have changed.
// (Reading the whole fragmented device every cycle costs seconds; the
// final attach reads it all.)
func toRead(h *history, rng *rand.Rand, devBlocks int64) []int64 {
	set := make(map[int64]bool)
	for _, b := range h.touched() {
		set[b] = true
	}
	for range 512 {
		set[rng.Int64N(devBlocks)] = true
	}
	out := make([]int64, 0, len(set))
	for b := range set {
		out = append(out, b)
	}
	slices.Sort(out)
	return out
}

func countDone(fs []*flushRec) int {
	n := 0
	for _, f := range fs {
		if f.done != never {
			n++
		}
	}
	return n
}

// countVisible counts the writes of h whose data is on some block.
func countVisible(h *history, got map[int64]uint64) int {
	seen := make(map[uint64]bool)
	for _, id := range got {
		if h.byID[id] != nil {
			seen[id] = true
		}
	}
	return len(seen)
}

// runChild runs one writer process until it is killed and returns its
// journal.
// early: kill delay after the process started, without waiting for its
// engine to open; otherwise after the engine opened.
func runChild(t *testing.T, srv *minio.Server, c childConfig, logPath string, early bool, delay time.Duration) *history {
	t.Helper()
	c.Endpoint, c.Region, c.AccessKey, c.SecretKey = srv.Endpoint, srv.Region, srv.AccessKey, srv.SecretKey
	cfg, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+string(cfg))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("cycle %d: start the writer process: %v", c.Cycle, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fail := func(format string, args ...any) {
		_ = cmd.Process.Kill() // it may have exited already
		<-exited
		t.Fatalf("cycle %d: "+format+"\nwriter log tail (%s):\n%s", append(append([]any{c.Cycle}, args...), logPath, fileTail(logPath, 30))...)
	}

	if !early {
		// Wait for the engine to accept I/O: the journal's first record.
		deadline := time.Now().Add(60 * time.Second)
		for {
			if fi, err := os.Stat(c.Journal); err == nil && fi.Size() >= recSize {
				break
			}
			select {
			case err := <-exited:
				exited <- err
				fail("the writer process exited before opening its engine: %v", err)
			case <-time.After(10 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				fail("the writer process did not open its engine within a minute")
			}
		}
	}
	select {
	case err := <-exited:
		exited <- err
		fail("the writer process exited by itself (%v); it must only die by SIGKILL", err)
	case <-time.After(delay):
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		fail("kill the writer process: %v", err)
	}
	err = <-exited
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		exited <- err
		fail("the writer process ended with %v, not by SIGKILL", err)
	}
	out, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(out, []byte("DATA RACE")) || bytes.Contains(out, []byte("panic:")) || bytes.Contains(out, []byte("CHILD FATAL")) {
		t.Fatalf("cycle %d: the writer process reported a failure before it was killed:\n%s", c.Cycle, tail(string(out), 60))
	}
	raw, err := os.ReadFile(c.Journal)
	if errors.Is(err, os.ErrNotExist) {
		raw, err = nil, nil // killed before it opened the journal
	}
	if err != nil {
		t.Fatal(err)
	}
	h, opened, err := parseJournal(raw)
	if err != nil {
		t.Fatalf("cycle %d: %v", c.Cycle, err)
	}
	if !early && !opened {
		t.Fatalf("cycle %d: journal lacks the engine-opened record", c.Cycle)
	}
	return h
}

// overwriteSample writes (and sometimes discards) a sample of ranges with
// the parent's engine, flushes durably, reads them back and updates base.
// Half of the ranges fall into the hot regions, where the child's
// per-area seqnos ran highest.
func overwriteSample(t *testing.T, e *engine, cycle uint64, rng *rand.Rand, base []uint64, hot []int64) {
	t.Helper()
	ctx := context.Background()
	devBlocks := int64(len(base))
	want := make(map[int64]uint64)
	for k := uint64(1); k <= 24; k++ {
		n := 1 + rng.Int64N(16)
		block := rng.Int64N(devBlocks - n + 1)
		if k%2 == 0 {
			block = hot[rng.IntN(len(hot))] + rng.Int64N(hotBlocks-n+1)
		}
		if rng.IntN(6) == 0 {
			if err := e.dev.Zero(ctx, block*blockSize, n*blockSize, true, false); err != nil {
				t.Fatalf("cycle %d: parent discard of blocks %d+%d: %v", cycle, block, n, err)
			}
			for b := block; b < block+n; b++ {
				want[b] = 0
			}
			continue
		}
		id := 1<<63 | cycle<<32 | k
		if err := e.dev.WriteAt(ctx, stamped(id, block, n), block*blockSize, false); err != nil {
			t.Fatalf("cycle %d: parent write of blocks %d+%d: %v", cycle, block, n, err)
		}
		for b := block; b < block+n; b++ {
			want[b] = id
		}
	}
	if err := e.dev.Flush(ctx); err != nil {
		t.Fatalf("cycle %d: parent flush: %v", cycle, err)
	}
	blocks := make([]int64, 0, len(want))
	for b := range want {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	got, bad, err := readBlocks(ctx, e.dev, blocks)
	if err != nil {
		t.Fatalf("cycle %d: parent read-back: %v", cycle, err)
	}
	for b, err := range bad {
		t.Errorf("cycle %d: parent read-back of block %d: %v", cycle, b, err)
	}
	for _, b := range blocks {
		if id, ok := got[b]; ok && id != want[b] {
			t.Errorf("cycle %d: block %d holds %#x after the parent (newer generation) wrote %#x and flushed: the new write lost", cycle, b, id, want[b])
		}
		base[b] = want[b]
	}
	if t.Failed() {
		t.FailNow()
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func fileTail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	return tail(string(b), n)
}
