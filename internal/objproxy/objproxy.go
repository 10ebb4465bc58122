// Package objproxy owns all traffic to the object store: a pool of
// uploaders (Put, Delete) and a pool of downloaders (GetRange, Size), each
// with a priority queue for user I/O served before a normal queue for
// background work (checkpoint, GC), plus bounded per-attempt timeouts and
// retries with capped exponential backoff and full jitter.
//
// It moves named byte slices and nothing else: it never knows about keys,
// chunks, blocks or the extent map, never retains a caller's buffer after
// the call returns, and never retries an answer that retrying cannot change
// (store.ErrNotFound, store.ErrExists). The one exception: a conditional
// put that meets ErrExists after an earlier attempt of its own failed
// reads the object back, because that earlier attempt may have landed with
// its reply lost; it reports success only for byte-identical content.
package objproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store"
)

// Priority selects the queue a request waits in. A worker always takes a
// High request before any Low one.
type Priority int

const (
	// Low is for background work: checkpoint, garbage collection.
	Low Priority = iota
	// High is for user I/O: chunk uploads and reads for the device.
	High
)

// Defaults for zero Options fields. The pool sizes are also the defaults
// of s3.uploaders and s3.downloaders (internal/config uses these
// constants, so the two cannot disagree); they were 8 here while the
// daemon ran with the configuration's 16, which they now are.
const (
	DefaultUploaders      = 16
	DefaultDownloaders    = 16
	DefaultAttemptTimeout = 15 * time.Second
	// DefaultMinRate is the slowest transfer, in bytes per second, that a
	// first attempt is given time for on top of AttemptTimeout.
	DefaultMinRate = 256 << 10
	// DefaultMaxAttemptTimeout caps the growing per-attempt timeout, and
	// is the timeout of a listing, which is many requests in one call.
	DefaultMaxAttemptTimeout = 10 * time.Minute
	DefaultBaseBackoff       = 100 * time.Millisecond
	DefaultMaxBackoff        = 5 * time.Second
)

// ErrClosed is returned by calls made after Close, and by requests that
// were still queued or waiting for a retry when Close was called.
var ErrClosed = errors.New("object proxy closed")

// Options configure a Proxy. Zero values take the defaults above.
type Options struct {
	// Uploaders and Downloaders are the pool sizes (s3.uploaders,
	// s3.downloaders).
	Uploaders, Downloaders int
	// AttemptTimeout, MinRate and MaxAttemptTimeout bound each single
	// store call (docs/ARCHITECTURE.md §18): attempt n of a call that
	// moves b bytes may take (AttemptTimeout + b/MinRate) * 2^(n-1), at
	// most MaxAttemptTimeout. An attempt that runs out of time is retried
	// like any other transient error. A stuck small request is retried
	// soon, a large one is not cut off while it still moves, and the
	// doubling keeps a link slower than MinRate live instead of retrying
	// the same too-short attempt forever.
	AttemptTimeout    time.Duration
	MinRate           int64
	MaxAttemptTimeout time.Duration
	// BaseBackoff and MaxBackoff shape the delay before retry n:
	// uniformly random in [0, min(MaxBackoff, BaseBackoff*2^(n-1))].
	BaseBackoff, MaxBackoff time.Duration
	// MaxAttempts > 0 gives up after that many attempts, returning the
	// last error. 0 retries until the caller's context ends: a block
	// device must not drop writes because of a transient outage.
	MaxAttempts int
	// Observer, when not nil, hears of every store call (metrics).
	Observer Observer
	Logger   zerolog.Logger
}

