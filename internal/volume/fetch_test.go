package volume_test

// Tests of how the read path fetches with the cache on (docs/ARCHITECTURE.md
// §1, read path): how much a miss fetches, and that concurrent misses of
// one window share one GET.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// slowStore delays every ranged GET of a data object, so that reads
// started together overlap.
type slowStore struct {
	store.Store
	delay time.Duration
}

func (s slowStore) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	if _, ok := store.ParseDataName(name); ok {
		select {
		case <-time.After(s.delay):
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	return s.Store.GetRange(ctx, name, off, buf)
}

// fetchEngine writes blocks [0, blocks) in 256-block writes and returns
// the engine, its model and its cache, purged: a 64 MiB device with a
// cache of 64 MiB (64 KiB windows, 256 KiB fetch span).
func fetchEngine(t *testing.T, st store.Store, blocks int64) (*enginetest.Engine, *vmodel, *cache.Cache) {
	t.Helper()
	return fetchEngineSized(t, st, blocks, 64*mib, 64*mib)
}

// fetchEngineSized is fetchEngine with the cache and device sizes given.
func fetchEngineSized(t *testing.T, st store.Store, blocks, cacheBytes, devBytes int64) (*enginetest.Engine, *vmodel, *cache.Cache) {
	t.Helper()
	const bs = 4096
	rc, err := cache.New(cache.Options{MemoryBytes: cacheBytes, Window: 64 * kib, FetchSize: 256 * kib})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rc.Close)
	e := enginetest.Open(t, st, enginetest.Options{Size: devBytes, BlockSize: bs, ChunkSize: 4 * mib, Cache: rc})
	m := newVModel(bs)
	for b := int64(0); b < blocks; b += 256 {
		m.write(t, e.Dev, b, 256)
	}
	drainEngine(t, e)
	rc.Purge()
	return e, m, rc
}

// TestFetchWidth: an isolated small read fetches only the window it
// touches; a read of two windows or more fetches the whole fetch span
// around its misses.
func TestFetchWidth(t *testing.T) {
	e, m, rc := fetchEngine(t, mem.New(), 4096)
	fetched := func() int64 { return rc.Stats().FetchedBytes }

	before := fetched()
	m.verifyRange(t, e.Dev, 2000, 2001, 1) // one 4 KiB block
	if n := fetched() - before; n <= 0 || n > 64*kib {
		t.Fatalf("an isolated 4 KiB read fetched %d bytes, want one 64 KiB window at most", n)
	}
	before = fetched()
	m.verifyRange(t, e.Dev, 1000, 1032, 32) // 128 KiB: wide
	if n := fetched() - before; n < 256*kib {
		t.Fatalf("a 128 KiB read fetched %d bytes, want at least its 256 KiB fetch span", n)
	}
	before = fetched()
	m.verifyRange(t, e.Dev, 3000, 3001, 1)
	m.verifyRange(t, e.Dev, 3001, 3017, 16) // 64 KiB, but continues a stream: wide
	// The span around the second read's miss, less at most the one window
	// the first read brought (a narrow 64 KiB read fetches 128 KiB at most).
	if n := fetched() - before; n < 192*kib {
		t.Fatalf("a 4 KiB read and a 64 KiB read continuing it fetched %d KiB, want the second to fetch a 256 KiB span", n>>10)
	}
}

// TestFetchSingleFlight: eight readers of the same cold megabyte, started
// together over a slow store, fetch each window once between them, and
// all read the right bytes.
func TestFetchSingleFlight(t *testing.T) {
	t.Run("mem", func(t *testing.T) { testFetchSingleFlight(t, mem.New()) })
	t.Run("minio", func(t *testing.T) {
		srv := minio.Start(t)
		testFetchSingleFlight(t, srv.Store(t, srv.Bucket(t)))
	})
}

