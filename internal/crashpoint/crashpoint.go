// Package crashpoint is a store.Store wrapper that simulates the machine
// of an engine dying at an exact store call, in the style of Pebble's
// errorfs and FoundationDB's simulation: the calls through one wrapper
// instance are numbered in the order they enter it, and call number At is
// the crash point. That call either reaches the wrapped store (its effect
// lands, its reply is lost: the nasty case) or not, as Options.Applied
// says, and returns ErrCrashed. From then on every call through this
// instance fails at once with ErrCrashed and never reaches the wrapped
// store, so whatever goroutines of the crashed engine still run cannot
// change the bucket after the crash point.
//
// Calls numbered before the crash point that are still inside the wrapped
// store when it happens are requests already on the wire: they complete
// (and may land) after it. Wait returns once none is left, so a test that
// waits for it sees the bucket exactly as the crash left it. A fresh
// wrapper over the same wrapped store is the restarted machine.
//
// With At = 0 the wrapper never crashes and only counts: a clean run's
// Count is the range of crash points a test has to cover. The global
// number of a call depends on how the engine's goroutines were scheduled;
// a call's Nth (its rank among the calls of the same operation on the
// same name) much less, so Match can crash at "the 2nd Put of key 27"
// to replay a crash found by number, and Order can make the calls of a
// recorded run (its Trace) happen in the recorded order again.
//
// It owns only the numbering and the crash; it never changes the data or
// the result of a call before the crash point, and it is for tests only.
package crashpoint

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bs3/bs3/internal/store"
)

// ErrCrashed is returned by the call at the crash point and by every call
// after it. It is none of the store's sentinel errors: to the engine it
// looks like a transient failure, as a dead network would.
var ErrCrashed = errors.New("crashpoint: the machine crashed")

// Op names a store.Store method.
type Op int

// The store operations.
const (
	OpPut Op = iota
	OpGet
	OpSize
	OpList
	OpDelete
)

func (o Op) String() string {
	switch o {
	case OpPut:
		return "put"
	case OpGet:
		return "get"
	case OpSize:
		return "size"
	case OpList:
		return "list"
	case OpDelete:
		return "delete"
	}
	return fmt.Sprintf("op(%d)", int(o))
}

// Mutating reports whether the operation can change the bucket.
func (o Op) Mutating() bool { return o == OpPut || o == OpDelete }

// Call describes one call through the wrapper.
type Call struct {
	N        int64  // its number: 1 for the first call
	Op       Op     // the method
	Name     string // the object name (List: the prefix)
	IfAbsent bool   // Put only: conditional
	// Nth is how many calls of the same Op on the same Name entered the
	// wrapper up to this one, this one included.
	Nth int64
}

func (c Call) String() string {
	s := fmt.Sprintf("call %d: %s %q", c.N, c.Op, c.Name)
	if c.IfAbsent {
		s += " if-absent"
	}
	if c.Nth > 1 {
		s += fmt.Sprintf(" (#%d)", c.Nth)
	}
	return s
}

// Key identifies a call independently of its global number: operation,
// name and rank (see Call.Nth), as "put:00000007/00000000#2". ParseKey
// reads it back.
func (c Call) Key() string { return fmt.Sprintf("%s:%s#%d", c.Op, c.Name, c.Nth) }

// ParseKey returns a Match function for a key made by Call.Key.
func ParseKey(key string) (func(Call) bool, error) {
	opName, rest, ok := strings.Cut(key, ":")
	i := strings.LastIndexByte(rest, '#')
	if !ok || i < 0 {
		return nil, fmt.Errorf("crashpoint: call key %q: want op:name#n", key)
	}
	nth, err := strconv.ParseInt(rest[i+1:], 10, 64)
	if err != nil {
		return nil, fmt.Errorf("crashpoint: call key %q: rank: %w", key, err)
	}
	if nth < 1 {
		return nil, fmt.Errorf("crashpoint: call key %q: rank %d, want 1 or more", key, nth)
	}
	name := rest[:i]
	for op := OpPut; op <= OpDelete; op++ {
		if op.String() == opName {
			return func(c Call) bool { return c.Op == op && c.Name == name && c.Nth == nth }, nil
		}
	}
	return nil, fmt.Errorf("crashpoint: call key %q: unknown operation %q", key, opName)
}