func (o *Options) setDefaults() {
	if o.Uploaders <= 0 {
		o.Uploaders = DefaultUploaders
	}
	if o.Downloaders <= 0 {
		o.Downloaders = DefaultDownloaders
	}
	if o.AttemptTimeout <= 0 {
		o.AttemptTimeout = DefaultAttemptTimeout
	}
	if o.MinRate <= 0 {
		o.MinRate = DefaultMinRate
	}
	if o.MaxAttemptTimeout <= 0 {
		o.MaxAttemptTimeout = DefaultMaxAttemptTimeout
	}
	if o.MaxAttemptTimeout < o.AttemptTimeout {
		o.MaxAttemptTimeout = o.AttemptTimeout
	}
	if o.BaseBackoff <= 0 {
		o.BaseBackoff = DefaultBaseBackoff
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = DefaultMaxBackoff
	}
	if o.MaxBackoff < o.BaseBackoff {
		o.MaxBackoff = o.BaseBackoff
	}
	if o.MaxAttempts < 0 {
		o.MaxAttempts = 0
	}
}

// OpStats counts the store calls of one operation.
type OpStats struct {
	// Attempts is the number of store calls made.
	Attempts uint64
	// Retries is the number of failed attempts that were followed by a
	// scheduled retry.
	Retries uint64
	// Failures is the number of requests that ended in an error after at
	// least one attempt failed with a retryable error: MaxAttempts ran
	// out, the caller's context ended, or the proxy was closed. Final
	// answers (ErrNotFound, ErrExists) are results, not failures.
	Failures uint64
}

// Stats is a snapshot of the proxy's counters.
type Stats struct {
	Put, Get, Delete, Size, List OpStats
}

type op uint8

const (
	opPut op = iota
	opGet
	opDelete
	opSize
	opList
	numOps
)

func (o op) String() string {
	switch o {
	case opPut:
		return "put"
	case opGet:
		return "get"
	case opDelete:
		return "delete"
	case opSize:
		return "size"
	case opList:
		return "list"
	}
	return "unknown"
}

type counters struct {
	attempts, retries, failures atomic.Uint64
}

// Proxy serializes and prioritizes store calls through two worker pools.
// All methods are safe for concurrent use.
type Proxy struct {
	st    store.Store
	o     Options
	log   zerolog.Logger
	up    *pool // Put, Delete
	down  *pool // GetRange, Size
	stats [numOps]counters
	reqs  sync.Pool // *request, reused when no retry or cancellation left references behind

	// backoff returns the delay before the retry that follows failed
	// attempt n (n >= 1). Tests replace it to make delays deterministic.
	backoff func(n int) time.Duration
}

// New starts the uploader and downloader pools over st.
func New(st store.Store, o Options) *Proxy {
	o.setDefaults()
	p := &Proxy{st: st, o: o, log: o.Logger}
	p.reqs.New = func() any { return &request{done: make(chan struct{}, 1)} }
	p.backoff = p.jitteredBackoff
	p.up = newPool(p, o.Uploaders)
	p.down = newPool(p, o.Downloaders)
	return p
}

// jitteredBackoff is capped exponential backoff with full jitter: spreading
// retries uniformly keeps many callers hit by the same outage from retrying
// in lockstep.
func (p *Proxy) jitteredBackoff(n int) time.Duration {
	d := p.o.BaseBackoff
	for i := 1; i < n && d < p.o.MaxBackoff && d <= math.MaxInt64/2; i++ {
		d *= 2
	}
	d = min(d, p.o.MaxBackoff)
	return rand.N(d + 1)
}

// Put stores body under name (see store.Store.Put). body must not be
// modified until Put returns.
func (p *Proxy) Put(ctx context.Context, prio Priority, name string, body []byte, ifAbsent bool) error {
	r := p.newRequest(opPut, prio, name)
	r.body, r.ifAbsent = body, ifAbsent
	err := p.run(ctx, p.up, r)
	p.release(r)
	return err
}

// PutV stores the concatenation of body's pieces under name with one call
// where the store takes pieces (store.VectorWriter; joined into one buffer
// for it otherwise). The pieces must not be modified until PutV returns.
func (p *Proxy) PutV(ctx context.Context, prio Priority, name string, body [][]byte, ifAbsent bool) error {
	r := p.newRequest(opPut, prio, name)
	r.pieces, r.ifAbsent = body, ifAbsent
	err := p.run(ctx, p.up, r)
	p.release(r)
	return err
}

