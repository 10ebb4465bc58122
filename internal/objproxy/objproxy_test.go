package objproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil"
)

// hookStore wraps a store and calls hook before every call, with the
// 1-based number of calls so far of that op on that name. A non-nil error
// from hook fails the call without reaching the store.
type hookStore struct {
	store.Store
	hook func(ctx context.Context, op, name string, n int) error

	mu    sync.Mutex
	calls map[string]int
	order []string // "op name" of every call, in the order they started
}

func newHookStore(hook func(ctx context.Context, op, name string, n int) error) *hookStore {
	return &hookStore{Store: mem.New(), hook: hook, calls: make(map[string]int)}
}

func (h *hookStore) before(ctx context.Context, op, name string) error {
	h.mu.Lock()
	k := op + " " + name
	h.calls[k]++
	n := h.calls[k]
	h.order = append(h.order, k)
	h.mu.Unlock()
	if h.hook == nil {
		return nil
	}
	return h.hook(ctx, op, name, n)
}

func (h *hookStore) count(op, name string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.calls[op+" "+name]
}

func (h *hookStore) callOrder() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.order...)
}

func (h *hookStore) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	if err := h.before(ctx, "put", name); err != nil {
		return err
	}
	return h.Store.Put(ctx, name, body, ifAbsent)
}

func (h *hookStore) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	if err := h.before(ctx, "get", name); err != nil {
		return 0, err
	}
	return h.Store.GetRange(ctx, name, off, buf)
}

func (h *hookStore) Size(ctx context.Context, name string) (int64, error) {
	if err := h.before(ctx, "size", name); err != nil {
		return 0, err
	}
	return h.Store.Size(ctx, name)
}

func (h *hookStore) Delete(ctx context.Context, name string) error {
	if err := h.before(ctx, "delete", name); err != nil {
		return err
	}
	return h.Store.Delete(ctx, name)
}

func (h *hookStore) List(ctx context.Context, prefix string, fn func(string, int64) error) error {
	if err := h.before(ctx, "list", prefix); err != nil {
		return err
	}
	return h.Store.List(ctx, prefix, fn)
}

var errBoom = errors.New("boom")

// waitGroup waits for wg, failing the test if the calls hang.
func waitGroup(t *testing.T, what string, wg *sync.WaitGroup) {
	t.Helper()
	ch := make(chan struct{})
	go func() { wg.Wait(); close(ch) }()
	select {
	case <-ch:
	case <-time.After(20 * time.Second):
		t.Fatalf("%s did not complete: deadlock or a worker held during a retry wait", what)
	}
}

func queued(pl *pool) int {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return pl.high.len() + pl.low.len()
}

func newProxy(t *testing.T, st store.Store, o Options) *Proxy {
	t.Helper()
	if o.BaseBackoff == 0 {
		o.BaseBackoff = time.Millisecond
		o.MaxBackoff = 5 * time.Millisecond
	}
	o.Logger = zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	p := New(st, o)
	t.Cleanup(p.Close)
	return p
}

func TestHighOvertakesLow(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		if name == "block" {
			close(entered)
			<-release
		}
		return nil
	})
	p := newProxy(t, st, Options{Uploaders: 1, Downloaders: 1})
	ctx := context.Background()

	var wg sync.WaitGroup
	errs := make(chan error, 5)
	call := func(f func() error) {
		wg.Add(1)
		go func() { defer wg.Done(); errs <- f() }()
	}
	call(func() error { return p.Put(ctx, Low, "block", []byte("b"), false) })
	<-entered // the only uploader is busy
	call(func() error { return p.Put(ctx, Low, "l1", []byte("1"), false) })
	testutil.WaitFor(t, "l1 queued", func() bool { return queued(p.up) == 1 })
	call(func() error { return p.Put(ctx, Low, "l2", []byte("2"), false) })
	testutil.WaitFor(t, "l2 queued", func() bool { return queued(p.up) == 2 })
	call(func() error { return p.Put(ctx, High, "h1", []byte("h"), false) })
	testutil.WaitFor(t, "h1 queued", func() bool { return queued(p.up) == 3 })
	call(func() error { return p.Delete(ctx, High, "h2") })
	testutil.WaitFor(t, "h2 queued", func() bool { return queued(p.up) == 4 })
	close(release)
	waitGroup(t, "queued calls", &wg)
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}

	want := []string{"put block", "put h1", "delete h2", "put l1", "put l2"}
	if got := st.callOrder(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("store saw %v, want %v (high before low, FIFO within a queue)", got, want)
	}
}

