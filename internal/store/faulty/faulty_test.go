package faulty_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/storetest"
)

var errBoom = errors.New("boom")

func TestConformanceWithoutFaults(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		f := faulty.New(mem.New())
		// A rule that never matches must not change anything.
		f.Add(faulty.Rule{Match: func(string) bool { return false }, Err: errBoom})
		return f
	})
}

func setup(t *testing.T) (*mem.Store, *faulty.Store, context.Context) {
	m := mem.New()
	return m, faulty.New(m), context.Background()
}

func exists(t *testing.T, m *mem.Store, name string) bool {
	t.Helper()
	_, err := m.Size(context.Background(), name)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

func TestErrByOpAndName(t *testing.T) {
	m, f, ctx := setup(t)
	f.Add(faulty.Rule{
		Ops:   []faulty.Op{faulty.OpPut},
		Match: func(n string) bool { return strings.HasPrefix(n, "bad") },
		Err:   errBoom,
	})
	if err := f.Put(ctx, "bad1", []byte("x"), false); !errors.Is(err, errBoom) {
		t.Fatalf("Put(bad1) = %v, want errBoom", err)
	}
	if exists(t, m, "bad1") {
		t.Error("a failed Put reached the wrapped store")
	}
	if err := f.Put(ctx, "good", []byte("x"), false); err != nil {
		t.Fatalf("Put(good) = %v", err)
	}
	// Other operations on the matching name are untouched.
	if err := m.Put(ctx, "bad2", []byte("yz"), false); err != nil {
		t.Fatal(err)
	}
	if n, err := f.Size(ctx, "bad2"); err != nil || n != 2 {
		t.Errorf("Size(bad2) = %d, %v; rule for Put affected Size", n, err)
	}
	if f.Fired() != 1 {
		t.Errorf("Fired = %d, want 1", f.Fired())
	}
}

func TestEveryOp(t *testing.T) {
	m, f, ctx := setup(t)
	if err := m.Put(ctx, "o", []byte("data"), false); err != nil {
		t.Fatal(err)
	}
	f.Add(faulty.Rule{Err: errBoom}) // all ops, all names
	if err := f.Put(ctx, "p", nil, false); !errors.Is(err, errBoom) {
		t.Errorf("Put: %v", err)
	}
	if n, err := f.GetRange(ctx, "o", 0, make([]byte, 4)); !errors.Is(err, errBoom) || n != 0 {
		t.Errorf("GetRange: %d, %v", n, err)
	}
	if _, err := f.Size(ctx, "o"); !errors.Is(err, errBoom) {
		t.Errorf("Size: %v", err)
	}
	called := false
	if err := f.List(ctx, "", func(string, int64) error { called = true; return nil }); !errors.Is(err, errBoom) || called {
		t.Errorf("List: %v, callback called %v", err, called)
	}
	if err := f.Delete(ctx, "o"); !errors.Is(err, errBoom) {
		t.Errorf("Delete: %v", err)
	}
	if !exists(t, m, "o") {
		t.Error("a failed Delete reached the wrapped store")
	}
	if f.Fired() != 5 {
		t.Errorf("Fired = %d, want 5", f.Fired())
	}
}

func TestCountAndRemove(t *testing.T) {
	_, f, ctx := setup(t)
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Err: errBoom, Count: 2})
	var failed int
	for i := range 5 {
		if err := f.Put(ctx, fmt.Sprint(i), nil, false); errors.Is(err, errBoom) {
			failed++
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if failed != 2 || f.Fired() != 2 {
		t.Errorf("failed %d Puts, Fired %d; want 2 and 2", failed, f.Fired())
	}

	remove := f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpSize}, Err: errBoom})
	if _, err := f.Size(ctx, "4"); !errors.Is(err, errBoom) {
		t.Fatalf("Size before remove: %v", err)
	}
	remove()
	if _, err := f.Size(ctx, "4"); err != nil { // Put "4" went through once the count ran out
		t.Fatalf("Size after remove: %v", err)
	}
}