// Options choose the crash point.
type Options struct {
	// At is the number of the call at which the machine crashes (the
	// first call is 1); 0 never crashes.
	At int64
	// Match, if set, replaces At: the crash point is the first call for
	// which it returns true. It runs under the wrapper's lock.
	Match func(Call) bool
	// Applied: the crash call reaches the wrapped store before the
	// crash, and its reply is lost. Otherwise it never reaches it.
	Applied bool
	// Trace keeps a description of every call (see Trace).
	Trace bool
	// Order, if set, lists the keys (Call.Key) of the first calls of a
	// recorded run, in the order they were made, to replay it: a listed
	// call waits until every call listed before it has been made, and a
	// call not listed until all listed calls have been (in the recorded
	// run it came later). When no listed call comes for OrderWait
	// (default 200 ms; the run went another way), the order is given up
	// for the rest of the run (see OrderAbandoned).
	Order     []string
	OrderWait time.Duration
	// OnCrash, if set, is called once with the crash call, on the
	// goroutine that made it, before the call goes on (to the wrapped
	// store when Applied) and returns: a test can note what its engine
	// was doing at that moment. It must not call the Store.
	OnCrash func(Call)
}

// Store is the crash-injecting wrapper. Safe for concurrent use.
type Store struct {
	inner store.Store
	o     Options

	mu       sync.Mutex
	idle     *sync.Cond // signalled when inside drops to 0
	n        int64      // calls numbered so far
	inside   int        // calls admitted and not yet back from the inner store
	crashed  bool
	crashCh  chan struct{}
	at       Call // the call the crash landed on (N == 0: a Crash call)
	applied  bool // whether that call reached the inner store
	trace    []Call
	rejected int64 // calls failed because of the crash, the crash call included
	nth      map[nthKey]int64

	// Replay of a recorded order (Options.Order).
	order     map[string]int // key → position
	next      int            // position of the next listed call due
	turn      *sync.Cond     // signalled when next moves or the order ends
	orderGone bool           // the order was given up
}

type nthKey struct {
	op   Op
	name string
}

var _ store.Store = (*Store)(nil)

// New wraps inner with the crash point o.
func New(inner store.Store, o Options) *Store {
	s := &Store{inner: inner, o: o, crashCh: make(chan struct{}), nth: make(map[nthKey]int64)}
	s.idle = sync.NewCond(&s.mu)
	s.turn = sync.NewCond(&s.mu)
	if len(o.Order) > 0 {
		if s.o.OrderWait <= 0 {
			s.o.OrderWait = 200 * time.Millisecond
		}
		s.order = make(map[string]int, len(o.Order))
		for i, k := range o.Order {
			if _, dup := s.order[k]; !dup {
				s.order[k] = i
			}
		}
	}
	return s
}

// admission is what enter decided for one call.
type admission int

const (
	admitted  admission = iota // call the inner store
	crashCall                  // the crash point: call it if Applied, then fail
	rejected                   // after the crash: fail at once
)

// enter numbers a call and decides its fate. Numbering, the crash
// decision and the count of calls inside the inner store change under one
// lock, so once the crash is visible every call numbered before it is
// already counted by Wait.
func (s *Store) enter(op Op, name string, ifAbsent bool) (Call, admission) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := nthKey{op, name}
	s.nth[k]++
	c := Call{Op: op, Name: name, IfAbsent: ifAbsent, Nth: s.nth[k]}
	s.waitTurnLocked(c)
	s.n++
	c.N = s.n
	if s.o.Trace {
		s.trace = append(s.trace, c)
	}
	if s.crashed {
		s.rejected++
		return c, rejected
	}
	if (s.o.Match == nil && s.o.At > 0 && c.N == s.o.At) || (s.o.Match != nil && s.o.Match(c)) {
		s.crashed = true
		s.at, s.applied = c, s.o.Applied
		s.rejected++
		close(s.crashCh)
		s.turn.Broadcast()
		if s.o.Applied {
			s.inside++
		}
		return c, crashCall
	}
	s.inside++
	return c, admitted
}

