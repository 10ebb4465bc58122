package crashpoint

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
)

// counting is an inner store that counts the calls reaching it.
type counting struct {
	store.Store
	calls atomic.Int64
}

func (c *counting) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	c.calls.Add(1)
	return c.Store.Put(ctx, name, body, ifAbsent)
}

func (c *counting) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	c.calls.Add(1)
	return c.Store.GetRange(ctx, name, off, buf)
}

func (c *counting) Size(ctx context.Context, name string) (int64, error) {
	c.calls.Add(1)
	return c.Store.Size(ctx, name)
}

func (c *counting) List(ctx context.Context, prefix string, fn func(string, int64) error) error {
	c.calls.Add(1)
	return c.Store.List(ctx, prefix, fn)
}

func (c *counting) Delete(ctx context.Context, name string) error {
	c.calls.Add(1)
	return c.Store.Delete(ctx, name)
}

func has(t *testing.T, st store.Store, name string) bool {
	t.Helper()
	_, err := st.Size(context.Background(), name)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

// script makes one call of every kind, five Puts first: calls 1–5 are the
// Puts of a0..a4, 6 a Size, 7 a GetRange, 8 a List, 9 a Delete of a0.
func script(s store.Store) []error {
	ctx := context.Background()
	var errs []error
	for i := range 5 {
		errs = append(errs, s.Put(ctx, fmt.Sprint("a", i), []byte("x"), true))
	}
	_, err := s.Size(ctx, "a0")
	errs = append(errs, err)
	_, err = s.GetRange(ctx, "a0", 0, make([]byte, 1))
	errs = append(errs, err)
	errs = append(errs, s.List(ctx, "a", func(string, int64) error { return nil }))
	errs = append(errs, s.Delete(ctx, "a0"))
	return errs
}

func TestCountsACleanRun(t *testing.T) {
	inner := &counting{Store: mem.New()}
	s := New(inner, Options{Trace: true})
	for i, err := range script(s) {
		if err != nil {
			t.Fatalf("call %d of a clean run: %v", i+1, err)
		}
	}
	if s.Count() != 9 || inner.calls.Load() != 9 {
		t.Fatalf("clean run: wrapper counted %d calls, inner store saw %d; want 9 and 9", s.Count(), inner.calls.Load())
	}
	if s.IsCrashed() || s.Rejected() != 0 {
		t.Fatalf("a wrapper without a crash point crashed (%v) or rejected %d calls", s.IsCrashed(), s.Rejected())
	}
	tr := s.Trace()
	want := []Op{OpPut, OpPut, OpPut, OpPut, OpPut, OpSize, OpGet, OpList, OpDelete}
	if len(tr) != len(want) {
		t.Fatalf("trace has %d calls, want %d", len(tr), len(want))
	}
	for i, c := range tr {
		if c.N != int64(i+1) || c.Op != want[i] {
			t.Errorf("trace[%d] = %v, want call %d: %v", i, c, i+1, want[i])
		}
	}
	if !tr[0].IfAbsent || tr[0].Name != "a0" {
		t.Errorf("trace[0] = %v, want a conditional put of a0", tr[0])
	}
}

func TestCrashPointNotApplied(t *testing.T) {
	inner := &counting{Store: mem.New()}
	s := New(inner, Options{At: 3})
	errs := script(s)
	for i, err := range errs {
		switch {
		case i < 2 && err != nil:
			t.Errorf("call %d before the crash point failed: %v", i+1, err)
		case i >= 2 && !errors.Is(err, ErrCrashed):
			t.Errorf("call %d at or after the crash point: %v, want ErrCrashed", i+1, err)
		}
	}
	if got := inner.calls.Load(); got != 2 {
		t.Fatalf("the inner store saw %d calls, want the 2 before the crash point", got)
	}
	if has(t, inner.Store, "a2") || !has(t, inner.Store, "a1") || !has(t, inner.Store, "a0") {
		t.Fatal("the bucket does not hold exactly a0 and a1")
	}
	c, applied, ok := s.CrashPoint()
	if !ok || applied || c.N != 3 || c.Op != OpPut || c.Name != "a2" {
		t.Fatalf("crash point = %v applied=%v ok=%v, want call 3, put a2, not applied", c, applied, ok)
	}
	if s.Rejected() != 7 {
		t.Errorf("rejected %d calls, want 7 (3..9)", s.Rejected())
	}
	select {
	case <-s.Crashed():
	default:
		t.Error("Crashed() is not closed after the crash")
	}
}

func TestCrashPointApplied(t *testing.T) {
	inner := &counting{Store: mem.New()}
	s := New(inner, Options{At: 3, Applied: true})
	errs := script(s)
	if !errors.Is(errs[2], ErrCrashed) {
		t.Fatalf("the crash call returned %v, want ErrCrashed (reply lost)", errs[2])
	}
	if got := inner.calls.Load(); got != 3 {
		t.Fatalf("the inner store saw %d calls, want 3 (the crash call took effect)", got)
	}
	if !has(t, inner.Store, "a2") || has(t, inner.Store, "a3") {
		t.Fatal("the applied crash call's object is missing, or a later call landed")
	}
	// The Delete (call 9) never reached the bucket.
	if !has(t, inner.Store, "a0") {
		t.Fatal("a call after the crash deleted a0")
	}
}

func TestCrashPointAppliedKeepsInnerErrorOut(t *testing.T) {
	inner := mem.New()
	ctx := context.Background()
	if err := inner.Put(ctx, "x", []byte("old"), false); err != nil {
		t.Fatal(err)
	}
	s := New(inner, Options{At: 1, Applied: true})
	err := s.Put(ctx, "x", []byte("new"), true)
	if !errors.Is(err, ErrCrashed) || errors.Is(err, store.ErrExists) {
		t.Fatalf("applied crash call whose inner call failed: %v; want only ErrCrashed (the reply is lost either way)", err)
	}
}

func TestManualCrash(t *testing.T) {
	inner := &counting{Store: mem.New()}
	s := New(inner, Options{})
	ctx := context.Background()
	if err := s.Put(ctx, "a", nil, false); err != nil {
		t.Fatal(err)
	}
	s.Crash()
	if err := s.Delete(ctx, "a"); !errors.Is(err, ErrCrashed) {
		t.Fatalf("delete after Crash: %v", err)
	}
	if inner.calls.Load() != 1 || !has(t, inner.Store, "a") {
		t.Fatal("a call after Crash reached the inner store")
	}
	if _, _, ok := s.CrashPoint(); ok {
		t.Fatal("CrashPoint reports a call for a crash by Crash")
	}
}

// blocking holds every Put until released.
type blocking struct {
	store.Store
	entered chan struct{}
	release chan struct{}
}

func (b *blocking) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	b.entered <- struct{}{}
	<-b.release
	return b.Store.Put(ctx, name, body, ifAbsent)
}