func testFetchSingleFlight(t *testing.T, st store.Store) {
	e, m, rc := fetchEngine(t, slowStore{st, 50 * time.Millisecond}, 1024)
	before := rc.Stats().FetchedBytes
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			m.verifyRange(t, e.Dev, 256, 512, 256) // 1 MiB
		}()
	}
	close(start)
	wg.Wait()
	// 1 MiB plus at most the fetch spans at both ends.
	if n := rc.Stats().FetchedBytes - before; n > mib+2*256*kib {
		t.Fatalf("8 concurrent readers of 1 MiB fetched %d KiB, want each window fetched once (at most %d KiB)", n>>10, (mib+2*256*kib)>>10)
	}
}

// TestFetchWaiterRefetches: a read waiting for a window another read is
// fetching fetches it itself when that fetch fails (here: the first
// reader gives up), and returns the right bytes.
func TestFetchWaiterRefetches(t *testing.T) {
	e, m, _ := fetchEngine(t, slowStore{mem.New(), 300 * time.Millisecond}, 256)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	first := make(chan error, 1)
	go func() {
		first <- e.Dev.ReadAt(ctx, make([]byte, 4096), 10*4096)
	}()
	time.Sleep(20 * time.Millisecond) // the first read has claimed the window
	m.verifyRange(t, e.Dev, 10, 11, 1)
	if err := <-first; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the first read returned %v, want its deadline exceeded", err)
	}
}

// TestFetchScatteredWhole: a stream that takes a few scattered blocks of
// an object (random overwrites that landed together) fetches all of that
// object at once, since the stream will need the rest of it further on,
// instead of span by span.
func TestFetchScatteredWhole(t *testing.T) {
	e, m, rc, scattered := scatteredEngine(t)
	m.verifyRange(t, e.Dev, 0, 256, 256)   // 1 MiB: not yet a stream
	m.verifyRange(t, e.Dev, 256, 512, 256) // continues it: 32 scattered blocks of that object
	// The read fetches it whole, or the readahead it started, which may
	// come first.
	waitWhole(t, e, rc, scattered)
}

// scatteredEngine writes 16 MiB sequentially, then every 8th block of the
// first 4096 again (one object, its blocks scattered over the stream's
// way), and returns the engine, its model, its cache and the key of the
// scattered object, with the cache purged.
func scatteredEngine(t *testing.T) (*enginetest.Engine, *vmodel, *cache.Cache, int64) {
	t.Helper()
	e, m, rc := fetchEngine(t, mem.New(), 4096)
	for b := int64(0); b < 4096; b += 8 { // 512 blocks, 2 MiB, in one object
		m.write(t, e.Dev, b, 1)
	}
	drainEngine(t, e)
	rc.Purge()
	return e, m, rc, e.Volume.Watermark() - 1
}

// cachedWindows counts the windows of the first 2 MiB of key's data area
// that the cache holds.
func cachedWindows(e *enginetest.Engine, rc *cache.Cache, key int64) int {
	id := e.Volume.Superblock().VolumeID
	n := 0
	for w := int64(0); w < 2*mib/(64*kib); w++ {
		if rc.Contains(cache.Key{Volume: id, Object: key, Window: w}) {
			n++
		}
	}
	return n
}

