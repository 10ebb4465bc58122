// Package mapproxy owns a volume's extent map: one goroutine runs every
// access to it, so the map itself needs no locks, and it decides the order
// of accesses by priority. User reads and writes (High) go before queued
// background work (Low: GC scans, checkpoint serialization); a Low request
// that has waited idleTimeout runs even under constant user load, so
// background work is delayed, never starved.
//
// It never touches the map outside its goroutine, never does I/O and never
// blocks on anything but its queues: a request's function must be short
// (background work splits itself into steps, e.g. gc.step blocks per
// request) and must not call Do (it would wait for itself).
package mapproxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bs3/bs3/internal/extentmap"
)

// Priority orders requests.
type Priority int

const (
	// Low is for background work: GC scans, checkpoint serialization,
	// metrics. It runs when no High request is pending, or once it has
	// waited the idle timeout.
	Low Priority = iota
	// High is for user I/O: lookups of reads, updates of applied writes.
	High
)

func (p Priority) String() string {
	switch p {
	case Low:
		return "low"
	case High:
		return "high"
	}
	return fmt.Sprintf("Priority(%d)", int(p))
}

// ErrClosed is returned by Do after Close.
var ErrClosed = errors.New("mapproxy: closed")

// Request states; the owner and a cancelling caller race on queued.
const (
	queued int32 = iota
	started
	cancelled
)

type request struct {
	fn    func(*extentmap.Map)
	enq   time.Time // when a Low request was queued
	state atomic.Int32
	done  chan struct{} // receives once fn has run; reused with the request
}

// Proxy serializes and prioritizes access to one extent map.
type Proxy struct {
	m    *extentmap.Map
	idle time.Duration
	now  func() time.Time // the clock; replaced in tests

	mu     sync.Mutex
	high   queue
	low    queue
	closed bool

	wake   chan struct{} // capacity 1: "there may be work"
	exited chan struct{}
	pool   sync.Pool
}

// New starts the goroutine that owns m from now on; the caller must not
// touch m except through Do. idleTimeout is how long a Low request may be
// overtaken by High ones (gc.idle_timeout).
func New(m *extentmap.Map, idleTimeout time.Duration) *Proxy {
	return newProxy(m, idleTimeout, time.Now)
}

func newProxy(m *extentmap.Map, idleTimeout time.Duration, now func() time.Time) *Proxy {
	p := &Proxy{
		m:      m,
		idle:   idleTimeout,
		now:    now,
		wake:   make(chan struct{}, 1),
		exited: make(chan struct{}),
	}
	p.pool.New = func() any { return &request{done: make(chan struct{}, 1)} }
	go p.run()
	return p
}

// Do runs fn on the owner goroutine, which passes it the map, and returns
// once fn has run. If ctx is done before fn started, Do returns ctx.Err()
// and fn never runs; once fn has started, Do waits for it and returns nil.
// After Close, Do returns ErrClosed. fn must not keep the map or anything
// it returns that aliases the map's memory, and must not call Do.
func (p *Proxy) Do(ctx context.Context, prio Priority, fn func(m *extentmap.Map)) error {
	if prio != High && prio != Low {
		return fmt.Errorf("mapproxy: unknown priority %v", prio)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	r := p.pool.Get().(*request)
	r.fn = fn
	r.state.Store(queued)
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		r.fn = nil
		p.pool.Put(r)
		return ErrClosed
	}
	if prio == High {
		p.high.push(r)
	} else {
		r.enq = p.now()
		p.low.push(r)
	}
	p.mu.Unlock()
	p.signal()

	select {
	case <-r.done:
	case <-ctx.Done():
		if r.state.CompareAndSwap(queued, cancelled) {
			// The owner will find it cancelled and recycle it.
			return ctx.Err()
		}
		<-r.done // already running: wait, as promised
	}
	r.fn = nil
	p.pool.Put(r)
	return nil
}

// Pending returns the number of queued requests (including cancelled ones
// not yet dropped) per priority, for metrics and tests.
func (p *Proxy) Pending() (high, low int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.high.n, p.low.n
}

// Close serves every request already queued, then stops the owner
// goroutine and returns. Do calls after Close return ErrClosed. Close may
// be called more than once.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.signal()
	<-p.exited
}

func (p *Proxy) signal() {
	select {
	case p.wake <- struct{}{}:
	default: // a wake-up is already pending
	}
}

// next picks the request to run, or nil. Called with mu held.
func (p *Proxy) next() *request {
	if p.low.n > 0 && (p.high.n == 0 || p.now().Sub(p.low.peek().enq) >= p.idle) {
		return p.low.pop()
	}
	if p.high.n > 0 {
		return p.high.pop()
	}
	return nil
}

func (p *Proxy) run() {
	defer close(p.exited)
	for {
		p.mu.Lock()
		r := p.next()
		if r == nil {
			closed := p.closed
			p.mu.Unlock()
			if closed {
				return
			}
			<-p.wake
			continue
		}
		p.mu.Unlock()
		if !r.state.CompareAndSwap(queued, started) {
			r.fn = nil // cancelled: its caller has left
			p.pool.Put(r)
			continue
		}
		r.fn(p.m)
		r.done <- struct{}{} // the caller owns r from here
	}
}

// queue is a FIFO ring of requests.
type queue struct {
	buf  []*request
	head int
	n    int
}

func (q *queue) push(r *request) {
	if q.n == len(q.buf) {
		nb := make([]*request, max(16, 2*len(q.buf)))
		for i := 0; i < q.n; i++ {
			nb[i] = q.buf[(q.head+i)%len(q.buf)]
		}
		q.buf, q.head = nb, 0
	}
	q.buf[(q.head+q.n)%len(q.buf)] = r
	q.n++
}

func (q *queue) peek() *request { return q.buf[q.head] }

func (q *queue) pop() *request {
	r := q.buf[q.head]
	q.buf[q.head] = nil
	q.head = (q.head + 1) % len(q.buf)
	q.n--
	return r
}