func TestDownloadersServeHighFirst(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		if name == "block" && op == "size" {
			close(entered)
			<-release
		}
		return nil
	})
	ctx := context.Background()
	for _, n := range []string{"block", "a", "b"} {
		if err := st.Store.Put(ctx, n, []byte(n+"-data"), false); err != nil {
			t.Fatal(err)
		}
	}
	p := newProxy(t, st, Options{Uploaders: 1, Downloaders: 1})

	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); _, _ = p.Size(ctx, Low, "block") }()
	<-entered
	var lowN, highN int
	var lowErr, highErr error
	lowBuf, highBuf := make([]byte, 16), make([]byte, 16)
	go func() { defer wg.Done(); lowN, lowErr = p.GetRange(ctx, Low, "a", 0, lowBuf) }()
	testutil.WaitFor(t, "low get queued", func() bool { return queued(p.down) == 1 })
	go func() { defer wg.Done(); highN, highErr = p.GetRange(ctx, High, "b", 2, highBuf) }()
	testutil.WaitFor(t, "high get queued", func() bool { return queued(p.down) == 2 })
	close(release)
	waitGroup(t, "gets", &wg)

	if lowErr != nil || highErr != nil {
		t.Fatal(lowErr, highErr)
	}
	if string(lowBuf[:lowN]) != "a-data" || string(highBuf[:highN]) != "data" {
		t.Fatalf("got %q and %q", lowBuf[:lowN], highBuf[:highN])
	}
	want := "size block,get b,get a"
	if got := strings.Join(st.callOrder(), ","); got != want {
		t.Fatalf("store saw %s, want %s", got, want)
	}
}

func TestBusyWorkersDoNotDeadlock(t *testing.T) {
	slowEntered := make(chan struct{}, 2)
	releaseSlow := make(chan struct{})
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		if strings.HasPrefix(name, "slow") {
			slowEntered <- struct{}{}
			<-releaseSlow
		}
		return nil
	})
	p := newProxy(t, st, Options{Uploaders: 2, Downloaders: 2})
	ctx := context.Background()
	for i := range 8 {
		if err := st.Store.Put(ctx, fmt.Sprintf("r%d", i), []byte(fmt.Sprintf("read-%d", i)), false); err != nil {
			t.Fatal(err)
		}
	}

	// One slow put occupies one of the two uploaders.
	var slow sync.WaitGroup
	slow.Add(1)
	go func() {
		defer slow.Done()
		if err := p.Put(ctx, Low, "slow0", []byte("s"), false); err != nil {
			t.Error(err)
		}
	}()
	<-slowEntered

	// Many more callers than workers, on both pools, both priorities: the
	// other uploader and the downloaders must get all of them done while
	// the slow put is still stuck.
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			prio := Priority(i % 2)
			name := fmt.Sprintf("w%d", i)
			body := []byte(fmt.Sprintf("body-%d", i))
			if err := p.Put(ctx, prio, name, body, true); err != nil {
				t.Error(err)
				return
			}
			buf := make([]byte, 64)
			n, err := p.GetRange(ctx, prio, name, 0, buf)
			if err != nil || !bytes.Equal(buf[:n], body) {
				t.Errorf("get %s: %q, %v", name, buf[:n], err)
			}
			r := fmt.Sprintf("r%d", i%8)
			if sz, err := p.Size(ctx, prio, r); err != nil || sz != int64(len("read-0")) {
				t.Errorf("size %s: %d, %v", r, sz, err)
			}
			if err := p.Delete(ctx, prio, name); err != nil {
				t.Error(err)
			}
		}()
	}
	waitGroup(t, "callers beside a slow put", &wg)

	// Now both uploaders stuck on slow puts: callers queue up and finish
	// once the puts are released.
	slow.Add(1)
	go func() {
		defer slow.Done()
		if err := p.Put(ctx, High, "slow1", []byte("s"), false); err != nil {
			t.Error(err)
		}
	}()
	<-slowEntered
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.Put(ctx, Priority(i%2), fmt.Sprintf("late%d", i), []byte("x"), false); err != nil {
				t.Error(err)
			}
		}()
	}
	testutil.WaitFor(t, "late puts queued", func() bool { return queued(p.up) == 8 })
	close(releaseSlow)
	waitGroup(t, "late puts", &wg)
	waitGroup(t, "slow puts", &slow)
	if got := st.Store.(*mem.Store).Len(); got != 8+2+8 {
		t.Fatalf("store holds %d objects, want %d", got, 18)
	}
}