// GetRange reads up to len(buf) bytes of name at off into buf (see
// store.Store.GetRange).
func (p *Proxy) GetRange(ctx context.Context, prio Priority, name string, off int64, buf []byte) (int, error) {
	return p.get(ctx, prio, name, off, buf, nil)
}

// get runs a GET into buf, or into bufs when they are not nil.
func (p *Proxy) get(ctx context.Context, prio Priority, name string, off int64, buf []byte, bufs [][]byte) (int, error) {
	r := p.newRequest(opGet, prio, name)
	r.off, r.buf, r.bufs = off, buf, bufs
	err := p.run(ctx, p.down, r)
	n := r.n
	p.release(r)
	return n, err
}

// Vectored reports whether the store reads a range into several buffers
// with one call (store.VectorReader): GetRangeV is then worth calling.
func (p *Proxy) Vectored() bool {
	_, ok := p.st.(store.VectorReader)
	return ok
}

// GetRangeV reads up to the total length of bufs of name at off into
// bufs in turn (see store.VectorReader). Without Vectored it fails.
func (p *Proxy) GetRangeV(ctx context.Context, prio Priority, name string, off int64, bufs [][]byte) (int, error) {
	if !p.Vectored() {
		return 0, fmt.Errorf("get %q: the store cannot read into several buffers", name)
	}
	return p.get(ctx, prio, name, off, nil, bufs)
}

// Delete removes name; it is served by the uploader pool, as it changes
// the bucket.
func (p *Proxy) Delete(ctx context.Context, prio Priority, name string) error {
	r := p.newRequest(opDelete, prio, name)
	err := p.run(ctx, p.up, r)
	p.release(r)
	return err
}

// Size returns the length of name; it is served by the downloader pool.
func (p *Proxy) Size(ctx context.Context, prio Priority, name string) (int64, error) {
	r := p.newRequest(opSize, prio, name)
	err := p.run(ctx, p.down, r)
	size := r.size
	p.release(r)
	return size, err
}

// List calls fn for every object whose name starts with prefix, in lexical
// order (see store.Store.List). The listing is done by the downloader pool
// and retried as a whole; fn runs on the caller's goroutine afterwards.
func (p *Proxy) List(ctx context.Context, prio Priority, prefix string, fn func(name string, size int64) error) error {
	r := p.newRequest(opList, prio, prefix)
	err := p.run(ctx, p.down, r)
	entries := r.listed
	r.listed = nil
	p.release(r)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := fn(e.name, e.size); err != nil {
			return err
		}
	}
	return nil
}

type listed struct {
	name string
	size int64
}

// Stats returns a snapshot of the counters.
func (p *Proxy) Stats() Stats {
	get := func(o op) OpStats {
		c := &p.stats[o]
		return OpStats{Attempts: c.attempts.Load(), Retries: c.retries.Load(), Failures: c.failures.Load()}
	}
	return Stats{Put: get(opPut), Get: get(opGet), Delete: get(opDelete), Size: get(opSize), List: get(opList)}
}

// Close stops both pools. Attempts in progress finish (their result is
// returned, but they are not retried); requests still queued or waiting
// for a retry return ErrClosed, as do all later calls. Close returns when
// every worker has stopped; calling it again does nothing.
func (p *Proxy) Close() {
	p.up.close()
	p.down.close()
}

func (p *Proxy) newRequest(o op, prio Priority, name string) *request {
	r := p.reqs.Get().(*request)
	r.op, r.prio, r.name = o, prio, name
	return r
}

// release returns r to the pool unless a queue or timer may still refer
// to it (it was abandoned or went through a retry).
func (p *Proxy) release(r *request) {
	if r.abandoned || r.retried {
		return
	}
	done := r.done
	*r = request{done: done}
	p.reqs.Put(r)
}

