package gc

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

var errCrashed = errors.New("store is gone (simulated crash)")

// crashStore lets a budget of bucket changes (Put, Delete) through once
// armed; the next one, and every call after it, fails: from the bucket's
// point of view the daemon died at that moment.
type crashStore struct {
	store.Store
	armed   atomic.Bool
	budget  atomic.Int64
	once    sync.Once
	crashed chan struct{}
}

func newCrashStore(s store.Store) *crashStore {
	return &crashStore{Store: s, crashed: make(chan struct{})}
}

func (s *crashStore) arm(budget int64) {
	s.budget.Store(budget)
	s.armed.Store(true)
}

func (s *crashStore) check(mutating bool) error {
	select {
	case <-s.crashed:
		return errCrashed
	default:
	}
	if s.armed.Load() && mutating && s.budget.Add(-1) < 0 {
		s.once.Do(func() { close(s.crashed) })
		return errCrashed
	}
	return nil
}

func (s *crashStore) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	if err := s.check(true); err != nil {
		return err
	}
	return s.Store.Put(ctx, name, body, ifAbsent)
}

func (s *crashStore) Delete(ctx context.Context, name string) error {
	if err := s.check(true); err != nil {
		return err
	}
	return s.Store.Delete(ctx, name)
}

func (s *crashStore) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	if err := s.check(false); err != nil {
		return 0, err
	}
	return s.Store.GetRange(ctx, name, off, buf)
}

func (s *crashStore) Size(ctx context.Context, name string) (int64, error) {
	if err := s.check(false); err != nil {
		return 0, err
	}
	return s.Store.Size(ctx, name)
}

func (s *crashStore) List(ctx context.Context, prefix string, fn func(string, int64) error) error {
	if err := s.check(false); err != nil {
		return err
	}
	return s.Store.List(ctx, prefix, fn)
}

// crashable is an engine wired like enginetest's, whose teardown the test
// controls: it is abandoned, not closed.
type crashable struct{ *enginetest.Engine }

func openCrashable(t *testing.T, st store.Store, o enginetest.Options) *crashable {
	t.Helper()
	e, err := enginetest.New(st, o)
	if err != nil {
		t.Fatal(err)
	}
	return &crashable{e}
}

// abandon stops the engine's goroutines after its store died. Their
// errors are the crash itself (nothing can reach the bucket any more),
// so they are logged, not checked.
func (e *crashable) abandon(t *testing.T) {
	e.Objs.Close()
	if err := e.Dev.Close(); err != nil {
		t.Logf("abandoned chunker: %v", err)
	}
	if err := e.Volume.Close(context.Background()); err != nil {
		t.Logf("abandoned volume: %v", err)
	}
}

// TestCrashDuringThresholdGC lets a threshold run change the bucket a
// given number of times (copies, placeholders, deletes, checkpoints) and
// then kills the store under it; a new engine attached to the bucket must
// read back the model, and GC on it must work.
func TestCrashDuringThresholdGC(t *testing.T) {
	srv := minio.Start(t)
	crashedMidRun := 0
	for i, budget := range []int64{0, 1, 3, 6, 12, 25} {
		t.Run(fmt.Sprint("budget", budget), func(t *testing.T) {
			if crashDuringThreshold(t, srv, uint64(i), budget) {
				crashedMidRun++
			}
		})
	}
	if crashedMidRun < 3 {
		t.Errorf("only %d of the cases crashed during the run; the budgets no longer reach into it", crashedMidRun)
	}
}

func crashDuringThreshold(t *testing.T, srv *minio.Server, seed uint64, budget int64) (midRun bool) {
	ctx := context.Background()
	raw := srv.Store(t, srv.Bucket(t))
	cs := newCrashStore(raw)
	const bs = 4096
	eo := enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: 1 * mib}
	e := openCrashable(t, cs, eo)
	m := newModel(bs)
	rng := rand.New(rand.NewPCG(seed, 5))
	ee := e.Engine
	const ws = 2 * mib / bs
	fill(t, ee, m, 4*mib/bs)
	// Checkpoints between the churn: the delete floor ends up inside the
	// keys GC reclaims, so the run both deletes and writes placeholders.
	for range 2 {
		workload(t, ee, m, rng, 0, ws, 4*mib)
		if err := e.Volume.Checkpoint(ctx); err != nil {
			t.Fatalf("checkpoint: %v", err)
		}
	}
	workload(t, ee, m, rng, 0, ws, 4*mib)

	c := New(e.Volume, Options{Step: 256, LiveData: 0.7, Logger: zerolog.Nop()})
	cs.arm(budget)
	res := make(chan error, 1)
	var st Stats
	go func() {
		var err error
		st, err = c.Threshold(ctx)
		res <- err
	}()
	var err error
	select {
	case <-cs.crashed:
		midRun = true
		e.Objs.Close() // stuck retries end now
		err = <-res
	case err = <-res:
	}
	t.Logf("budget %d: crashed mid-run %v; run: %s; %v", budget, midRun, describe(st), err)
	if midRun && err == nil {
		t.Errorf("run reported success although the store died under it")
	}
	if !midRun && err != nil {
		t.Fatalf("run failed without a crash: %v", err)
	}
	c.Stop()
	e.abandon(t)

	e2 := enginetest.Open(t, raw, eo)
	m.verify(t, e2.Dev, 4*mib/bs)
	c2 := New(e2.Volume, Options{Step: 256, LiveData: 0.7, Logger: testLogger(t)})
	if _, err := c2.Threshold(ctx); err != nil {
		t.Fatalf("threshold GC after the crash: %v", err)
	}
	checkBucket(t, c2, raw)
	m.verify(t, e2.Dev, 4*mib/bs)
	return midRun
}