func TestTransientErrorsRetried(t *testing.T) {
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		switch {
		case name == "x" && op == "put" && n <= 3:
			if n == 2 {
				return fmt.Errorf("race: %w", store.ErrConflict)
			}
			return fmt.Errorf("transient %d: %w", n, errBoom)
		case name == "x" && op == "get" && n <= 2:
			return errBoom
		}
		return nil
	})
	p := newProxy(t, st, Options{Uploaders: 1, Downloaders: 1})
	ctx := context.Background()
	if err := p.Put(ctx, High, "x", []byte("hello"), true); err != nil {
		t.Fatalf("put after transient errors: %v", err)
	}
	buf := make([]byte, 10)
	n, err := p.GetRange(ctx, High, "x", 1, buf)
	if err != nil || string(buf[:n]) != "ello" {
		t.Fatalf("get after transient errors: %q, %v", buf[:n], err)
	}
	if c := st.count("put", "x"); c != 4 {
		t.Errorf("store saw %d puts, want 4", c)
	}
	s := p.Stats()
	if s.Put != (OpStats{Attempts: 4, Retries: 3}) {
		t.Errorf("put stats %+v, want 4 attempts, 3 retries, 0 failures", s.Put)
	}
	if s.Get != (OpStats{Attempts: 3, Retries: 2}) {
		t.Errorf("get stats %+v, want 3 attempts, 2 retries, 0 failures", s.Get)
	}
}

func TestFinalErrorsNotRetried(t *testing.T) {
	st := newHookStore(nil)
	p := newProxy(t, st, Options{})
	ctx := context.Background()
	if err := p.Put(ctx, High, "k", []byte("a"), true); err != nil {
		t.Fatal(err)
	}
	err := p.Put(ctx, High, "k", []byte("b"), true)
	if !errors.Is(err, store.ErrExists) {
		t.Fatalf("conditional put on a taken name: %v, want ErrExists", err)
	}
	if c := st.count("put", "k"); c != 2 {
		t.Errorf("store saw %d puts, want 2 (ErrExists is final)", c)
	}
	if _, err := p.GetRange(ctx, High, "missing", 0, make([]byte, 4)); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("get missing: %v, want ErrNotFound", err)
	}
	if _, err := p.Size(ctx, Low, "missing"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("size missing: %v, want ErrNotFound", err)
	}
	if st.count("get", "missing") != 1 || st.count("size", "missing") != 1 {
		t.Errorf("ErrNotFound retried: %d gets, %d sizes", st.count("get", "missing"), st.count("size", "missing"))
	}
	s := p.Stats()
	if s.Put.Retries+s.Get.Retries+s.Size.Retries != 0 || s.Put.Failures+s.Get.Failures+s.Size.Failures != 0 {
		t.Errorf("final answers counted as retries or failures: %+v", s)
	}
}

func TestMaxAttemptsGivesUp(t *testing.T) {
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		return fmt.Errorf("outage %d: %w", n, errBoom)
	})
	p := newProxy(t, st, Options{MaxAttempts: 3})
	err := p.Put(context.Background(), High, "k", []byte("a"), false)
	if !errors.Is(err, errBoom) {
		t.Fatalf("got %v, want the store's error wrapped", err)
	}
	if !strings.Contains(err.Error(), "outage 3") {
		t.Errorf("error %q does not carry the last attempt's error", err)
	}
	if c := st.count("put", "k"); c != 3 {
		t.Errorf("store saw %d attempts, want 3", c)
	}
	if s := p.Stats().Put; s != (OpStats{Attempts: 3, Retries: 2, Failures: 1}) {
		t.Errorf("stats %+v, want 3 attempts, 2 retries, 1 failure", s)
	}
}