// run submits r to pl and waits for its result or for ctx to end.
func (p *Proxy) run(ctx context.Context, pl *pool, r *request) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s %q: %w", r.op, r.name, err)
	}
	r.ctx = ctx
	if !pl.submit(r) {
		return fmt.Errorf("%s %q: %w", r.op, r.name, ErrClosed)
	}
	select {
	case <-r.done:
		return r.err
	case <-ctx.Done():
	}
	attempts, lastErr, ok := pl.abandon(r)
	if !ok {
		// A worker holds r; its attempt runs under ctx, so it ends soon
		// and the worker will not retry a request whose context is done.
		<-r.done
		return r.err
	}
	if lastErr == nil {
		return fmt.Errorf("%s %q: %w", r.op, r.name, ctx.Err())
	}
	p.stats[r.op].failures.Add(1)
	return fmt.Errorf("%s %q: gave up after %d attempts: %w (last error: %w)", r.op, r.name, attempts, ctx.Err(), lastErr)
}

// final reports whether err is an answer that a retry cannot change.
// ErrCorrupt (a sealed object that fails its check) is final too: the
// stored bytes are damaged, and retrying without limit would hang the
// read instead of returning an I/O error (docs/ARCHITECTURE.md §16).
func final(err error) bool {
	return errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrCorrupt)
}

// call makes one store call for r.
func (p *Proxy) call(ctx context.Context, r *request) error {
	var err error
	switch r.op {
	case opPut:
		if r.pieces != nil {
			err = store.PutPieces(ctx, p.st, r.name, r.pieces, r.ifAbsent)
		} else {
			err = p.st.Put(ctx, r.name, r.body, r.ifAbsent)
		}
	case opGet:
		if r.bufs != nil {
			r.n, err = p.st.(store.VectorReader).GetRangeV(ctx, r.name, r.off, r.bufs)
		} else {
			r.n, err = p.st.GetRange(ctx, r.name, r.off, r.buf)
		}
	case opDelete:
		err = p.st.Delete(ctx, r.name)
	case opSize:
		r.size, err = p.st.Size(ctx, r.name)
	case opList:
		// Collected, not streamed: a retried listing must not call the
		// caller's function twice for the same name.
		r.listed = r.listed[:0]
		err = p.st.List(ctx, r.name, func(name string, size int64) error {
			r.listed = append(r.listed, listed{name, size})
			return nil
		})
	default:
		err = fmt.Errorf("unknown operation %d", r.op)
	}
	return err
}

// attempt runs one attempt of r on a worker and then either completes r or
// schedules its retry, which frees the worker for the delay.
func (p *Proxy) attempt(pl *pool, r *request) {
	c := &p.stats[r.op]
	if r.ctx.Err() != nil {
		p.giveUp(r, nil)
		return
	}
	r.attempt++
	c.attempts.Add(1)
	actx, cancel := context.WithTimeout(r.ctx, p.attemptTimeout(r))
	start := time.Now()
	pl.running.Add(1)
	err := p.call(actx, r)
	pl.running.Add(-1)
	p.observe(r, err, time.Since(start))
	cancel()
	if err == nil {
		complete(r, nil)
		return
	}
	if final(err) {
		if r.op == opPut && r.ifAbsent && r.attempt > 1 && errors.Is(err, store.ErrExists) && p.putLanded(r) {
			p.log.Info().Str("name", r.name).Int("attempt", r.attempt).Msg("conditional put found its own earlier attempt in the store (reply was lost)")
			complete(r, nil)
			return
		}
		complete(r, fmt.Errorf("%s %q: %w", r.op, r.name, err))
		return
	}
	if cerr := r.ctx.Err(); cerr != nil {
		// The caller gave up; the attempt's error is most likely just
		// that, so it is not a store failure of its own.
		if errors.Is(err, cerr) {
			err = nil
		}
		p.giveUp(r, err)
		return
	}
	if p.o.MaxAttempts > 0 && r.attempt >= p.o.MaxAttempts {
		c.failures.Add(1)
		p.log.Error().Str("op", r.op.String()).Str("name", r.name).Int("attempts", r.attempt).Err(err).Msg("object store request failed, giving up")
		complete(r, fmt.Errorf("%s %q: gave up after %d attempts: %w", r.op, r.name, r.attempt, err))
		return
	}
	attempt := r.attempt // once the retry is scheduled, another worker may own r
	delay := p.backoff(attempt)
	switch pl.retryLater(r, err, delay, func() { c.retries.Add(1) }) {
	case retryScheduled:
		p.log.Warn().Str("op", r.op.String()).Str("name", r.name).Int("attempt", attempt).Err(err).Dur("retry_in_ms", delay).Msg("object store request failed, will retry")
	case retryClosed:
		c.failures.Add(1)
		complete(r, fmt.Errorf("%s %q: %w (last error: %w)", r.op, r.name, ErrClosed, err))
	case retryCanceled:
		p.giveUp(r, err)
	}
}

