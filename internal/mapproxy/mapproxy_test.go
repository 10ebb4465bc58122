package mapproxy

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/extentmap"
)

func newMap(t testing.TB) *extentmap.Map {
	t.Helper()
	m, err := extentmap.New(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// waitPending waits until the proxy has exactly high and low requests
// queued. It synchronizes the test with goroutines it started; it asserts
// nothing about time.
func waitPending(t *testing.T, p *Proxy, high, low int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		h, l := p.Pending()
		if h == high && l == low {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pending = %d high, %d low; want %d, %d", h, l, high, low)
		}
		runtime.Gosched()
		time.Sleep(50 * time.Microsecond)
	}
}

// block occupies the owner goroutine until the returned release is called.
func block(t *testing.T, p *Proxy) (release func(), done <-chan error) {
	t.Helper()
	started := make(chan struct{})
	rel := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- p.Do(context.Background(), High, func(*extentmap.Map) {
			close(started)
			<-rel
		})
	}()
	<-started
	return func() { close(rel) }, errc
}

// recorder collects the names of requests in the order the owner ran them.
type recorder struct {
	mu    sync.Mutex
	order []string
}

func (r *recorder) fn(name string, extra func()) func(*extentmap.Map) {
	return func(*extentmap.Map) {
		r.mu.Lock()
		r.order = append(r.order, name)
		r.mu.Unlock()
		if extra != nil {
			extra()
		}
	}
}

func (r *recorder) get() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.order)
}

// enqueue submits one request from a new goroutine and waits until it is
// queued, so that queue order is deterministic.
func enqueue(t *testing.T, p *Proxy, wg *sync.WaitGroup, prio Priority, fn func(*extentmap.Map), high, low int) {
	t.Helper()
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := p.Do(context.Background(), prio, fn); err != nil {
			t.Errorf("Do: %v", err)
		}
	}()
	waitPending(t, p, high, low)
}

func TestHighOvertakesQueuedLow(t *testing.T) {
	p := New(newMap(t), time.Hour)
	defer p.Close()
	release, blocked := block(t, p)
	var rec recorder
	var wg sync.WaitGroup
	for i := 1; i <= 3; i++ {
		enqueue(t, p, &wg, Low, rec.fn(fmt.Sprintf("L%d", i), nil), 0, i)
	}
	for i := 1; i <= 3; i++ {
		enqueue(t, p, &wg, High, rec.fn(fmt.Sprintf("H%d", i), nil), i, 3)
	}
	release()
	wg.Wait()
	if err := <-blocked; err != nil {
		t.Fatal(err)
	}
	want := []string{"H1", "H2", "H3", "L1", "L2", "L3"}
	if got := rec.get(); !slices.Equal(got, want) {
		t.Fatalf("order = %v, want %v", got, want)
	}
}

// fakeClock is a clock the test advances from inside requests.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

func TestLowRunsAfterIdleTimeout(t *testing.T) {
	var clock fakeClock
	const idle = time.Second
	p := newProxy(newMap(t), idle, clock.now)
	defer p.Close()
	release, blocked := block(t, p)
	var rec recorder
	var wg sync.WaitGroup
	enqueue(t, p, &wg, Low, rec.fn("L", nil), 0, 1)
	// Constant High load: each High request takes a quarter of the idle
	// timeout, and more are always queued.
	for i := 0; i < 10; i++ {
		enqueue(t, p, &wg, High, rec.fn(fmt.Sprintf("H%d", i), func() { clock.advance(idle / 4) }), i+1, 1)
	}
	release()
	wg.Wait()
	if err := <-blocked; err != nil {
		t.Fatal(err)
	}
	// L was queued at 0; after H0..H3 the clock reads idle, so L is next.
	want := []string{"H0", "H1", "H2", "H3", "L", "H4", "H5", "H6", "H7", "H8", "H9"}
	if got := rec.get(); !slices.Equal(got, want) {
		t.Fatalf("order = %v, want %v", got, want)
	}
}