func TestCancelStopsRetries(t *testing.T) {
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		return errBoom
	})
	p := newProxy(t, st, Options{Uploaders: 1})
	p.backoff = func(int) time.Duration { return time.Hour }

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Put(ctx, High, "k", []byte("a"), false) }()
	testutil.WaitFor(t, "first retry scheduled", func() bool { return p.Stats().Put.Retries == 1 })
	cancel()
	var err error
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("cancel did not end the retry wait")
	}
	if !errors.Is(err, context.Canceled) || !errors.Is(err, errBoom) {
		t.Fatalf("got %v, want context.Canceled with the last store error", err)
	}
	p.up.mu.Lock()
	waiting := len(p.up.waiting)
	p.up.mu.Unlock()
	if waiting != 0 {
		t.Errorf("%d requests still wait for a retry after cancel", waiting)
	}
	if c := st.count("put", "k"); c != 1 {
		t.Errorf("store saw %d attempts, want 1", c)
	}
	if s := p.Stats().Put; s.Failures != 1 {
		t.Errorf("stats %+v, want 1 failure", s)
	}

	// A context that is already done never reaches the store.
	if err := p.Put(ctx, High, "k2", nil, false); !errors.Is(err, context.Canceled) {
		t.Fatalf("put with a done context: %v", err)
	}
	if c := st.count("put", "k2"); c != 0 {
		t.Errorf("store saw %d calls with a done context", c)
	}
}

func TestCancelWhileQueued(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		if name == "block" && op == "size" {
			close(entered)
			<-release
		}
		return nil
	})
	p := newProxy(t, st, Options{Downloaders: 1})
	ctx := context.Background()
	for _, n := range []string{"block", "q"} {
		if err := p.Put(ctx, High, n, []byte(n), false); err != nil {
			t.Fatal(err)
		}
	}
	go func() { _, _ = p.Size(ctx, High, "block") }()
	<-entered
	qctx, cancel := context.WithCancel(ctx)
	buf := make([]byte, 8)
	done := make(chan error, 1)
	go func() { _, err := p.GetRange(qctx, High, "q", 0, buf); done <- err }()
	testutil.WaitFor(t, "get queued", func() bool { return queued(p.down) == 1 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("queued get after cancel: %v", err)
	}
	// The abandoned request must never run: its buffer belongs to the
	// caller again.
	close(release)
	if _, err := p.Size(ctx, Low, "q"); err != nil {
		t.Fatal(err)
	}
	if c := st.count("get", "q"); c != 0 {
		t.Errorf("abandoned get reached the store %d times", c)
	}
	if buf[0] != 0 {
		t.Errorf("abandoned get wrote into the caller's buffer")
	}
}

func TestRetryWaitFreesWorker(t *testing.T) {
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		if name == "bad" {
			return errBoom
		}
		return nil
	})
	p := newProxy(t, st, Options{Uploaders: 1})
	// A long wait: if it held the only uploader, the good puts would hang.
	p.backoff = func(int) time.Duration { return time.Hour }

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	bad := make(chan error, 1)
	go func() { bad <- p.Put(ctx, High, "bad", []byte("x"), false) }()
	testutil.WaitFor(t, "bad put waiting for a retry", func() bool { return p.Stats().Put.Retries == 1 })

	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.Put(ctx, Low, fmt.Sprintf("good%d", i), []byte("g"), false); err != nil {
				t.Error(err)
			}
		}()
	}
	waitGroup(t, "good puts while a bad one waits to retry", &wg)
	cancel()
	if err := <-bad; !errors.Is(err, context.Canceled) {
		t.Fatalf("bad put: %v", err)
	}
}

func TestAttemptTimeout(t *testing.T) {
	var sawDeadline atomic.Bool
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		if n == 1 {
			_, ok := ctx.Deadline()
			sawDeadline.Store(ok)
			<-ctx.Done() // a hung connection
			return ctx.Err()
		}
		return nil
	})
	p := newProxy(t, st, Options{AttemptTimeout: 20 * time.Millisecond})
	if err := p.Put(context.Background(), High, "k", []byte("a"), false); err != nil {
		t.Fatalf("put after a timed-out attempt: %v", err)
	}
	if !sawDeadline.Load() {
		t.Error("the attempt's context had no deadline")
	}
	if s := p.Stats().Put; s != (OpStats{Attempts: 2, Retries: 1}) {
		t.Errorf("stats %+v, want 2 attempts, 1 retry", s)
	}
}

