package gc

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// TestThresholdFollowsLiveData fills a volume, churns a working set with
// random writes and discards, then runs dead GC, threshold GC, two
// checkpoints and dead GC again. Afterwards the device reads back exactly
// the model (also after a restart), no object without live data is left
// but placeholders at or above the delete floor, and the bucket's data
// bytes are bounded by the live data:
//
//	stored ≤ live / live_data + chunk_size + objects × metadata_size
//
// (every object older than the run keeps at least live_data of its blocks
// live or was compacted; copies are fully live; the newest object at the
// start is exempt and holds at most one chunk; every object carries its
// metadata area).
func TestThresholdFollowsLiveData(t *testing.T) {
	ctx := context.Background()
	srv := minio.Start(t)
	st := srv.Store(t, srv.Bucket(t))
	const (
		bs        = 4096
		size      = 256 * mib
		chunkSize = 1 * mib
		filled    = 32 * mib / bs
		ws        = 8 * mib / bs
		liveData  = 0.5
	)
	eo := enginetest.Options{Size: size, BlockSize: bs, ChunkSize: chunkSize}
	e := enginetest.Open(t, st, eo)
	m := newModel(bs)
	rng := rand.New(rand.NewPCG(7, 7))
	fill(t, e, m, filled)
	workload(t, e, m, rng, 0, ws, 64*mib)
	before := listData(t, st)

	c := New(e.Volume, Options{Step: 4096, LiveData: liveData, Logger: testLogger(t)})
	dead, err := c.CollectDead(ctx)
	if err != nil {
		t.Fatalf("dead GC: %v", err)
	}
	if dead.Placeholders+dead.Reclaimed == 0 {
		t.Fatalf("dead GC found nothing after 64 MiB of overwrites: %s", describe(dead))
	}
	afterDead := listData(t, st)
	ts, err := c.Threshold(ctx)
	if err != nil {
		t.Fatalf("threshold GC: %v", err)
	}
	if ts.Examined == 0 || ts.Compacted == 0 || ts.BytesRead == 0 || ts.BytesWritten == 0 || ts.Placeholders+ts.Reclaimed < ts.Compacted {
		t.Fatalf("threshold GC did not compact: %s", describe(ts))
	}
	if ts.BytesRead > afterDead.bytes() {
		t.Errorf("read %d bytes from a bucket holding %d", ts.BytesRead, afterDead.bytes())
	}

	// Two checkpoints at new watermarks raise the delete floor over the
	// placeholders; writes go outside the working set so the fresh
	// copies stay fully live.
	for i := range 2 {
		m.write(t, e.Dev, filled+int64(i), 1)
		drain(t, e)
		if err := e.Volume.Checkpoint(ctx); err != nil {
			t.Fatalf("checkpoint: %v", err)
		}
	}
	final, err := c.CollectDead(ctx)
	if err != nil {
		t.Fatalf("dead GC after checkpoints: %v", err)
	}
	if final.Reclaimed == 0 {
		t.Errorf("no placeholder deleted after the floor rose: %s", describe(final))
	}
	after := checkBucket(t, c, st)
	m.verify(t, e.Dev, filled+16)

	live := m.liveBytes()
	md := e.Volume.Layout().MetadataSize()
	nonEmpty := int64(0)
	for _, s := range after {
		if s > 0 {
			nonEmpty++
		}
	}
	bound := int64(float64(live)/liveData) + chunkSize + nonEmpty*md
	t.Logf("live %d MiB; stored: before %d MiB (%d objects), after dead GC %d MiB, after threshold GC %d MiB (%d objects, %d with data); bound %d MiB",
		live>>20, before.bytes()>>20, len(before), afterDead.bytes()>>20, after.bytes()>>20, len(after), nonEmpty, bound>>20)
	t.Logf("threshold run: %s", describe(ts))
	if after.bytes() > bound {
		t.Errorf("bucket holds %d bytes of data objects for %d live bytes: over the bound %d", after.bytes(), live, bound)
	}
	if after.bytes() >= afterDead.bytes() {
		t.Errorf("threshold GC did not shrink the bucket: %d bytes before, %d after", afterDead.bytes(), after.bytes())
	}

	e.Close(t)
	e = enginetest.Open(t, st, eo)
	m.verify(t, e.Dev, filled+16)
}

