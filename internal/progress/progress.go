// Package progress logs the progress of long runs — recovery's
// roll-forward, garbage collection passes — at a steady interval, so that
// an operator watching the log of a start-up that replays a million
// objects, or of a GC run over a large device, sees how far it is and how
// long it still needs: work done and total, bytes, rates, and the time
// left when the total is known (docs/ARCHITECTURE.md §6, §7).
//
// A Reporter is fed by the run (Add or Set, from any goroutine) and logs a
// line when at least Every has passed since the run started or since its
// last line; a run shorter than Every logs nothing here (its own summary
// line says enough). It never starts a goroutine or a timer: time is read
// from the clock it is given, so a test drives it with a fake clock
// instead of sleeping. The price is that a run that makes no progress at
// all logs nothing until it does; the object proxy logs the retries that
// are the usual reason.
//
// Written here rather than taken from a library: the progress libraries
// on offer draw terminal bars; this needs structured zerolog lines and an
// injected clock, in about a hundred lines.
package progress

import (
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// DefaultEvery is the interval between progress lines.
const DefaultEvery = 10 * time.Second

// Options configure a Reporter. Zero fields take the defaults.
type Options struct {
	// Unit names what is counted ("objects", "blocks"): the fields are
	// <unit>_done, <unit>_total and <unit>_per_s. Default "objects".
	Unit string
	// BytesName names the byte count ("bytes_written"); its rate is
	// <BytesName>_per_s. Empty: the run counts no bytes, and no byte
	// fields are logged.
	BytesName string
	// Total is how many units the run will do; 0 = not known (yet): no
	// total, percentage or time left is logged until SetTotal.
	Total int64
	// Every is the interval between lines (DefaultEvery).
	Every time.Duration
	// Always makes Finish log the final line even for a run shorter than
	// Every (for runs whose final line is their summary).
	Always bool
	// Now is the clock (time.Now).
	Now func() time.Time
}

// Reporter logs the progress of one run. Its methods are safe for
// concurrent use.
type Reporter struct {
	log zerolog.Logger
	msg string
	o   Options

	mu     sync.Mutex
	start  time.Time
	last   time.Time // of the last line, or start
	logged bool      // an interval line was logged
	done   int64
	bytes  int64
	total  int64
}

// New starts a Reporter for a run that begins now; msg is the message of
// its lines ("roll-forward").
func New(log zerolog.Logger, msg string, o Options) *Reporter {
	if o.Unit == "" {
		o.Unit = "objects"
	}
	if o.Every <= 0 {
		o.Every = DefaultEvery
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	now := o.Now()
	return &Reporter{log: log, msg: msg, o: o, start: now, last: now, total: o.Total}
}

// Add counts n more units and bytes more bytes, and logs a line if Every
// has passed since the last one.
func (r *Reporter) Add(n, bytes int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.done += n
	r.bytes += bytes
	r.maybeLog()
}

// Set sets the units done and bytes so far (for runs that keep their own
// counters), and logs a line if Every has passed since the last one.
func (r *Reporter) Set(done, bytes int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.done, r.bytes = done, bytes
	r.maybeLog()
}

// SetTotal sets the total once it is known (or better estimated).
func (r *Reporter) SetTotal(total int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.total = total
}

// Elapsed is how long the run has been going, by the Reporter's clock.
func (r *Reporter) Elapsed() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.o.Now().Sub(r.start)
}

// Finish logs the final line (finished: true) if the run logged progress
// lines before, or if Options.Always is set.
func (r *Reporter) Finish() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.logged || r.o.Always {
		r.line(r.o.Now(), true)
	}
}

func (r *Reporter) maybeLog() {
	if r.total > 0 && r.done >= r.total {
		return // the work is done: the final line (Finish) says so
	}
	now := r.o.Now()
	if now.Sub(r.last) < r.o.Every {
		return
	}
	r.line(now, false)
	r.last = now
	r.logged = true
}

// line logs the state at now. The caller holds mu.
func (r *Reporter) line(now time.Time, finished bool) {
	el := now.Sub(r.start)
	secs := el.Seconds()
	u := r.o.Unit
	ev := r.log.Info().Bool("finished", finished).Int64(u+"_done", r.done)
	if r.total > 0 {
		ev = ev.Int64(u+"_total", r.total).Float64("percent", percent(r.done, r.total))
	}
	if r.o.BytesName != "" {
		ev = ev.Int64(r.o.BytesName, r.bytes)
	}
	ev = ev.Dur("elapsed_ms", el)
	if secs > 0 {
		ev = ev.Float64(u+"_per_s", round(float64(r.done)/secs))
		if r.o.BytesName != "" {
			ev = ev.Float64(r.o.BytesName+"_per_s", round(float64(r.bytes)/secs))
		}
	}
	if !finished && r.total > 0 && r.done > 0 && secs > 0 {
		left := max(r.total-r.done, 0)
		eta := time.Duration(float64(left) / (float64(r.done) / secs) * float64(time.Second))
		ev = ev.Dur("eta_ms", eta.Round(time.Millisecond))
	}
	ev.Msg(r.msg)
}

func percent(done, total int64) float64 {
	return min(round(100*float64(done)/float64(total)), 100)
}

// round keeps one decimal: rates and percentages need no more.
func round(f float64) float64 {
	return float64(int64(f*10+0.5)) / 10
}