// attemptTimeout is the time the current attempt of r may take (see
// Options.AttemptTimeout).
func (p *Proxy) attemptTimeout(r *request) time.Duration {
	var bytes int64
	switch r.op {
	case opList:
		return p.o.MaxAttemptTimeout
	case opPut:
		bytes = int64(r.putLen())
	case opGet:
		bytes = int64(len(r.buf))
		for _, b := range r.bufs {
			bytes += int64(len(b))
		}
	}
	return scaledTimeout(p.o.AttemptTimeout, bytes, p.o.MinRate, r.attempt, p.o.MaxAttemptTimeout)
}

// scaledTimeout is (base + bytes/rate) * 2^(attempt-1), capped at limit.
func scaledTimeout(base time.Duration, bytes, rate int64, attempt int, limit time.Duration) time.Duration {
	t := base + time.Duration(float64(bytes)/float64(rate)*float64(time.Second))
	for i := 1; i < attempt && t < limit; i++ {
		t *= 2
	}
	return min(t, limit)
}

// putLanded reports whether the object under r.name is byte-identical to
// r.body. A conditional put whose earlier attempt took effect but whose
// reply was lost (connection reset, attempt timeout) finds its own object
// on retry and gets ErrExists; that must not look like a second writer.
func (p *Proxy) putLanded(r *request) bool {
	ctx, cancel := context.WithTimeout(r.ctx, p.attemptTimeout(r))
	defer cancel()
	size, err := p.st.Size(ctx, r.name)
	if err != nil || size != int64(r.putLen()) {
		return false
	}
	buf := make([]byte, r.putLen())
	n, err := p.st.GetRange(ctx, r.name, 0, buf)
	if err != nil || n != len(buf) {
		return false
	}
	if r.pieces != nil {
		return bytes.Equal(buf, store.Join(r.pieces))
	}
	return bytes.Equal(buf, r.body)
}

// giveUp completes r because its context ended; attemptErr is the error of
// the attempt just made, or nil if there was none (or it only reflects the
// cancellation).
func (p *Proxy) giveUp(r *request, attemptErr error) {
	cerr := r.ctx.Err()
	last := attemptErr
	if last == nil {
		last = r.lastErr
	}
	if last == nil {
		complete(r, fmt.Errorf("%s %q: %w", r.op, r.name, cerr))
		return
	}
	p.stats[r.op].failures.Add(1)
	complete(r, fmt.Errorf("%s %q: gave up after %d attempts: %w (last error: %w)", r.op, r.name, r.attempt, cerr, last))
}

// closeFailed completes a request that Close took out of a queue or a
// retry wait.
func (p *Proxy) closeFailed(r *request) {
	if r.lastErr == nil {
		complete(r, fmt.Errorf("%s %q: %w", r.op, r.name, ErrClosed))
		return
	}
	p.stats[r.op].failures.Add(1)
	complete(r, fmt.Errorf("%s %q: %w after %d attempts (last error: %w)", r.op, r.name, ErrClosed, r.attempt, r.lastErr))
}