func TestCountUnderConcurrency(t *testing.T) {
	m, f, ctx := setup(t)
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Err: errBoom, Count: 5})
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	for i := range 50 {
		wg.Go(func() {
			err := f.Put(ctx, fmt.Sprint(i), []byte{1}, false)
			if errors.Is(err, errBoom) {
				mu.Lock()
				failed++
				mu.Unlock()
			} else if err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if failed != 5 || m.Len() != 45 {
		t.Errorf("failed %d, stored %d; want 5 and 45", failed, m.Len())
	}
}

func TestFirstMatchingRuleWins(t *testing.T) {
	m, f, ctx := setup(t)
	errA, errB := errors.New("a"), errors.New("b")
	f.Add(faulty.Rule{Match: func(n string) bool { return n == "x" }, Err: errA, Count: 1})
	f.Add(faulty.Rule{Err: errB})
	if err := f.Put(ctx, "x", nil, false); !errors.Is(err, errA) || errors.Is(err, errB) {
		t.Errorf("first call: %v, want only a", err)
	}
	// The first rule is used up; the second now matches.
	if err := f.Put(ctx, "x", nil, false); !errors.Is(err, errB) {
		t.Errorf("second call: %v, want b", err)
	}
	if m.Len() != 0 {
		t.Error("failed Puts stored objects")
	}
}

func TestDrop(t *testing.T) {
	m, f, ctx := setup(t)
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut, faulty.OpDelete}, Drop: true})
	if err := f.Put(ctx, "d", []byte("x"), false); err != nil {
		t.Fatalf("dropped Put reported %v, want success", err)
	}
	if exists(t, m, "d") {
		t.Error("dropped Put stored the object")
	}
	if err := m.Put(ctx, "e", []byte("x"), false); err != nil {
		t.Fatal(err)
	}
	if err := f.Delete(ctx, "e"); err != nil {
		t.Fatalf("dropped Delete reported %v", err)
	}
	if !exists(t, m, "e") {
		t.Error("dropped Delete deleted the object")
	}
}

func TestAfterLosesTheAck(t *testing.T) {
	m, f, ctx := setup(t)
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, After: true, Err: errBoom, Count: 1})
	if err := f.Put(ctx, "a", []byte("abc"), true); !errors.Is(err, errBoom) {
		t.Fatalf("Put = %v, want errBoom", err)
	}
	if !exists(t, m, "a") {
		t.Fatal("Put with a lost ack did not store the object")
	}
	// The retry a caller would make now meets the object it already wrote.
	if err := f.Put(ctx, "a", []byte("abc"), true); !errors.Is(err, store.ErrExists) {
		t.Fatalf("retried conditional Put = %v, want ErrExists", err)
	}
	// When the wrapped call itself fails, its error is what is returned.
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpGet}, After: true, Err: errBoom})
	if _, err := f.GetRange(ctx, "missing", 0, make([]byte, 1)); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("After rule on a failing call = %v, want the call's ErrNotFound", err)
	}
}

func TestDelay(t *testing.T) {
	m, f, ctx := setup(t)
	// A delay-only rule lets the call through afterwards.
	remove := f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Delay: time.Millisecond})
	if err := f.Put(ctx, "slow", []byte("x"), false); err != nil {
		t.Fatal(err)
	}
	if !exists(t, m, "slow") {
		t.Fatal("delayed Put did not store the object")
	}
	remove()
	// A delay is cut short by the caller's context, and the call is not made.
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Delay: time.Hour})
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- f.Put(cctx, "never", []byte("x"), false) }()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Put during a delay with a canceled context = %v, want context.Canceled", err)
	}
	if exists(t, m, "never") {
		t.Error("Put canceled during its delay stored the object")
	}
}

func TestListMatchesPrefix(t *testing.T) {
	m, f, ctx := setup(t)
	for _, n := range []string{"checkpoint/1", "superblock"} {
		if err := m.Put(ctx, n, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpList}, Match: func(p string) bool { return p == store.CheckpointPrefix }, Err: errBoom})
	if err := f.List(ctx, store.CheckpointPrefix, func(string, int64) error { return nil }); !errors.Is(err, errBoom) {
		t.Errorf("List(checkpoint/) = %v", err)
	}
	var got []string
	if err := f.List(ctx, "", func(n string, _ int64) error { got = append(got, n); return nil }); err != nil || len(got) != 2 {
		t.Errorf("List(\"\") = %q, %v", got, err)
	}
}