// TestUserWritesWinDuringCompaction overwrites, from several goroutines,
// the very blocks a threshold run is compacting (its GETs are slowed down
// so the run lasts); afterwards every block holds the user's newest write,
// also after a restart.
func TestUserWritesWinDuringCompaction(t *testing.T) {
	srv := minio.Start(t)
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			st := srv.Store(t, srv.Bucket(t))
			userWritesWin(t, st, seed, (*Collector).Threshold)
		})
	}
}

// runFunc is a compaction run: threshold GC, or a defragmentation.
type runFunc func(*Collector, context.Context) (Stats, error)

// userWritesWin runs run while writers overwrite the working set it is
// copying, then checks the writers won.
func userWritesWin(t *testing.T, raw store.Store, seed uint64, run runFunc) {
	ctx := context.Background()
	fs := faulty.New(raw)
	const (
		bs      = 4096
		ws      = 4 * mib / bs
		writers = 4
	)
	eo := enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: 1 * mib}
	e := enginetest.Open(t, fs, eo)
	m := newModel(bs)
	rng := rand.New(rand.NewPCG(seed, 1))
	workload(t, e, m, rng, 0, ws, 16*mib)

	// Slow GETs: the run stays in its read phase long enough for many
	// user writes to land between its scan and its commits.
	remove := fs.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpGet}, Match: func(name string) bool {
		_, ok := store.ParseDataName(name)
		return ok
	}, Delay: 2 * time.Millisecond})
	c := New(e.Volume, Options{Step: 512, LiveData: 0.9, Logger: testLogger(t)})
	type result struct {
		s   Stats
		err error
	}
	res := make(chan result, 1)
	var running atomic.Bool
	running.Store(true)
	go func() {
		s, err := run(c, ctx)
		running.Store(false)
		res <- result{s, err}
	}()
	var during atomic.Int64
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Each writer owns a quarter of the working set, so the
			// model knows the final value of every block.
			lo, hi := int64(w)*ws/writers, int64(w+1)*ws/writers
			r := rand.New(rand.NewPCG(seed, uint64(10+w)))
			for i := 0; running.Load() || i < 50; i++ {
				n := 1 + r.Int64N(8)
				b := lo + r.Int64N(hi-lo-n+1)
				var err error
				if r.IntN(10) == 0 {
					err = m.tryDiscard(e.Dev, b, n)
				} else {
					err = m.tryWrite(e.Dev, b, n)
				}
				if err != nil {
					t.Error(err)
					return
				}
				if running.Load() {
					during.Add(1)
				}
				if r.IntN(20) == 0 {
					if err := e.Dev.Flush(ctx); err != nil {
						t.Errorf("flush: %v", err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	r := <-res
	remove()
	if r.err != nil {
		t.Fatalf("run: %v", r.err)
	}
	if r.s.Compacted == 0 || r.s.BytesWritten == 0 {
		t.Fatalf("the run compacted nothing: %s", describe(r.s))
	}
	if during.Load() == 0 {
		t.Fatalf("no user write landed during the run")
	}
	drain(t, e)
	m.verify(t, e.Dev, ws)
	checkBucket(t, c, raw)
	t.Logf("%d user writes during the run; %s", during.Load(), describe(r.s))
	e.Close(t)
	e = enginetest.Open(t, raw, eo)
	m.verify(t, e.Dev, ws)
}

// TestCopyLosesToWritesAroundCommit overwrites every block of the working
// set at the two worst moments of a copy: after GC read the old data but
// before it took a key (the user's chunk gets the lower key and applies
// first), and after GC took its key (the user's chunk gets a higher key
// and waits for the copy to apply). Both times the user must win.
func TestCopyLosesToWritesAroundCommit(t *testing.T) {
	copyLosesAroundCommit(t, (*Collector).Threshold)
}

func copyLosesAroundCommit(t *testing.T, run runFunc) {
	for _, stage := range []string{"read", "key"} {
		t.Run(stage, func(t *testing.T) {
			ctx := context.Background()
			// The blocks the copy moves are the live half; the hook
			// overwrites exactly those.
			st := mem.New()
			const bs = 4096
			const ws = 64
			eo := enginetest.Options{Size: 16 * mib, BlockSize: bs, ChunkSize: 1 * mib}
			e := enginetest.Open(t, st, eo)
			m := newModel(bs)
			// One object with the whole working set, then half of it
			// overwritten: the first object is half live.
			m.write(t, e.Dev, 0, ws)
			drain(t, e)
			m.write(t, e.Dev, 0, ws/2)
			drain(t, e)
			m.write(t, e.Dev, 1000, 1)
			drain(t, e)
			c := New(e.Volume, Options{Step: 4096, LiveData: 1, Logger: testLogger(t)})
			var once sync.Once
			hooked := false
			c.hook = func(s string) {
				if s != stage {
					return
				}
				once.Do(func() {
					hooked = true
					for b := int64(ws / 2); b < ws; b += 4 {
						if err := m.tryWrite(e.Dev, b, 4); err != nil {
							t.Error(err)
							return
						}
					}
					if stage == "read" {
						// Committed before the copy takes its key.
						if err := e.Dev.Drain(ctx); err != nil {
							t.Errorf("drain: %v", err)
						}
					} else if err := e.Dev.Flush(ctx); err != nil {
						// Closed (keyed after the copy) but not waited
						// for: it cannot apply before the copy does.
						t.Errorf("flush: %v", err)
					}
				})
			}
			s, err := run(c, ctx)
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			if !hooked || s.Compacted == 0 {
				t.Fatalf("the copy never reached stage %q: %s", stage, describe(s))
			}
			drain(t, e)
			m.verify(t, e.Dev, 1024)
			e.Close(t)
			e = enginetest.Open(t, st, eo)
			m.verify(t, e.Dev, 1024)
		})
	}
}

// churned returns an engine on a mem store with a working set overwritten
// so that threshold GC at live_data 1 has work.
func churned(t *testing.T) (*enginetest.Engine, *model, store.Store) {
	t.Helper()
	return churnedBS(t, 4096)
}

func churnedBS(t *testing.T, bs int64) (*enginetest.Engine, *model, store.Store) {
	t.Helper()
	st := mem.New()
	e := enginetest.Open(t, st, enginetest.Options{Size: 16 * mib, BlockSize: bs, ChunkSize: 1 * mib})
	m := newModel(bs)
	workload(t, e, m, rand.New(rand.NewPCG(3, 3)), 0, 2*mib/bs, 8*mib)
	return e, m, st
}

// TestThresholdWithSmallBlocks compacts a volume of 512-byte blocks (one
// sector per block; items count sectors either way), with a step smaller
// than the working set, and checks content, bucket and restart.
//
// It runs with GETs of adjacent pieces only and with GETs reading through
// gaps (staged, then scattered into the chunk).
func TestThresholdWithSmallBlocks(t *testing.T) {
	for _, gap := range []int64{0, coalesceGap} {
		t.Run(fmt.Sprint("gap", gap), func(t *testing.T) {
			e, m, st := churnedBS(t, 512)
			c := New(e.Volume, Options{Step: 1000, LiveData: 0.6, Logger: testLogger(t)})
			c.gap = gap
			s, err := c.Threshold(context.Background())
			if err != nil {
				t.Fatalf("threshold GC: %v", err)
			}
			if s.Compacted == 0 || s.BytesWritten == 0 {
				t.Fatalf("nothing compacted: %s", describe(s))
			}
			if gap == 0 && s.BytesRead > s.BytesWritten {
				t.Errorf("adjacent-only GETs read %d bytes for copies of %d (data plus metadata)", s.BytesRead, s.BytesWritten)
			}
			m.verify(t, e.Dev, 2*mib/512+64)
			checkBucket(t, c, st)
			e.Close(t)
			e = enginetest.Open(t, st, enginetest.Options{Size: 16 * mib, BlockSize: 512, ChunkSize: 1 * mib})
			m.verify(t, e.Dev, 2*mib/512+64)
		})
	}
}

// TestThresholdIsExclusive holds a run inside its first copy and checks
// that a second run, from Threshold or Trigger, is refused meanwhile and
// accepted afterwards.
func TestThresholdIsExclusive(t *testing.T) {
	e, m, _ := churned(t)
	c := New(e.Volume, Options{Step: 1024, LiveData: 1, Logger: testLogger(t)})
	inside := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	c.hook = func(s string) {
		if s == "read" {
			once.Do(func() {
				close(inside)
				<-release
			})
		}
	}
	first := make(chan error, 1)
	go func() {
		_, err := c.Threshold(context.Background())
		first <- err
	}()
	<-inside
	if !c.Running() {
		t.Errorf("Running is false during a run")
	}
	if _, err := c.Threshold(context.Background()); !errors.Is(err, ErrBusy) {
		t.Errorf("second Threshold during a run: %v, want ErrBusy", err)
	}
	if c.Trigger() {
		t.Errorf("Trigger during a run started another one")
	}
	close(release)
	if err := <-first; err != nil {
		t.Fatalf("first run: %v", err)
	}
	if !c.Trigger() {
		t.Fatalf("Trigger refused with no run going")
	}
	c.Stop() // waits for the triggered run
	if c.Running() {
		t.Errorf("a run is still going after Stop")
	}
	if _, err := c.Threshold(context.Background()); !errors.Is(err, ErrStopped) {
		t.Errorf("Threshold after Stop: %v, want ErrStopped", err)
	}
	if c.Trigger() {
		t.Errorf("Trigger after Stop started a run")
	}
	m.verify(t, e.Dev, 1024)
}

// TestStopCancelsRunBetweenSteps stops the collector while a run is in
// its first copy: the run ends with the cancellation, no key is left
// half-committed (the volume keeps taking writes), and data is intact.
func TestStopCancelsRunBetweenSteps(t *testing.T) {
	e, m, _ := churned(t)
	c := New(e.Volume, Options{Step: 64, LiveData: 1, Logger: testLogger(t)})
	inside := make(chan struct{})
	var once sync.Once
	stopped := make(chan struct{})
	c.hook = func(s string) {
		if s == "read" {
			once.Do(func() {
				close(inside)
				// Stop is waiting for this run: let it proceed only once
				// the cancellation is visible.
				<-c.ctx.Done()
			})
		}
	}
	res := make(chan error, 1)
	go func() {
		_, err := c.Threshold(context.Background())
		res <- err
	}()
	<-inside
	go func() {
		c.Stop()
		close(stopped)
	}()
	err := <-res
	<-stopped
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("run stopped mid-way returned %v, want context.Canceled", err)
	}
	if err := e.Volume.Err(); err != nil {
		t.Fatalf("volume failed after a cancelled run: %v", err)
	}
	m.write(t, e.Dev, 2000, 4)
	drain(t, e)
	m.verify(t, e.Dev, 2048)
}

// TestStartCollectsDeadObjects checks the periodic loop: dead objects are
// reclaimed without anyone calling CollectDead.
func TestStartCollectsDeadObjects(t *testing.T) {
	st := mem.New()
	e := enginetest.Open(t, st, enginetest.Options{Size: 16 * mib, BlockSize: 4096, ChunkSize: 1 * mib})
	m := newModel(4096)
	m.write(t, e.Dev, 0, 8)
	drain(t, e)
	k := newestKey(e)
	m.write(t, e.Dev, 0, 8)
	drain(t, e)
	c := New(e.Volume, Options{Wait: 5 * time.Millisecond, Logger: testLogger(t)})
	c.Start()
	defer c.Stop()
	deadline := time.Now().Add(30 * time.Second)
	for {
		size, ok := objectSize(t, st, k)
		if ok && size == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("dead object %d not reclaimed by the loop within 30 s (size %d)", k, size)
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.Stop()
	m.verify(t, e.Dev, 16)
}