// waitTurnLocked holds a call listed in Options.Order until every call
// listed before it has been made, the order is given up, or the machine
// crashed (then the call fails at once anyway).
func (s *Store) waitTurnLocked(c Call) {
	if s.order == nil {
		return
	}
	pos, listed := s.order[c.Key()]
	if !listed {
		pos = len(s.o.Order)
	}
	for s.next < pos && !s.orderGone && !s.crashed {
		at := s.next
		t := time.AfterFunc(s.o.OrderWait, func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.next == at {
				s.orderGone = true
			}
			s.turn.Broadcast()
		})
		s.turn.Wait()
		t.Stop()
	}
	if listed && pos >= s.next {
		s.next = pos + 1
		s.turn.Broadcast()
	}
}

// OrderAbandoned reports whether the replay of Options.Order was given
// up because a listed call did not come.
func (s *Store) OrderAbandoned() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.orderGone
}

// leave ends a call that entered the inner store.
func (s *Store) leave() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inside--
	if s.inside == 0 {
		s.idle.Broadcast()
	}
}

// do runs one call under the crash rules.
func (s *Store) do(op Op, name string, ifAbsent bool, call func() error) error {
	c, a := s.enter(op, name, ifAbsent)
	switch a {
	case rejected:
		return fmt.Errorf("crashpoint: %s: %w", c, ErrCrashed)
	case crashCall:
		if s.o.OnCrash != nil {
			s.o.OnCrash(c)
		}
		if !s.o.Applied {
			return fmt.Errorf("crashpoint: %s (crash point, not applied): %w", c, ErrCrashed)
		}
		err := call()
		s.leave()
		if err != nil {
			return fmt.Errorf("crashpoint: %s (crash point, applied with error %v, reply lost): %w", c, err, ErrCrashed)
		}
		return fmt.Errorf("crashpoint: %s (crash point, applied, reply lost): %w", c, ErrCrashed)
	}
	defer s.leave()
	return call()
}

// Put implements store.Store.
func (s *Store) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	return s.do(OpPut, name, ifAbsent, func() error { return s.inner.Put(ctx, name, body, ifAbsent) })
}

// PutV implements store.VectorWriter, with the crash points of Put.
func (s *Store) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	return s.do(OpPut, name, ifAbsent, func() error { return store.PutPieces(ctx, s.inner, name, body, ifAbsent) })
}

// GetRange implements store.Store.
func (s *Store) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	var n int
	err := s.do(OpGet, name, false, func() error {
		var err error
		n, err = s.inner.GetRange(ctx, name, off, buf)
		return err
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// Size implements store.Store.
func (s *Store) Size(ctx context.Context, name string) (int64, error) {
	var size int64
	err := s.do(OpSize, name, false, func() error {
		var err error
		size, err = s.inner.Size(ctx, name)
		return err
	})
	if err != nil {
		return 0, err
	}
	return size, nil
}

// List implements store.Store. The listing is one call; fn runs inside it.
func (s *Store) List(ctx context.Context, prefix string, fn func(name string, size int64) error) error {
	return s.do(OpList, prefix, false, func() error { return s.inner.List(ctx, prefix, fn) })
}

// Delete implements store.Store.
func (s *Store) Delete(ctx context.Context, name string) error {
	return s.do(OpDelete, name, false, func() error { return s.inner.Delete(ctx, name) })
}

// Crash crashes the machine now, between calls: every later call fails
// with ErrCrashed. It does nothing after a crash.
func (s *Store) Crash() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.crashed {
		s.crashed = true
		close(s.crashCh)
		s.turn.Broadcast()
	}
}

// Crashed is closed when the crash happens.
func (s *Store) Crashed() <-chan struct{} { return s.crashCh }

// IsCrashed reports whether the crash has happened.
func (s *Store) IsCrashed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.crashed
}

// CrashPoint returns the call the crash landed on and whether it reached
// the wrapped store; ok is false before the crash and after a crash by
// Crash.
func (s *Store) CrashPoint() (c Call, applied, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.at, s.applied, s.at.N > 0
}

// Count returns how many calls have entered the wrapper, failed ones
// included.
func (s *Store) Count() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// Rejected returns how many calls failed because of the crash, the call
// at the crash point included.
func (s *Store) Rejected() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rejected
}

// Trace returns the calls made so far, in the order they were numbered
// (empty unless Options.Trace).
func (s *Store) Trace() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.trace...)
}

// Wait returns once no call of this wrapper is inside the wrapped store.
// After the crash no call enters it any more, so from then on the bucket
// no longer changes through this wrapper.
func (s *Store) Wait() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.inside > 0 {
		s.idle.Wait()
	}
}
