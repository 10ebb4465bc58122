package objproxy

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bs3/bs3/internal/store"
)

// reqState is where a request is; it is guarded by its pool's mutex.
type reqState uint8

const (
	stateQueued    reqState = iota // in the high or low queue
	stateRunning                   // a worker is making an attempt
	stateWaiting                   // a timer will re-queue it after the backoff delay
	stateAbandoned                 // the caller's context ended while it was queued or waiting
)

// request is one call in flight. The caller allocates it (from a sync.Pool)
// and waits on done; at most one worker touches it at a time.
type request struct {
	op       op
	prio     Priority
	ctx      context.Context
	name     string
	body     []byte
	pieces   [][]byte // PutV's, instead of body
	ifAbsent bool
	off      int64
	buf      []byte
	bufs     [][]byte // GetRangeV's, instead of buf

	// Results, written by the worker before it signals done.
	n      int
	size   int64
	listed []listed
	err    error

	// Retry bookkeeping; state, lastErr and timer are guarded by the
	// pool's mutex.
	state     reqState
	attempt   int
	lastErr   error
	timer     *time.Timer
	retried   bool // a timer was created for it: never reuse
	abandoned bool // a queue may still hold it: never reuse

	done chan struct{} // buffered 1, reused with the request
}

// putLen is the length of a Put's body.
func (r *request) putLen() int {
	if r.pieces != nil {
		return store.PiecesLen(r.pieces)
	}
	return len(r.body)
}

// complete hands the result to the waiting caller. The worker must not
// touch r afterwards: the caller may reuse it at once.
func complete(r *request, err error) {
	r.err = err
	r.done <- struct{}{}
}

// pool is a set of workers serving a high and a low queue. A mutex-guarded
// pair of queues (rather than two channels and select, which picks at
// random among ready cases) guarantees that a queued high request is always
// taken first.
type pool struct {
	p       *Proxy
	mu      sync.Mutex
	work    sync.Cond // signalled when a request is queued or the pool closes
	high    ring
	low     ring
	waiting map[*request]struct{} // requests whose retry timer is pending
	closed  bool
	wg      sync.WaitGroup

	// For PoolStats: the pool size, the store calls in progress, and per
	// queue (index: priority) the abandoned requests it still holds.
	workers int
	running atomic.Int64
	stale   [2]int
}

// queueIndex is the index in stale of the queue prio waits in.
func queueIndex(prio Priority) int {
	if prio >= High {
		return int(High)
	}
	return int(Low)
}

func newPool(p *Proxy, workers int) *pool {
	pl := &pool{p: p, waiting: make(map[*request]struct{}), workers: workers}
	pl.work.L = &pl.mu
	pl.wg.Add(workers)
	for range workers {
		go pl.worker()
	}
	return pl
}

func (pl *pool) worker() {
	defer pl.wg.Done()
	for {
		r := pl.next()
		if r == nil {
			return
		}
		pl.p.attempt(pl, r)
	}
}

// next blocks until a request is queued and takes it, high queue first;
// it returns nil once the pool is closed and the queues are empty.
func (pl *pool) next() *request {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for {
		r := pl.high.pop()
		if r == nil {
			r = pl.low.pop()
		}
		if r != nil {
			if r.state == stateAbandoned {
				pl.stale[queueIndex(r.prio)]--
				continue // its caller is gone; skipped lazily
			}
			r.state = stateRunning
			return r
		}
		if pl.closed {
			return nil
		}
		pl.work.Wait()
	}
}

// enqueue adds r to its queue; the caller holds pl.mu.
func (pl *pool) enqueue(r *request) {
	r.state = stateQueued
	if r.prio >= High {
		pl.high.push(r)
	} else {
		pl.low.push(r)
	}
	pl.work.Signal()
}

// submit queues a new request; false if the pool is closed.
func (pl *pool) submit(r *request) bool {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.closed {
		return false
	}
	pl.enqueue(r)
	return true
}

// abandon withdraws r for a caller whose context ended. ok is false when a
// worker is making an attempt on r (or has finished it): the caller must
// then wait for done. Otherwise r will never run again, and attempts and
// lastErr describe what was tried so far.
func (pl *pool) abandon(r *request) (attempts int, lastErr error, ok bool) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	switch r.state {
	case stateQueued:
		// Left in its queue and skipped by next: removing it from the
		// middle of a ring is not worth it.
		pl.stale[queueIndex(r.prio)]++
	case stateWaiting:
		r.timer.Stop()
		delete(pl.waiting, r)
	default:
		return 0, nil, false
	}
	r.state = stateAbandoned
	r.abandoned = true
	return r.attempt, r.lastErr, true
}

type retryOutcome uint8

const (
	retryScheduled retryOutcome = iota
	retryClosed                 // the pool closed; complete r with ErrClosed
	retryCanceled               // the caller's context ended; complete r
)

// retryLater parks a running request for delay and re-queues it then,
// without holding a worker. Checking the context under the mutex closes
// the race with abandon: either abandon sees stateWaiting and withdraws r,
// or this sees the context done. scheduled runs once the retry is
// certain, before it can run (it counts it).
func (pl *pool) retryLater(r *request, err error, delay time.Duration, scheduled func()) retryOutcome {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.closed {
		return retryClosed
	}
	if r.ctx.Err() != nil {
		return retryCanceled
	}
	// Before the timer can fire: the retry may complete r on another
	// worker before retryLater's caller runs again, and whoever waits
	// for r must then find the retry counted.
	scheduled()
	r.state = stateWaiting
	r.lastErr = err
	r.retried = true
	pl.waiting[r] = struct{}{}
	r.timer = time.AfterFunc(delay, func() { pl.requeue(r) })
	return retryScheduled
}

// requeue runs when r's backoff delay is over.
func (pl *pool) requeue(r *request) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if r.state != stateWaiting || pl.closed {
		return // abandoned, or completed by close
	}
	delete(pl.waiting, r)
	pl.enqueue(r)
}

// close fails queued and waiting requests with ErrClosed, lets attempts in
// progress finish and waits for the workers to exit.
func (pl *pool) close() {
	pl.mu.Lock()
	if pl.closed {
		pl.mu.Unlock()
		pl.wg.Wait()
		return
	}
	pl.closed = true
	var failed []*request
	for _, q := range []*ring{&pl.high, &pl.low} {
		for r := q.pop(); r != nil; r = q.pop() {
			if r.state != stateAbandoned {
				failed = append(failed, r)
			}
		}
	}
	for r := range pl.waiting {
		r.timer.Stop()
		failed = append(failed, r)
	}
	clear(pl.waiting)
	pl.stale = [2]int{}
	for _, r := range failed {
		r.state = stateRunning // owned by close now; requeue and abandon leave it alone
	}
	pl.work.Broadcast()
	pl.mu.Unlock()

	for _, r := range failed {
		pl.p.closeFailed(r)
	}
	pl.wg.Wait()
}

// ring is a growable FIFO of requests.
type ring struct {
	buf        []*request
	head, size int
}

func (q *ring) push(r *request) {
	if q.size == len(q.buf) {
		n := make([]*request, max(16, 2*len(q.buf)))
		for i := range q.size {
			n[i] = q.buf[(q.head+i)%len(q.buf)]
		}
		q.buf, q.head = n, 0
	}
	q.buf[(q.head+q.size)%len(q.buf)] = r
	q.size++
}

func (q *ring) pop() *request {
	if q.size == 0 {
		return nil
	}
	r := q.buf[q.head]
	q.buf[q.head] = nil
	q.head = (q.head + 1) % len(q.buf)
	q.size--
	return r
}

func (q *ring) len() int { return q.size }
