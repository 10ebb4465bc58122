package crashtest

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/testutil/minio"
	"github.com/bs3/bs3/internal/volume"
)

// Engines of the two-writer test, as recorded in the history.
const (
	engA = 0
	engB = 1
)

// TestTwoWriters attaches a second engine (B) to a volume engine A is
// using, on MinIO with conditional writes, and lets both write. Engine A
// first writes a base set sequentially and flushes it; then B attaches and
// both write overlapping stamped data and discards with durable flushes
// from two goroutines each, until at least one is fenced and the other
// has completed a few more flushes. "quiet": A is idle while B attaches;
// "busy": A keeps writing and flushing while B attaches and recovers.
// Each mode runs three rounds on fresh buckets. It asserts:
//
//  1. at least one engine is fenced: B's attach, or a write, flush or the
//     final close of A or B, fails with an error that wraps
//     volume.ErrFenced and says "another writer"; no call fails with any
//     other error;
//  2. no interleaving: a third engine attached after both stopped reads a
//     state that is the crash-consistent outcome of ONE writer's history,
//     checked with the crash suite's rules (content only from that
//     history; prefix consistency per engine; durability of its completed
//     flushes), where
//     - A's history is the base set plus A's ops (only A's data may be
//     visible, every flush A completed is durable), and
//     - B's history is the base set, A's ops issued before B's attach
//     returned (B may have recovered them), and B's ops; A's flushes
//     completed before B's attach began and all of B's are durable;
//  3. no acknowledged-durable write is lost: for every flush of either
//     engine that returned success, the ops of that engine acknowledged
//     before it started are not overwritten by older data (so a fenced
//     engine's flush must fail rather than report success for data that
//     will not survive).
func TestTwoWriters(t *testing.T) {
	srv := minio.Start(t)
	for _, busy := range []bool{false, true} {
		name := "quiet"
		if busy {
			name = "busy"
		}
		t.Run(name, func(t *testing.T) {
			for round := 1; round <= 3; round++ {
				if !runTwoWriters(t, srv, busy, round) {
					return
				}
			}
		})
	}
}

// fenceWriter is one engine's writers and what became of them.
type fenceWriter struct {
	name    string
	eng     int
	e       *engine
	stop    chan struct{}
	wg      sync.WaitGroup
	flushes atomic.Int64
	mu      sync.Mutex
	err     error // first error of any of its calls
}

func (w *fenceWriter) fail(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == nil {
		w.err = err
	}
}

func (w *fenceWriter) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// start runs two goroutines of overlapping writes, discards and durable
// flushes over the first blocks of the device; each stops at its first
// error.
func (w *fenceWriter) start(rec *recorder, seed uint64, blocks int64) {
	w.stop = make(chan struct{})
	var ids atomic.Uint64
	for g := range 2 {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			ctx := context.Background()
			rng := rand.New(rand.NewPCG(seed, uint64(g)))
			for k := 1; ; k++ {
				select {
				case <-w.stop:
					return
				default:
				}
				var err error
				switch {
				case k%5 == 0:
					f := rec.flushStart(w.eng)
					if err = w.e.dev.Flush(ctx); err == nil {
						rec.flushDone(f)
						w.flushes.Add(1)
					}
				case rng.IntN(20) == 0:
					n := 1 + rng.Int64N(32)
					block := rng.Int64N(blocks - n + 1)
					o := rec.issue(w.eng, opZero, uint64(w.eng+1)<<40|ids.Add(1), block, n)
					if err = w.e.dev.Zero(ctx, block*blockSize, n*blockSize, true, false); err == nil {
						rec.acked(o)
					}
				default:
					n := 1 + rng.Int64N(32)
					block := rng.Int64N(blocks - n + 1)
					id := uint64(w.eng+1)<<40 | ids.Add(1)
					o := rec.issue(w.eng, opWrite, id, block, n)
					if err = w.e.dev.WriteAt(ctx, stamped(id, block, n), block*blockSize, false); err == nil {
						rec.acked(o)
					}
				}
				if err != nil {
					w.fail(err)
					return
				}
			}
		}()
	}
}

func (w *fenceWriter) halt() {
	if w.stop != nil {
		close(w.stop)
		w.wg.Wait()
		w.stop = nil
	}
}

// isFenced reports whether err is the clear "another writer" refusal.
func isFenced(err error) bool {
	return errors.Is(err, volume.ErrFenced) && strings.Contains(err.Error(), "another writer")
}

