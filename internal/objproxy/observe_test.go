package objproxy

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/testutil"
)

// recorder is an Observer that keeps every call.
type recorder struct {
	mu    sync.Mutex
	calls []recordedCall
}

type recordedCall struct {
	op      Op
	outcome Outcome
	bytes   int
}

func (r *recorder) StoreCall(op Op, outcome Outcome, bytes int, took time.Duration) {
	if took < 0 {
		panic("negative duration")
	}
	r.mu.Lock()
	r.calls = append(r.calls, recordedCall{op, outcome, bytes})
	r.mu.Unlock()
}

func (r *recorder) all() []recordedCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]recordedCall(nil), r.calls...)
}

// TestObserverSeesEveryAttempt: each store call is reported once, with
// its outcome and, on success, the bytes it moved; a retried request is
// one error and then one success.
func TestObserverSeesEveryAttempt(t *testing.T) {
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		if name == "flaky" && n == 1 {
			return errBoom
		}
		return nil
	})
	rec := &recorder{}
	p := newProxy(t, st, Options{Observer: rec})
	ctx := context.Background()
	if err := p.Put(ctx, High, "a", make([]byte, 1000), true); err != nil {
		t.Fatal(err)
	}
	if err := p.Put(ctx, High, "a", make([]byte, 7), true); !errors.Is(err, store.ErrExists) {
		t.Fatalf("second conditional put: %v, want ErrExists", err)
	}
	buf := make([]byte, 300)
	if n, err := p.GetRange(ctx, High, "a", 100, buf); err != nil || n != 300 {
		t.Fatalf("get: %d, %v", n, err)
	}
	if _, err := p.Size(ctx, Low, "missing"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("size of a missing object: %v", err)
	}
	if err := p.Put(ctx, Low, "flaky", make([]byte, 5), false); err != nil {
		t.Fatal(err)
	}
	want := []recordedCall{
		{OpPut, OutcomeOK, 1000},
		{OpPut, OutcomeExists, 0},
		{OpGet, OutcomeOK, 300},
		{OpSize, OutcomeNotFound, 0},
		{OpPut, OutcomeError, 0},
		{OpPut, OutcomeOK, 5},
	}
	got := rec.all()
	if len(got) != len(want) {
		t.Fatalf("observer saw %d calls %v, want %d %v", len(got), got, len(want), want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("call %d: got %v/%v/%d, want %v/%v/%d", i, got[i].op, got[i].outcome, got[i].bytes, want[i].op, want[i].outcome, want[i].bytes)
		}
	}
	if s := p.Stats(); s.Put.Retries != 1 {
		t.Errorf("put retries = %d, want 1", s.Put.Retries)
	}
}

// TestPoolsCountRunningAndQueued: a call held in the store counts as
// running; requests behind it count in their priority's queue, and one
// whose caller gave up stops counting.
func TestPoolsCountRunningAndQueued(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		if name == "block" {
			close(entered)
			<-release
		}
		return nil
	})
	p := newProxy(t, st, Options{Uploaders: 1, Downloaders: 3})
	ctx := context.Background()
	var wg sync.WaitGroup
	put := func(ctx context.Context, prio Priority, name string) {
		wg.Add(1)
		go func() { defer wg.Done(); _ = p.Put(ctx, prio, name, []byte("x"), false) }()
	}
	put(ctx, Low, "block")
	<-entered
	put(ctx, High, "h")
	cctx, cancel := context.WithCancel(ctx)
	put(cctx, Low, "l1")
	put(ctx, Low, "l2")
	testutil.WaitFor(t, "three queued", func() bool { return queued(p.up) == 3 })
	up, down := p.Pools()
	if want := (PoolStats{Workers: 1, Running: 1, QueuedHigh: 1, QueuedLow: 2}); up != want {
		t.Errorf("upload pool %+v, want %+v", up, want)
	}
	if want := (PoolStats{Workers: 3}); down != want {
		t.Errorf("download pool %+v, want %+v", down, want)
	}
	cancel()
	testutil.WaitFor(t, "abandoned request uncounted", func() bool { up, _ := p.Pools(); return up.QueuedLow == 1 })
	close(release)
	waitGroup(t, "puts", &wg)
	if up, _ := p.Pools(); up != (PoolStats{Workers: 1}) {
		t.Errorf("idle upload pool %+v, want nothing running or queued", up)
	}
}
