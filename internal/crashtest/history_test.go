package crashtest

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
)

// A history is what the writers of a test did, as a sequence of events
// with increasing positions: a write (or zeroing) is *issued* just before
// the device call and *acknowledged* just after it returned nil; a flush
// *starts* just before Flush and is *done* just after it returned nil. The
// positions give the real-time order the checks rely on: if a's ack
// position is below b's issue position, a returned before b was called,
// so b is newer than a on every block both touch. Writes whose intervals
// overlap may land in either order.
//
// never is the position of an event that did not happen: a write never
// acknowledged (the writer was killed or the call failed), a flush that
// never completed.
const never = math.MaxInt64

type opKind uint8

const (
	opWrite opKind = iota + 1
	opZero         // discard or write-zeroes: the blocks read as zeros
)

// op is one write or zeroing of n blocks at block.
type op struct {
	id       uint64 // the stamp of a write; unique among all writes of a test
	eng      int    // the engine (writer) that issued it
	kind     opKind
	block, n int64
	issue    int64
	ack      int64
}

// flushRec is one Flush call of engine eng.
type flushRec struct {
	eng         int
	start, done int64
}

type history struct {
	ops     []*op
	byID    map[uint64]*op
	flushes []*flushRec
}

func newHistory() *history { return &history{byID: make(map[uint64]*op)} }

func (h *history) add(o *op) { h.ops = append(h.ops, o); h.byID[o.id] = o }

// recorder builds a history from the goroutines of one process. Positions
// are taken under its mutex, so they follow real time.
type recorder struct {
	mu  sync.Mutex
	pos int64
	h   *history
}

func newRecorder() *recorder { return &recorder{h: newHistory()} }

func (r *recorder) issue(eng int, kind opKind, id uint64, block, n int64) *op {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pos++
	o := &op{id: id, eng: eng, kind: kind, block: block, n: n, issue: r.pos, ack: never}
	r.h.add(o)
	return o
}

func (r *recorder) acked(o *op) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pos++
	o.ack = r.pos
}

func (r *recorder) flushStart(eng int) *flushRec {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pos++
	f := &flushRec{eng: eng, start: r.pos, done: never}
	r.h.flushes = append(r.h.flushes, f)
	return f
}

func (r *recorder) flushDone(f *flushRec) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pos++
	f.done = r.pos
}

// mark returns a position for an outside event (an engine opening, a
// server killed), ordered with the writers' events.
func (r *recorder) mark() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pos++
	return r.pos
}

// history returns the history recorded so far; the writers must have
// stopped.
func (r *recorder) history() *history {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.h
}

// rules say what a device read back after a crash (or a shutdown) may and
// must show.
type rules struct {
	// visible reports whether o's data (or zeros, for a zeroing) may be
	// what a block holds. nil: every op.
	visible func(o *op) bool
	// durable reports whether a completed flush promises durability:
	// every op of its engine acknowledged before the flush started must
	// still be visible, or overwritten by an op not older than it.
	// nil: none (write.durable = false).
	durable func(f *flushRec) bool
	// prefix lists the engines whose writes must be prefix-consistent
	// (docs/ARCHITECTURE.md §4.3): if any write of the engine is visible, every op of
	// that engine acknowledged before that write was issued must be
	// visible or overwritten by an op not older than it. It holds in both
	// durability modes, because keys are taken in closing order and the
	// volume keeps exactly a prefix of the keys.
	prefix map[int]bool
}