// waitWhole waits until every window of the scattered object is cached:
// the stream's read or its readahead (in the background) fetches it whole.
func waitWhole(t *testing.T, e *enginetest.Engine, rc *cache.Cache, key int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := cachedWindows(e, rc, key)
		if n == 32 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of 32 windows of the scattered object cached 10 s after a stream took some of its blocks: want all", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFetchScatteredWholeOnce: a stream fetches a scattered object whole
// once. When the cache has lost it before the stream got past all its
// blocks (a cache smaller than the scattered data), the stream's later
// reads fetch the spans they need, not the whole object again, so a
// cache too small for the scattered data cannot multiply what a stream
// fetches.
func TestFetchScatteredWholeOnce(t *testing.T) {
	e, m, rc, key := scatteredEngine(t)
	m.verifyRange(t, e.Dev, 0, 512, 256) // a stream: the object fetched whole
	waitWhole(t, e, rc, key)
	rc.Purge() // evicted before the stream is done with it
	m.verifyRange(t, e.Dev, 512, 1280, 256)
	if n := cachedWindows(e, rc, key); n >= 16 {
		t.Fatalf("after the cache lost the scattered object, the stream's next reads brought back %d of its 32 windows: want only the spans they need, not the whole object again", n)
	}
}

// TestStreamOutOfOrder: large reads that arrive slightly out of order (a
// client with several in flight; a loop device over FUSE splits each
// request in two served concurrently) still continue their stream: it
// does not fetch the scattered object whole a second time as a new
// stream would.
func TestStreamOutOfOrder(t *testing.T) {
	e, m, rc, key := scatteredEngine(t)
	m.verifyRange(t, e.Dev, 0, 512, 256)
	waitWhole(t, e, rc, key)
	rc.Purge()
	for _, b := range []int64{768, 512, 1024} { // 768 arrives before 512
		m.verifyRange(t, e.Dev, b, b+256, 256)
	}
	if n := cachedWindows(e, rc, key); n >= 16 {
		t.Fatalf("reads of one stream arriving out of order brought back %d of the scattered object's 32 windows: want them taken as one stream, which fetched the object whole already", n)
	}
}

// TestOneLookupPerWindow: a read looks each cached window up once, however
// many of its pieces the window holds: a window of the stream tier moves
// to the main tier on its second use, and one read must count as one.
func TestOneLookupPerWindow(t *testing.T) {
	e, m, rc := fetchEngine(t, mem.New(), 256)
	for b := int64(1); b < 16; b += 2 { // window 0 of the first object: 8 pieces
		m.write(t, e.Dev, b, 1)
	}
	drainEngine(t, e)
	rc.Purge()
	m.verifyRange(t, e.Dev, 0, 16, 16) // fetches both objects' windows
	before := rc.Stats().Hits
	m.verifyRange(t, e.Dev, 0, 16, 16)
	// One window of the first object, one of the object of the overwrites.
	if n := rc.Stats().Hits - before; n != 2 {
		t.Fatalf("a read of 16 blocks in 16 pieces over 2 cached windows made %d cache lookups that hit, want 2", n)
	}
}

// TestStreamKeepsScattered: a stream through four times more data than
// the cache holds keeps the windows of the scattered object it fetched
// whole (its blocks are all over the stream's way) and fetches each byte
// about once: the windows it reads through go to the cache's stream
// tier, not to the main tier where they would push the scattered
// object's windows out, and its readahead runs no further ahead than the
// stream tier holds.
func TestStreamKeepsScattered(t *testing.T) {
	const blocks = 16384 // 64 MiB
	e, m, rc := fetchEngineSized(t, mem.New(), blocks, 16*mib, 128*mib)
	for b := int64(5); b < blocks; b += 128 { // 128 blocks, 512 KiB, in one object
		m.write(t, e.Dev, b, 1)
	}
	drainEngine(t, e)
	key := e.Volume.Watermark() - 1
	rc.Purge()
	s0 := rc.Stats()
	m.verifyRange(t, e.Dev, 0, blocks, 64) // 256 KiB reads
	s1 := rc.Stats()
	id := e.Volume.Superblock().VolumeID
	for w := int64(0); w < 8; w++ {
		if !rc.Contains(cache.Key{Volume: id, Object: key, Window: w}) {
			t.Fatalf("window %d of the scattered object was evicted while a stream read past it", w)
		}
	}
	// 64 MiB of base objects and 512 KiB of the scattered one; readahead
	// may run up to its distance past the end.
	if n := s1.FetchedBytes - s0.FetchedBytes; n > 68*mib {
		t.Fatalf("a 64 MiB stream fetched %d MiB: want each byte about once", n>>20)
	}
	if s1.RAHits == s0.RAHits {
		t.Fatal("the stream used no window its readahead fetched")
	}
}

// TestFetchBuffersNotKept: the buffers GETs land in are pooled and reused
// by later GETs; the cache keeps copies, so windows one read cached still
// hold their bytes after many other fetches went through the same
// buffers.
func TestFetchBuffersNotKept(t *testing.T) {
	e, m, rc := fetchEngine(t, mem.New(), 4096) // 16 MiB, cache of 64 MiB
	m.verifyRange(t, e.Dev, 0, 256, 64)
	for b := int64(256); b < 4096; b += 256 {
		m.verifyRange(t, e.Dev, b, b+256, 64)
	}
	before := rc.Stats().FetchedBytes
	m.verifyRange(t, e.Dev, 0, 256, 64)
	if got := rc.Stats().FetchedBytes; got != before {
		t.Fatalf("the first MiB was fetched again (%d bytes): the test needs it served from the cache", got-before)
	}
}

// damagingStore reads into several buffers and, while fail is set,
// scribbles over them and reports the object damaged (a final error: no
// retry).
type damagingStore struct {
	*mem.Store
	fail atomic.Bool
}

func (d *damagingStore) GetRangeV(ctx context.Context, name string, off int64, bufs [][]byte) (int, error) {
	if d.fail.Load() {
		for _, b := range bufs {
			for i := range b {
				b[i] = 0xEE
			}
		}
		return 0, fmt.Errorf("get %q: %w", name, store.ErrCorrupt)
	}
	return d.Store.GetRangeV(ctx, name, off, bufs)
}

// TestFailedFetchKeepsNothing: the windows a failed GET was reading into
// are not kept, whatever the failure left in them: once the store
// answers again, the same reads return the written bytes.
func TestFailedFetchKeepsNothing(t *testing.T) {
	st := &damagingStore{Store: mem.New()}
	e, m, rc := fetchEngine(t, st, 256)
	st.fail.Store(true)
	buf := make([]byte, 64*kib)
	for off := int64(0); off < mib; off += int64(len(buf)) {
		if err := e.Dev.ReadAt(context.Background(), buf, off); err == nil {
			t.Fatalf("read at %d through a failing store: no error", off)
		}
	}
	if n := rc.Stats().Hits; n != 0 {
		t.Fatalf("%d cache hits while every GET failed", n)
	}
	st.fail.Store(false)
	m.verifyRange(t, e.Dev, 0, 256, 16)
}

// TestStreamObservedOnArrival: large reads observed as they arrive
// (frontend.ReadObserver, as the NBD server does) are one stream, in
// whatever order they then reach the engine. Here each batch of eight
// 1 MiB reads is read last first, as Go's scheduler tends to run the
// goroutines serving them: taken in that order, the reads jumped past the
// stream's slack and began new streams, which planned the same blocks'
// readahead again.
func TestStreamObservedOnArrival(t *testing.T) {
	const (
		blocks = 16384 // 64 MiB
		n      = 256   // 1 MiB reads
		depth  = 8
	)
	e, m, rc := fetchEngine(t, mem.New(), blocks)
	ro, ok := frontend.Device(e.Dev).(frontend.ReadObserver)
	if !ok {
		t.Fatal("the engine's device does not observe reads")
	}
	bs := m.bs
	s0 := rc.Stats()
	for b0 := int64(0); b0 < blocks; b0 += depth * n {
		ctxs := make([]context.Context, depth)
		for i := range ctxs {
			ctxs[i] = ro.ObserveRead(context.Background(), (b0+int64(i)*n)*bs, n*bs)
		}
		for i := depth - 1; i >= 0; i-- {
			m.verifyRangeCtx(t, ctxs[i], e.Dev, b0+int64(i)*n, b0+int64(i+1)*n, n)
		}
	}
	s := rc.Stats()
	planned, starts := s.RAPlannedBytes-s0.RAPlannedBytes, s.RAStarts-s0.RAStarts
	t.Logf("%d MiB read in 1 MiB reads, %d at a time, last first: %d prefetches planned %d MiB", blocks*bs>>20, depth, starts, planned>>20)
	if planned == 0 {
		t.Fatal("no readahead: the reads were not taken for a stream")
	}
	if planned > blocks*bs {
		t.Fatalf("readahead planned %d MiB for a %d MiB read: want each block planned once, by one stream", planned>>20, blocks*bs>>20)
	}
}
