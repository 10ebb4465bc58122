// Package faulty wraps a store.Store and injects faults by rule: errors,
// delays, dropped writes and lost acknowledgements, on chosen operations
// and names. Recovery, GC and object proxy tests use it to reproduce S3
// outages deterministically.
//
// It owns only the decision of which call misbehaves and how; it must never
// change the data of calls that no rule matches, and it is for tests only.
package faulty

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/bs3/bs3/internal/store"
)

// ErrInjected is a ready-made error for rules: a transient failure that is
// none of the store's sentinel errors, like a 5xx or a reset connection.
var ErrInjected = errors.New("injected fault")

// Op names a store.Store method.
type Op int

// The operations a rule can select.
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

// Rule says which calls misbehave and how. A call is matched against the
// rules in the order they were added; the first matching rule that has
// firings left fires, and only that one. When a rule fires:
//
//  1. Delay is waited first (cut short by the call's context, whose error
//     is then returned).
//  2. Drop (Put and Delete only): success is reported without calling the
//     wrapped store.
//  3. After: the wrapped store is called; if it succeeds, Err is returned
//     anyway, as when the reply is lost after the request took effect.
//  4. Otherwise, if Err is set, it is returned without calling the wrapped
//     store; if not, the call goes through (a delay-only rule).
type Rule struct {
	Ops   []Op                   // operations the rule applies to; empty = all
	Match func(name string) bool // names it applies to (List: the prefix); nil = all
	Err   error                  // error to return
	Delay time.Duration          // wait before acting
	Drop  bool                   // Put/Delete: report success without doing it
	After bool                   // call through, then return Err (lost ack)
	Count int                    // fire this many times, then stop matching; 0 = forever
}

type rule struct {
	Rule
	left int // remaining firings when Count > 0
}

// Store is a fault-injecting store.Store wrapper. Safe for concurrent use.
type Store struct {
	s store.Store

	mu    sync.Mutex
	rules []*rule
	fired int
}

var _ store.Store = (*Store)(nil)

// New wraps s. With no rules it behaves exactly like s.
func New(s store.Store) *Store {
	return &Store{s: s}
}

// Add installs r after the existing rules and returns a function that
// removes it again.
func (f *Store) Add(r Rule) (remove func()) {
	nr := &rule{Rule: r, left: r.Count}
	f.mu.Lock()
	f.rules = append(f.rules, nr)
	f.mu.Unlock()
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.rules = slices.DeleteFunc(f.rules, func(x *rule) bool { return x == nr })
	}
}

// Fired returns how many times rules have fired in total.
func (f *Store) Fired() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fired
}

// pick returns the rule that fires for this call, or nil, and accounts for
// the firing.
func (f *Store) pick(op Op, name string) *Rule {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range f.rules {
		if len(r.Ops) > 0 && !slices.Contains(r.Ops, op) {
			continue
		}
		if r.Match != nil && !r.Match(name) {
			continue
		}
		if r.Count > 0 {
			if r.left == 0 {
				continue
			}
			r.left--
		}
		f.fired++
		c := r.Rule
		return &c
	}
	return nil
}

// do runs call under the rule (if any) that fires for (op, name).
func (f *Store) do(ctx context.Context, op Op, name string, call func() error) error {
	r := f.pick(op, name)
	if r == nil {
		return call()
	}
	if r.Delay > 0 {
		t := time.NewTimer(r.Delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("faulty %s %q: delayed: %w", op, name, ctx.Err())
		}
	}
	switch {
	case r.Drop && (op == OpPut || op == OpDelete):
		return nil
	case r.After:
		if err := call(); err != nil {
			return err
		}
		if r.Err != nil {
			return fmt.Errorf("faulty %s %q (done, reply lost): %w", op, name, r.Err)
		}
		return nil
	case r.Err != nil:
		return fmt.Errorf("faulty %s %q: %w", op, name, r.Err)
	}
	return call()
}

// Put implements store.Store.
func (f *Store) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	return f.do(ctx, OpPut, name, func() error { return f.s.Put(ctx, name, body, ifAbsent) })
}

// PutV implements store.VectorWriter, with the rules of Put.
func (f *Store) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	return f.do(ctx, OpPut, name, func() error { return store.PutPieces(ctx, f.s, name, body, ifAbsent) })
}

// GetRange implements store.Store.
func (f *Store) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	var n int
	err := f.do(ctx, OpGet, name, func() error {
		var err error
		n, err = f.s.GetRange(ctx, name, off, buf)
		return err
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// Size implements store.Store.
func (f *Store) Size(ctx context.Context, name string) (int64, error) {
	var size int64
	err := f.do(ctx, OpSize, name, func() error {
		var err error
		size, err = f.s.Size(ctx, name)
		return err
	})
	if err != nil {
		return 0, err
	}
	return size, nil
}

// List implements store.Store. Rules match on the prefix.
func (f *Store) List(ctx context.Context, prefix string, fn func(name string, size int64) error) error {
	return f.do(ctx, OpList, prefix, func() error { return f.s.List(ctx, prefix, fn) })
}

// Delete implements store.Store.
func (f *Store) Delete(ctx context.Context, name string) error {
	return f.do(ctx, OpDelete, name, func() error { return f.s.Delete(ctx, name) })
}