// A call numbered before the crash point that is still in the inner store
// completes after the crash; Wait returns only once it has.
func TestWaitCoversCallsInFlight(t *testing.T) {
	inner := &blocking{Store: mem.New(), entered: make(chan struct{}), release: make(chan struct{})}
	s := New(inner, Options{At: 2})
	ctx := context.Background()
	first := make(chan error, 1)
	go func() { first <- s.Put(ctx, "early", nil, false) }()
	<-inner.entered // call 1 is inside the inner store
	if _, err := s.Size(ctx, "early"); !errors.Is(err, ErrCrashed) {
		t.Fatalf("call 2 (crash point): %v", err)
	}
	waited := make(chan struct{})
	go func() { s.Wait(); close(waited) }()
	select {
	case <-waited:
		t.Fatal("Wait returned while call 1 was still inside the inner store")
	case <-time.After(50 * time.Millisecond):
	}
	close(inner.release)
	if err := <-first; err != nil {
		t.Fatalf("call 1, numbered before the crash point: %v", err)
	}
	<-waited
	if !has(t, inner.Store, "early") {
		t.Fatal("call 1 did not land")
	}
}

// Under concurrency, exactly the calls numbered before the crash point
// (and the crash call, when applied) reach the inner store, and every call
// after it fails.
func TestConcurrentCallsStopAtTheCrashPoint(t *testing.T) {
	for _, applied := range []bool{false, true} {
		t.Run(fmt.Sprint("applied=", applied), func(t *testing.T) {
			inner := &counting{Store: mem.New()}
			const at = 137
			s := New(inner, Options{At: at, Applied: applied})
			var wg sync.WaitGroup
			var ok, failed atomic.Int64
			for g := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range 50 {
						err := s.Put(context.Background(), fmt.Sprintf("g%d/%d", g, i), []byte{1}, false)
						switch {
						case err == nil:
							ok.Add(1)
						case errors.Is(err, ErrCrashed):
							failed.Add(1)
						default:
							t.Errorf("unexpected error %v", err)
						}
					}
				}()
			}
			wg.Wait()
			s.Wait()
			want := int64(at - 1)
			if applied {
				want++
			}
			if got := inner.calls.Load(); got != want {
				t.Fatalf("inner store saw %d calls, want %d", got, want)
			}
			if ok.Load() != at-1 || failed.Load() != 400-(at-1) {
				t.Fatalf("%d calls succeeded and %d failed, want %d and %d", ok.Load(), failed.Load(), at-1, 400-(at-1))
			}
			if inner.Store.(*mem.Store).Len() != int(want) {
				t.Fatalf("bucket holds %d objects, want %d", inner.Store.(*mem.Store).Len(), want)
			}
		})
	}
}