func TestClose(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		switch name {
		case "block":
			close(entered)
			<-release
		case "bad":
			return errBoom
		}
		return nil
	})
	p := newProxy(t, st, Options{Uploaders: 1})
	p.backoff = func(int) time.Duration { return time.Hour }
	ctx := context.Background()

	bad := make(chan error, 1)
	go func() { bad <- p.Put(ctx, High, "bad", []byte("x"), false) }()
	testutil.WaitFor(t, "bad put waiting for a retry", func() bool { return p.Stats().Put.Retries == 1 })
	inflight := make(chan error, 1)
	go func() { inflight <- p.Put(ctx, High, "block", []byte("b"), false) }()
	<-entered
	queuedErr := make(chan error, 1)
	go func() { queuedErr <- p.Put(ctx, Low, "q", []byte("q"), false) }()
	testutil.WaitFor(t, "put queued", func() bool { return queued(p.up) == 1 })

	closed := make(chan struct{})
	go func() { p.Close(); close(closed) }()
	if err := <-queuedErr; !errors.Is(err, ErrClosed) {
		t.Errorf("queued put at close: %v, want ErrClosed", err)
	}
	if err := <-bad; !errors.Is(err, ErrClosed) || !errors.Is(err, errBoom) {
		t.Errorf("put waiting for a retry at close: %v, want ErrClosed and the last error", err)
	}
	close(release)
	if err := <-inflight; err != nil {
		t.Errorf("in-flight put at close: %v, want it to finish", err)
	}
	<-closed
	if err := p.Put(ctx, High, "after", nil, false); !errors.Is(err, ErrClosed) {
		t.Errorf("put after close: %v", err)
	}
	if _, err := p.GetRange(ctx, High, "block", 0, make([]byte, 1)); !errors.Is(err, ErrClosed) {
		t.Errorf("get after close: %v", err)
	}
	if st.count("put", "q") != 0 || st.count("put", "after") != 0 {
		t.Error("a request reached the store after close")
	}
	p.Close() // again: no effect
}

// TestStress mixes all operations, priorities, transient errors and
// cancellations for the race detector, and checks every put that
// reported success.
func TestStress(t *testing.T) {
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		if rand.IntN(4) == 0 {
			return errBoom
		}
		return nil
	})
	p := New(st, Options{Uploaders: 3, Downloaders: 2, Logger: zerolog.Nop()})
	t.Cleanup(p.Close)
	p.backoff = func(int) time.Duration { return time.Duration(rand.IntN(200)) * time.Microsecond }

	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				ctx, cancel := context.WithCancel(context.Background())
				if i%7 == 3 {
					go cancel()
				}
				name := fmt.Sprintf("g%d/%d", g, i)
				body := []byte(name)
				prio := Priority(rand.IntN(2))
				err := p.Put(ctx, prio, name, body, false)
				if err != nil {
					if !errors.Is(err, context.Canceled) {
						t.Errorf("put %s: %v", name, err)
					}
					cancel()
					continue
				}
				buf := make([]byte, 32)
				n, err := p.GetRange(ctx, prio, name, 0, buf)
				if err == nil && !bytes.Equal(buf[:n], body) {
					t.Errorf("get %s: %q", name, buf[:n])
				}
				if err != nil && !errors.Is(err, context.Canceled) {
					t.Errorf("get %s: %v", name, err)
				}
				cancel()
			}
		}()
	}
	waitGroup(t, "stress", &wg)
	s := p.Stats()
	if s.Put.Retries == 0 || s.Get.Retries == 0 {
		t.Errorf("no retries happened: %+v", s)
	}
}