// check compares what the device holds (got: block → write id, 0 for
// zeros) with the history. base(b) is the id block b held before the
// history started (0: zeros). It returns one message per violation found,
// empty when the device is a state the rules allow.
//
// For each block, the content's age is the ack position of the op that
// produced it (-1 for the base content, which is older than every op; for
// zeros, the newest visible zeroing of the block, or -1 if the base was
// zeros). An op o the rules require ("covered") is lost on a block if the
// content there is definitely older than o: its ack position is below o's
// issue position.
func (h *history) check(base func(int64) uint64, got map[int64]uint64, r rules) []string {
	visible := r.visible
	if visible == nil {
		visible = func(*op) bool { return true }
	}
	perBlock := make(map[int64][]*op)
	for _, o := range h.ops {
		for b := o.block; b < o.block+o.n; b++ {
			if _, read := got[b]; read {
				perBlock[b] = append(perBlock[b], o)
			}
		}
	}
	blocks := make([]int64, 0, len(got))
	for b := range got {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)

	var out []string
	age := make(map[int64]int64, len(got))
	desc := make(map[int64]string, len(got))
	frontier := make(map[int]*op) // per prefix engine: the visible op issued last
	for _, b := range blocks {
		id := got[b]
		switch {
		case id == 0:
			best, what := int64(math.MinInt64), ""
			if base(b) == 0 {
				best, what = -1, "zeros (as before the run)"
			}
			for _, o := range perBlock[b] {
				if o.kind == opZero && visible(o) && o.ack > best {
					best, what = o.ack, fmt.Sprintf("zeros (of zeroing %#x, issued at %d, acked at %s)", o.id, o.issue, pos(o.ack))
				}
			}
			if best == math.MinInt64 {
				out = append(out, fmt.Sprintf("block %d reads zeros, but it held write %#x before the run and no zeroing of it may be visible", b, base(b)))
				continue
			}
			age[b], desc[b] = best, what
		case id == base(b):
			age[b], desc[b] = -1, fmt.Sprintf("its content from before the run (write %#x)", id)
		default:
			o := h.byID[id]
			switch {
			case o == nil:
				out = append(out, fmt.Sprintf("block %d holds write %#x, which was never issued in this run and is not what the block held before it (%#x): stale or foreign data", b, id, base(b)))
				continue
			case o.kind != opWrite || b < o.block || b >= o.block+o.n:
				out = append(out, fmt.Sprintf("block %d holds write %#x, which was issued to blocks %d+%d", b, id, o.block, o.n))
				continue
			case !visible(o):
				out = append(out, fmt.Sprintf("block %d holds write %#x of engine %d (issued at %d, acked at %s), which must not be visible in this state", b, id, o.eng, o.issue, pos(o.ack)))
				continue
			}
			age[b], desc[b] = o.ack, fmt.Sprintf("write %#x (engine %d, issued at %d, acked at %s)", id, o.eng, o.issue, pos(o.ack))
			if r.prefix[o.eng] {
				if f := frontier[o.eng]; f == nil || o.issue > f.issue {
					frontier[o.eng] = o
				}
			}
		}
	}

	durable := make(map[int]*flushRec) // per engine: the completed flush started last
	if r.durable != nil {
		for _, f := range h.flushes {
			if f.done != never && r.durable(f) {
				if d := durable[f.eng]; d == nil || f.start > d.start {
					durable[f.eng] = f
				}
			}
		}
	}
	for _, b := range blocks {
		a, ok := age[b]
		if !ok {
			continue // already reported
		}
		for _, o := range perBlock[b] {
			if a > o.issue {
				continue // the content is not older than o
			}
			if f := durable[o.eng]; f != nil && o.ack < f.start {
				out = append(out, fmt.Sprintf("block %d holds %s, older than %s %#x (engine %d, issued at %d, acked at %d), which the flush started at %d and completed at %d made durable", b, desc[b], kindName(o.kind), o.id, o.eng, o.issue, o.ack, f.start, f.done))
				break
			}
			if w := frontier[o.eng]; w != nil && o.ack < w.issue {
				out = append(out, fmt.Sprintf("block %d holds %s, older than %s %#x (engine %d, issued at %d, acked at %d), although write %#x issued after that at %d is visible on block(s) from %d: not a prefix of the keys", b, desc[b], kindName(o.kind), o.id, o.eng, o.issue, o.ack, w.id, w.issue, w.block))
				break
			}
		}
	}
	return out
}

func kindName(k opKind) string {
	if k == opZero {
		return "zeroing"
	}
	return "write"
}

func pos(p int64) string {
	if p == never {
		return "never"
	}
	return fmt.Sprint(p)
}

// summarize joins at most 25 findings into one message.
func summarize(findings []string) string {
	const max = 25
	var b strings.Builder
	for i, f := range findings {
		if i == max {
			fmt.Fprintf(&b, "\n  ... and %d more", len(findings)-max)
			break
		}
		b.WriteString("\n  ")
		b.WriteString(f)
	}
	return b.String()
}

// touched returns the sorted blocks any op of h touches.
func (h *history) touched() []int64 {
	seen := make(map[int64]bool)
	for _, o := range h.ops {
		for b := o.block; b < o.block+o.n; b++ {
			seen[b] = true
		}
	}
	out := make([]int64, 0, len(seen))
	for b := range seen {
		out = append(out, b)
	}
	slices.Sort(out)
	return out
}