// TestLowNotStarvedUnderLoad runs Low requests against real, continuous
// High traffic from several goroutines; each must complete.
func TestLowNotStarvedUnderLoad(t *testing.T) {
	p := New(newMap(t), time.Millisecond)
	defer p.Close()
	stop := make(chan struct{})
	var load sync.WaitGroup
	for g := 0; g < 4; g++ {
		load.Add(1)
		go func() {
			defer load.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := p.Do(context.Background(), High, func(m *extentmap.Map) {
					m.Lookup(0, 64, func(extentmap.Extent) {})
				}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for i := 0; i < 20; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		ran := false
		err := p.Do(ctx, Low, func(*extentmap.Map) { ran = true })
		cancel()
		if err != nil || !ran {
			t.Fatalf("Low request %d: err %v, ran %v", i, err, ran)
		}
	}
	close(stop)
	load.Wait()
}

// TestConcurrentCallers checks, under -race, that functions never run
// concurrently and all of them run once.
func TestConcurrentCallers(t *testing.T) {
	p := New(newMap(t), time.Millisecond)
	const callers, each = 8, 500
	count := 0 // touched only on the owner goroutine
	var wg sync.WaitGroup
	for g := 0; g < callers; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				prio := High
				if i%3 == 0 {
					prio = Low
				}
				block := int64(g*each + i)
				err := p.Do(context.Background(), prio, func(m *extentmap.Map) {
					count++
					if _, err := m.Update(block, 1, int64(g), int64(i), 1); err != nil {
						t.Error(err)
					}
				})
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	var written int64
	if err := p.Do(context.Background(), Low, func(m *extentmap.Map) { written = m.WrittenBlocks() }); err != nil {
		t.Fatal(err)
	}
	p.Close()
	if count != callers*each || written != callers*each {
		t.Fatalf("ran %d functions, %d blocks written; want %d", count, written, callers*each)
	}
}

func TestCancelBeforeStart(t *testing.T) {
	p := New(newMap(t), time.Hour)
	defer p.Close()
	// An already cancelled context never queues.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := p.Do(ctx, High, func(*extentmap.Map) { t.Error("ran with a cancelled context") }); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}

	release, blocked := block(t, p)
	ctx, cancel = context.WithCancel(context.Background())
	var ran atomic.Bool
	errc := make(chan error, 1)
	go func() { errc <- p.Do(ctx, Low, func(*extentmap.Map) { ran.Store(true) }) }()
	waitPending(t, p, 0, 1)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	release()
	if err := <-blocked; err != nil {
		t.Fatal(err)
	}
	// A later Low request runs after the cancelled one would have.
	if err := p.Do(context.Background(), Low, func(*extentmap.Map) {}); err != nil {
		t.Fatal(err)
	}
	if ran.Load() {
		t.Fatal("cancelled request ran")
	}
	if h, l := p.Pending(); h != 0 || l != 0 {
		t.Fatalf("pending %d, %d after draining", h, l)
	}
}

func TestCancelAfterStartWaits(t *testing.T) {
	p := New(newMap(t), time.Hour)
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan struct{})
	finish := make(chan struct{})
	var finished atomic.Bool
	errc := make(chan error, 1)
	go func() {
		errc <- p.Do(ctx, High, func(*extentmap.Map) {
			close(started)
			<-finish
			finished.Store(true)
		})
	}()
	<-started
	cancel()
	select {
	case err := <-errc:
		t.Fatalf("Do returned %v while its function was still running", err)
	default:
	}
	close(finish)
	if err := <-errc; err != nil {
		t.Fatalf("err = %v, want nil once started", err)
	}
	if !finished.Load() {
		t.Fatal("Do returned before its function finished")
	}
}

func TestCloseServesQueued(t *testing.T) {
	p := New(newMap(t), time.Hour)
	release, blocked := block(t, p)
	var rec recorder
	var wg sync.WaitGroup
	enqueue(t, p, &wg, Low, rec.fn("L", nil), 0, 1)
	enqueue(t, p, &wg, High, rec.fn("H", nil), 1, 1)
	closed := make(chan struct{})
	go func() {
		p.Close()
		close(closed)
	}()
	// Close must not return, and new requests must be refused, while
	// queued work remains.
	for {
		p.mu.Lock()
		c := p.closed
		p.mu.Unlock()
		if c {
			break
		}
		runtime.Gosched()
	}
	if err := p.Do(context.Background(), High, func(*extentmap.Map) { t.Error("ran after Close") }); !errors.Is(err, ErrClosed) {
		t.Fatalf("Do during Close: %v, want ErrClosed", err)
	}
	select {
	case <-closed:
		t.Fatal("Close returned before queued requests ran")
	default:
	}
	release()
	wg.Wait()
	<-closed
	if err := <-blocked; err != nil {
		t.Fatal(err)
	}
	if got := rec.get(); !slices.Equal(got, []string{"H", "L"}) {
		t.Fatalf("order = %v, want [H L]", got)
	}
	if err := p.Do(context.Background(), Low, func(*extentmap.Map) { t.Error("ran after Close") }); !errors.Is(err, ErrClosed) {
		t.Fatalf("Do after Close: %v, want ErrClosed", err)
	}
	p.Close() // idempotent
}

func TestUnknownPriority(t *testing.T) {
	p := New(newMap(t), time.Hour)
	defer p.Close()
	if err := p.Do(context.Background(), Priority(7), func(*extentmap.Map) { t.Error("ran") }); err == nil {
		t.Fatal("unknown priority accepted")
	}
}

// BenchmarkDo measures the round trip of an empty request.
func BenchmarkDo(b *testing.B) {
	for _, prio := range []Priority{High, Low} {
		b.Run(prio.String(), func(b *testing.B) {
			p := New(newMap(b), time.Millisecond)
			defer p.Close()
			ctx := context.Background()
			fn := func(*extentmap.Map) {}
			b.ReportAllocs()
			for b.Loop() {
				if err := p.Do(ctx, prio, fn); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("high-parallel", func(b *testing.B) {
		p := New(newMap(b), time.Millisecond)
		defer p.Close()
		fn := func(*extentmap.Map) {}
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			ctx := context.Background()
			for pb.Next() {
				if err := p.Do(ctx, High, fn); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}