func BenchmarkPut(b *testing.B) {
	p := New(mem.New(), Options{Uploaders: 4, Logger: zerolog.Nop()})
	defer p.Close()
	body := make([]byte, 4096)
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := p.Put(ctx, High, "k", body, false); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func TestLostReplyOnConditionalPut(t *testing.T) {
	// In one piece (Put) and in pieces (PutV): the retry compares the
	// whole body, not its first piece.
	for _, vectored := range []bool{false, true} {
		t.Run(fmt.Sprintf("vectored=%v", vectored), func(t *testing.T) { testLostReplyOnConditionalPut(t, vectored) })
	}
}

func testLostReplyOnConditionalPut(t *testing.T, vectored bool) {
	m := mem.New()
	f := faulty.New(m)
	p := newProxy(t, f, Options{})
	ctx := context.Background()
	errReset := errors.New("connection reset by peer")
	put := func(name, body string) error {
		if vectored {
			b := []byte(body)
			return p.PutV(ctx, High, name, [][]byte{b[:6], b[6:7], {}, b[7:]}, true)
		}
		return p.Put(ctx, High, name, []byte(body), true)
	}

	// The first attempt stores the object but its reply is lost; the retry
	// meets ErrExists for what is its own object.
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, After: true, Err: errReset, Count: 1})
	if err := put("k1", "chunk one"); err != nil {
		t.Fatalf("conditional put with a lost reply: %v", err)
	}
	if s := p.Stats().Put; s.Attempts != 2 || s.Retries != 1 {
		t.Errorf("stats %+v, want 2 attempts, 1 retry", s)
	}

	// Another writer's object under the name stays an ErrExists, also
	// when our first attempt failed before reaching the store.
	if err := m.Put(ctx, "k2", []byte("someone else"), false); err != nil {
		t.Fatal(err)
	}
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Err: errReset, Count: 1})
	if err := put("k2", "chunk two"); !errors.Is(err, store.ErrExists) {
		t.Fatalf("conditional put over another writer's object: %v, want ErrExists", err)
	}
	// Same length, different bytes, and the same first piece.
	if err := m.Put(ctx, "k3", []byte("chunk 3!!"), false); err != nil {
		t.Fatal(err)
	}
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Err: errReset, Count: 1})
	if err := put("k3", "chunk 333"); !errors.Is(err, store.ErrExists) {
		t.Fatalf("conditional put over a same-sized foreign object: %v, want ErrExists", err)
	}
}

func TestFaultyOutage(t *testing.T) {
	m := mem.New()
	f := faulty.New(m)
	p := newProxy(t, f, Options{Uploaders: 2, Downloaders: 2})
	ctx := context.Background()
	// An outage of 5 failed calls of any kind, then the store is back.
	f.Add(faulty.Rule{Err: errBoom, Count: 5})
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("o%d", i)
			if err := p.Put(ctx, Priority(i%2), name, []byte(name), true); err != nil {
				t.Error(err)
				return
			}
			if sz, err := p.Size(ctx, High, name); err != nil || sz != int64(len(name)) {
				t.Errorf("size %s: %d, %v", name, sz, err)
			}
		}()
	}
	waitGroup(t, "calls through an outage", &wg)
	s := p.Stats()
	if got := s.Put.Retries + s.Size.Retries; got != 5 {
		t.Errorf("%d retries, want one per injected fault (5)", got)
	}
	if m.Len() != 6 {
		t.Errorf("store holds %d objects, want 6", m.Len())
	}
}