// runTwoWriters runs one round; it reports whether the round passed.
func runTwoWriters(t *testing.T, srv *minio.Server, busy bool, round int) bool {
	ctx := context.Background()
	const size = 16 << 20
	const blocks = 1024 // the region both write: 4 MiB, so they overlap a lot
	bucket := srv.Bucket(t)
	st := srv.Store(t, bucket)
	logf := func(format string, args ...any) { t.Logf("round %d: "+format, append([]any{round}, args...)...) }
	errorf := func(format string, args ...any) { t.Errorf("round %d: "+format, append([]any{round}, args...)...) }
	var logsA, logsB, logsC logBuffer
	open := func(l *logBuffer) (*engine, error) {
		return openEngine(ctx, st, engineOpts{size: size, durable: true, log: zerolog.New(l).Level(zerolog.InfoLevel)})
	}

	a, err := open(&logsA)
	if err != nil {
		t.Fatalf("round %d: attach A: %v", round, err)
	}
	wa := &fenceWriter{name: "A", eng: engA, e: a}
	base := make(map[int64]uint64)
	rng := rand.New(rand.NewPCG(uint64(round), 11))
	for i := uint64(1); i <= 40; i++ {
		n := 1 + rng.Int64N(32)
		block := rng.Int64N(blocks - n + 1)
		id := 3<<40 | i
		if err := a.dev.WriteAt(ctx, stamped(id, block, n), block*blockSize, false); err != nil {
			t.Fatalf("round %d: A's base write: %v", round, err)
		}
		for b := block; b < block+n; b++ {
			base[b] = id
		}
	}
	if err := a.dev.Flush(ctx); err != nil {
		t.Fatalf("round %d: A's base flush: %v", round, err)
	}

	rec := newRecorder()
	if busy {
		wa.start(rec, uint64(round)*10+1, blocks)
		for wa.flushes.Load() < 3 && wa.failed() == nil {
			time.Sleep(5 * time.Millisecond)
		}
	}
	openStart := rec.mark()
	b, berr := open(&logsB)
	openDone := rec.mark()
	wb := &fenceWriter{name: "B", eng: engB, e: b}
	if berr != nil {
		if !isFenced(berr) {
			errorf("attaching B while A is attached failed without a fencing error: %v", berr)
		}
		logf("B's attach refused: %v", berr)
	}
	if !busy {
		wa.start(rec, uint64(round)*10+1, blocks)
	}
	if b != nil {
		wb.start(rec, uint64(round)*10+2, blocks)
	}

	// Run until one is fenced, then let the other complete three more
	// flushes (or fail too).
	deadline := time.Now().Add(60 * time.Second)
	var fencedAt map[*fenceWriter]int64
	for {
		if time.Now().After(deadline) {
			errorf("after a minute: A failed with %v, B with %v (flushes: A %d, B %d); want one fenced and the other making progress",
				wa.failed(), wb.failed(), wa.flushes.Load(), wb.flushes.Load())
			break
		}
		if fencedAt == nil && (wa.failed() != nil || wb.failed() != nil || b == nil) {
			fencedAt = map[*fenceWriter]int64{wa: wa.flushes.Load(), wb: wb.flushes.Load()}
		}
		if fencedAt != nil {
			doneA := wa.failed() != nil || wa.flushes.Load() >= fencedAt[wa]+3
			doneB := b == nil || wb.failed() != nil || wb.flushes.Load() >= fencedAt[wb]+3
			if doneA && doneB {
				break
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	wa.halt()
	wb.halt()

	fenced := 0
	if berr != nil && isFenced(berr) {
		fenced++
	}
	for _, w := range []*fenceWriter{wa, wb} {
		if w.e == nil {
			continue
		}
		werr := w.failed()
		cerr := w.e.close() // commits what it still holds: may be fenced here
		switch {
		case werr != nil && !isFenced(werr):
			errorf("%s failed with an error that is not a fencing error: %v", w.name, werr)
		case cerr != nil && !isFenced(cerr):
			errorf("%s's close failed with an error that is not a fencing error: %v", w.name, cerr)
		}
		if isFenced(werr) || isFenced(cerr) {
			fenced++
			logf("%s fenced: %v", w.name, errors.Join(werr, cerr))
		}
	}
	if fenced == 0 {
		errorf("neither engine was fenced: two writers used the volume at once without an error")
	}

	c, err := open(&logsC)
	if err != nil {
		errorf("attach a third engine after both stopped: %v\nC's log:\n%s", err, tail(logsC.String(), 20))
		return false
	}
	defer closeChecked(t, c, "the third engine")
	h := rec.history()
	want := h.touched()
	for blk := range base {
		want = append(want, blk)
	}
	slices.Sort(want)
	want = slices.Compact(want)
	got, bad, err := readBlocks(ctx, c.dev, want)
	if err != nil {
		errorf("the third engine cannot read the volume: %v\nC's log:\n%s\nB's log:\n%s", err, tail(logsC.String(), 20), tail(logsB.String(), 20))
		return false
	}
	for blk, err := range bad {
		errorf("block %d: %v", blk, err)
	}
	baseOf := func(blk int64) uint64 { return base[blk] }
	asA := h.check(baseOf, got, rules{
		visible: func(o *op) bool { return o.eng == engA },
		durable: func(f *flushRec) bool { return f.eng == engA },
		prefix:  map[int]bool{engA: true},
	})
	asB := h.check(baseOf, got, rules{
		visible: func(o *op) bool { return o.eng == engB || o.issue < openDone },
		durable: func(f *flushRec) bool { return f.eng == engB || f.done < openStart },
		prefix:  map[int]bool{engA: true, engB: true},
	})
	if len(asA) > 0 && len(asB) > 0 {
		errorf("the volume is not the outcome of one writer's history (A fenced: %v, B fenced: %v): writes of the two engines are interleaved\n as A's history:%s\n as B's history:%s\nC's log:\n%s",
			wa.failed() != nil, berr != nil || wb.failed() != nil, summarize(asA), summarize(asB), tail(logsC.String(), 10))
	}
	if lost := h.check(baseOf, got, rules{durable: allFlushes}); len(lost) > 0 {
		errorf("writes covered by a flush that returned success are lost:%s", summarize(lost))
	}
	winner := "A"
	if len(asA) > 0 {
		winner = "B"
	}
	logf("busy=%v: winner %s; ops A %d, B %d; flushes A %d, B %d; B's attach log:\n%s", busy, winner,
		countEng(h, engA), countEng(h, engB), wa.flushes.Load(), wb.flushes.Load(), tail(logsB.String(), 8))
	return !t.Failed()
}

func countEng(h *history, eng int) int {
	n := 0
	for _, o := range h.ops {
		if o.eng == eng {
			n++
		}
	}
	return n
}