func TestOnCrashSeesTheCrashCall(t *testing.T) {
	inner := &counting{Store: mem.New()}
	var seen []Call
	var innerAtHook int64 = -1
	s := New(inner, Options{At: 2, Applied: true, OnCrash: func(c Call) {
		seen = append(seen, c)
		innerAtHook = inner.calls.Load()
	}})
	script(s)
	if len(seen) != 1 || seen[0].N != 2 || seen[0].Name != "a1" {
		t.Fatalf("OnCrash saw %v, want exactly call 2 (put a1)", seen)
	}
	if innerAtHook != 1 {
		t.Fatalf("OnCrash ran after %d inner calls, want 1: before the crash call went on", innerAtHook)
	}
}

func TestMatchCrashesAtAKeyedCall(t *testing.T) {
	inner := &counting{Store: mem.New()}
	ctx := context.Background()
	// The crash call's key, taken from a run that crashed by number.
	first := New(mem.New(), Options{At: 4})
	for range 3 {
		_ = first.Put(ctx, "x", nil, false)
		_ = first.Put(ctx, "y", nil, false)
	}
	c, _, ok := first.CrashPoint()
	if !ok || c.Key() != "put:y#2" || c.Nth != 2 {
		t.Fatalf("crash call %v (key %q), want the 2nd put of y", c, c.Key())
	}
	match, err := ParseKey(c.Key())
	if err != nil {
		t.Fatal(err)
	}
	// Replayed with other calls in between: the crash still lands there.
	s := New(inner, Options{Match: match})
	for _, name := range []string{"z", "y", "x", "z", "y", "x"} {
		_ = s.Put(ctx, name, nil, false)
	}
	got, _, ok := s.CrashPoint()
	if !ok || got.N != 5 || got.Name != "y" || got.Nth != 2 {
		t.Fatalf("replayed crash at %v, want call 5, the 2nd put of y", got)
	}
	if inner.calls.Load() != 4 {
		t.Fatalf("inner store saw %d calls, want 4", inner.calls.Load())
	}
	for _, bad := range []string{"put:y", "put:y#0", "bogus:y#1", "y#1"} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) succeeded", bad)
		}
	}
}

// A recorded order is replayed: goroutines that race freely make their
// listed calls in the recorded order, an unlisted call comes after them,
// and a listed call that never comes makes the wrapper give the order up.
func TestOrderReplaysARecordedRun(t *testing.T) {
	ctx := context.Background()
	order := []string{"put:c#1", "put:a#1", "put:b#1"}
	for range 20 {
		s := New(mem.New(), Options{Order: order, Trace: true})
		var wg sync.WaitGroup
		for _, name := range []string{"a", "b", "c", "free"} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := s.Put(ctx, name, nil, false); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		var got []string
		for _, c := range s.Trace() {
			got = append(got, c.Key())
		}
		if want := append(order, "put:free#1"); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("calls made in order %v, want %v", got, want)
		}
		if s.OrderAbandoned() {
			t.Fatal("order given up although every listed call came")
		}
	}

	s := New(mem.New(), Options{Order: []string{"put:never#1", "put:a#1"}, OrderWait: 20 * time.Millisecond})
	start := time.Now()
	if err := s.Put(ctx, "a", nil, false); err != nil {
		t.Fatal(err)
	}
	if !s.OrderAbandoned() || time.Since(start) < 20*time.Millisecond {
		t.Fatalf("a call behind one that never comes: abandoned=%v after %v", s.OrderAbandoned(), time.Since(start))
	}

	// After the crash, a listed call waiting for its turn fails at once.
	s = New(mem.New(), Options{Order: []string{"put:x#1", "put:y#1"}, OrderWait: time.Hour})
	res := make(chan error, 1)
	go func() { res <- s.Put(ctx, "y", nil, false) }()
	time.Sleep(10 * time.Millisecond)
	s.Crash()
	select {
	case err := <-res:
		if !errors.Is(err, ErrCrashed) {
			t.Fatalf("waiting call after the crash: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a call waiting for its turn was not released by the crash")
	}
}