// A listing that fails half-way is retried as a whole and the caller sees
// every name exactly once, in order.
func TestListRetriedWithoutDuplicates(t *testing.T) {
	m := mem.New()
	f := faulty.New(m)
	p := newProxy(t, f, Options{})
	ctx := context.Background()
	for i := range 5 {
		if err := m.Put(ctx, fmt.Sprintf("a/%d", i), []byte{byte(i)}, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Put(ctx, "b/0", nil, false); err != nil {
		t.Fatal(err)
	}
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpList}, Err: errBoom, Count: 2})
	var got []string
	err := p.List(ctx, Low, "a/", func(name string, size int64) error {
		got = append(got, name)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := "a/0 a/1 a/2 a/3 a/4"; strings.Join(got, " ") != want {
		t.Fatalf("listed %v, want %s", got, want)
	}
	if s := p.Stats().List; s.Retries != 2 {
		t.Errorf("list stats %+v, want 2 retries", s)
	}
}

// A stuck small request is retried soon; a large one gets time for its
// bytes; each retry doubles the allowance up to the cap, so a link slower
// than MinRate still gets a long enough attempt in the end.
func TestScaledTimeout(t *testing.T) {
	const base, limit = 10 * time.Second, 10 * time.Minute
	for _, tc := range []struct {
		bytes   int64
		attempt int
		want    time.Duration
	}{
		{0, 1, 10 * time.Second},
		{4 << 20, 1, 26 * time.Second}, // 4 MiB at 256 KiB/s = 16 s
		{4 << 20, 2, 52 * time.Second},
		{4 << 20, 3, 104 * time.Second},
		{4 << 20, 6, limit},
		{1 << 40, 1, limit},
	} {
		if got := scaledTimeout(base, tc.bytes, 256<<10, tc.attempt, limit); got != tc.want {
			t.Errorf("bytes %d attempt %d: timeout %v, want %v", tc.bytes, tc.attempt, got, tc.want)
		}
	}
}

// The deadline an attempt's context carries grows with the object's size
// and with each retry; a listing gets the cap.
func TestAttemptDeadlines(t *testing.T) {
	var mu sync.Mutex
	allowed := map[string][]time.Duration{}
	st := newHookStore(func(ctx context.Context, op, name string, n int) error {
		d, ok := ctx.Deadline()
		if !ok {
			return errors.New("no deadline")
		}
		mu.Lock()
		allowed[op+" "+name] = append(allowed[op+" "+name], time.Until(d))
		mu.Unlock()
		if name == "big" && n < 3 {
			return errBoom
		}
		return nil
	})
	p := newProxy(t, st, Options{AttemptTimeout: time.Second, MinRate: 1 << 20, MaxAttemptTimeout: time.Hour})
	p.backoff = func(int) time.Duration { return 0 }
	ctx := context.Background()
	if err := p.Put(ctx, High, "small", []byte("s"), false); err != nil {
		t.Fatal(err)
	}
	if err := p.Put(ctx, High, "big", make([]byte, 8<<20), false); err != nil {
		t.Fatal(err)
	}
	if err := p.List(ctx, High, "", func(string, int64) error { return nil }); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	near := func(what string, got, want time.Duration) {
		t.Helper()
		if got > want || got < want-time.Second/2 {
			t.Errorf("%s: attempt allowed %v, want about %v", what, got, want)
		}
	}
	if s := allowed["put small"]; len(s) != 1 {
		t.Fatalf("small put attempts %v", s)
	} else {
		near("small put", s[0], time.Second)
	}
	big := allowed["put big"]
	if len(big) != 3 {
		t.Fatalf("big put attempts %v, want 3", big)
	}
	for i, want := range []time.Duration{9 * time.Second, 18 * time.Second, 36 * time.Second} {
		near(fmt.Sprintf("big put attempt %d", i+1), big[i], want)
	}
	if s := allowed["list "]; len(s) != 1 {
		t.Fatalf("list attempts %v", s)
	} else {
		near("list", s[0], time.Hour)
	}
}

// flakyVector is a store that reads into several buffers and fails its
// first fails GetRangeV calls with a transient error.
type flakyVector struct {
	*mem.Store
	mu    sync.Mutex
	fails int
}

func (f *flakyVector) GetRangeV(ctx context.Context, name string, off int64, bufs [][]byte) (int, error) {
	f.mu.Lock()
	fail := f.fails > 0
	f.fails--
	f.mu.Unlock()
	if fail {
		// Part of the body arrived before the failure: the retry must
		// fill the buffers again from the start.
		for _, b := range bufs {
			for i := range b {
				b[i] = 0xEE
			}
		}
		return 0, errBoom
	}
	return f.Store.GetRangeV(ctx, name, off, bufs)
}

// TestGetRangeV: a read into several buffers goes to a store that can do
// it, is retried like GetRange, and is refused (not emulated) by a proxy
// over a store that cannot.
func TestGetRangeV(t *testing.T) {
	ctx := context.Background()
	st := &flakyVector{Store: mem.New(), fails: 2}
	p := newProxy(t, st, Options{Uploaders: 1, Downloaders: 1})
	if !p.Vectored() {
		t.Fatal("a proxy over a store.VectorReader says it is not vectored")
	}
	if err := p.Put(ctx, High, "x", []byte("0123456789"), false); err != nil {
		t.Fatal(err)
	}
	bufs := [][]byte{make([]byte, 3), nil, make([]byte, 4), make([]byte, 10)}
	n, err := p.GetRangeV(ctx, High, "x", 1, bufs)
	if err != nil || n != 9 {
		t.Fatalf("GetRangeV = %d, %v; want 9 bytes", n, err)
	}
	if got := string(bufs[0]) + string(bufs[2]) + string(bufs[3][:2]); got != "123456789" {
		t.Fatalf("GetRangeV read %q, want %q", got, "123456789")
	}
	if s := p.Stats().Get; s != (OpStats{Attempts: 3, Retries: 2}) {
		t.Errorf("get stats %+v, want 3 attempts, 2 retries", s)
	}

	plain := newProxy(t, newHookStore(nil), Options{Uploaders: 1, Downloaders: 1})
	if plain.Vectored() {
		t.Fatal("a proxy over a store without GetRangeV says it is vectored")
	}
	if _, err := plain.GetRangeV(ctx, High, "x", 0, bufs); err == nil {
		t.Fatal("GetRangeV over a store without it: no error")
	}
}
