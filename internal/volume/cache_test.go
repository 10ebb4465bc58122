package volume_test

// Read-cache tests over the real engine (object proxy → volume → chunker):
// a cached byte is never stale or foreign, fetches are coalesced, and the
// memory bound holds. docs/ARCHITECTURE.md §1 (read path) describes the
// cache; its keys are (volume id, object key, window).

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/crc32c"
	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

const (
	kib = 1 << 10
	mib = 1 << 20
)

// vmodel is the newest acknowledged version of every block (0: zeros).
type vmodel struct {
	bs   int64
	mu   sync.Mutex
	ver  map[int64]uint64
	next uint64
}

func newVModel(bs int64) *vmodel { return &vmodel{bs: bs, ver: make(map[int64]uint64)} }

func (m *vmodel) write(tb testing.TB, dev frontend.Device, block, n int64) {
	tb.Helper()
	m.mu.Lock()
	vers := make([]uint64, n)
	for i := range vers {
		m.next++
		vers[i] = m.next
	}
	m.mu.Unlock()
	buf := make([]byte, n*m.bs)
	for i, v := range vers {
		enginetest.BlockVersion(buf[int64(i)*m.bs:int64(i+1)*m.bs], block+int64(i), v)
	}
	if err := dev.WriteAt(context.Background(), buf, block*m.bs, false); err != nil {
		tb.Fatalf("write blocks %d+%d: %v", block, n, err)
	}
	m.mu.Lock()
	for i, v := range vers {
		m.ver[block+int64(i)] = v
	}
	m.mu.Unlock()
}

func (m *vmodel) trim(tb testing.TB, dev frontend.Device, block, n int64) {
	tb.Helper()
	if err := dev.Zero(context.Background(), block*m.bs, n*m.bs, true, false); err != nil {
		tb.Fatalf("trim blocks %d+%d: %v", block, n, err)
	}
	m.mu.Lock()
	for i := int64(0); i < n; i++ {
		m.ver[block+i] = 0
	}
	m.mu.Unlock()
}

// verify reads [0, upTo) in reads of step blocks and compares each block
// with the model.
func (m *vmodel) verify(tb testing.TB, dev frontend.Device, upTo, step int64) {
	tb.Helper()
	m.verifyRange(tb, dev, 0, upTo, step)
}

// verifyRange is verify of [from, upTo).
func (m *vmodel) verifyRange(tb testing.TB, dev frontend.Device, from, upTo, step int64) {
	tb.Helper()
	m.verifyRangeCtx(tb, context.Background(), dev, from, upTo, step)
}

// verifyRangeCtx is verifyRange with the reads' context.
func (m *vmodel) verifyRangeCtx(tb testing.TB, ctx context.Context, dev frontend.Device, from, upTo, step int64) {
	tb.Helper()
	buf := make([]byte, step*m.bs)
	want := make([]byte, m.bs)
	for b := from; b < upTo; b += step {
		n := min(step, upTo-b)
		if err := dev.ReadAt(ctx, buf[:n*m.bs], b*m.bs); err != nil {
			tb.Fatalf("read blocks %d+%d: %v", b, n, err)
		}
		m.mu.Lock()
		for i := int64(0); i < n; i++ {
			got := buf[i*m.bs : (i+1)*m.bs]
			enginetest.BlockVersion(want, b+i, m.ver[b+i])
			if !bytes.Equal(got, want) {
				m.mu.Unlock()
				tb.Fatalf("block %d: got block %d version %d, want version %d", b+i,
					binary.LittleEndian.Uint64(got), binary.LittleEndian.Uint64(got[8:]), m.ver[b+i])
			}
		}
		m.mu.Unlock()
	}
}

func drainEngine(tb testing.TB, e *enginetest.Engine) {
	tb.Helper()
	if err := e.Dev.Drain(context.Background()); err != nil {
		tb.Fatalf("drain: %v", err)
	}
}

// TestCacheNeverStale warms the cache with every block, then overwrites,
// trims, collects dead objects and compacts with threshold GC; after each
// step every block reads as the model says, through a cache that keeps
// serving (hits grow), and again after a restart that keeps the cache.
func TestCacheNeverStale(t *testing.T) {
	// purged: the cache is emptied after every change, so what the reads
	// find was put there by earlier reads' fetches, not by commits.
	for _, purge := range []bool{false, true} {
		t.Run(fmt.Sprintf("mem/purged=%v", purge), func(t *testing.T) { testCacheNeverStale(t, mem.New(), purge) })
	}
	t.Run("minio/purged=true", func(t *testing.T) {
		srv := minio.Start(t)
		testCacheNeverStale(t, srv.Store(t, srv.Bucket(t)), true)
	})
}

func testCacheNeverStale(t *testing.T, st store.Store, purge bool) {
	ctx := context.Background()
	const (
		bs     = 4096
		filled = 8 * mib / bs
	)
	rc := newCache(t, 32*mib, 64*kib)
	eo := enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: 1 * mib, Cache: rc}
	e := enginetest.Open(t, st, eo)
	m := newVModel(bs)
	rng := rand.New(rand.NewPCG(3, 4))
	cool := func() {
		if purge {
			rc.Purge()
		}
	}
	for b := int64(0); b < filled; b += 64 {
		m.write(t, e.Dev, b, 64)
	}
	drainEngine(t, e)
	cool()
	m.verify(t, e.Dev, filled, 256) // warms the cache
	m.verify(t, e.Dev, filled, 7)   // odd-sized reads straddle windows
	hits := rc.Stats().Hits
	if hits == 0 {
		t.Fatal("no cache hits after reading the same blocks twice: the test would prove nothing")
	}

	// Overwrites and trims land in new objects; the map moves on, the
	// cached windows of the old objects must not be served for them.
	for range 400 {
		b, n := rng.Int64N(filled-16), 1+rng.Int64N(16)
		if rng.IntN(8) == 0 {
			m.trim(t, e.Dev, b, n)
		} else {
			m.write(t, e.Dev, b, n)
		}
	}
	drainEngine(t, e)
	cool()
	m.verify(t, e.Dev, filled, 256)
	m.verify(t, e.Dev, filled, 5)

	// Dead GC empties objects, threshold GC copies the live blocks into
	// new objects and empties the victims.
	c := gc.New(e.Volume, gc.Options{Step: 4096, LiveData: 0.9, Logger: zerolog.Nop()})
	if _, err := c.CollectDead(ctx); err != nil {
		t.Fatalf("dead GC: %v", err)
	}
	m.verify(t, e.Dev, filled, 64)
	cool()
	ts, err := c.Threshold(ctx)
	if err != nil {
		t.Fatalf("threshold GC: %v", err)
	}
	if ts.Compacted == 0 {
		t.Fatalf("threshold GC compacted nothing (examined %d): the test would prove nothing", ts.Examined)
	}
	cool()
	m.verify(t, e.Dev, filled, 256)
	m.verify(t, e.Dev, filled, 3)
	if got := rc.Stats().Hits; got <= hits {
		t.Fatalf("cache hits did not grow after GC (%d then %d): reads bypass it", hits, got)
	}

	// A restart in the same process keeps the cache: same volume id, so
	// entries stay valid; the blocks still read right.
	e.Close(t)
	e = enginetest.Open(t, st, eo)
	m.verify(t, e.Dev, filled, 256)
	m.write(t, e.Dev, 10, 30)
	drainEngine(t, e)
	cool()
	m.verify(t, e.Dev, filled, 256)
	m.verify(t, e.Dev, filled, 256)
	st2 := rc.Stats()
	t.Logf("cache: %+v", st2)
	if purge && st2.Fetches == 0 {
		t.Fatal("no fetches although the cache was purged")
	}
}

func newCache(tb testing.TB, memBytes, window int64) *cache.Cache {
	tb.Helper()
	c, err := cache.New(cache.Options{MemoryBytes: memBytes, Window: window, Logger: zerolog.Nop(), PoisonRecycled: true})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(c.Close)
	return c
}

// TestCacheForeignVolume wipes the bucket and creates a new volume there,
// which reuses the old volume's keys with other content, while the
// process keeps its cache (warm with the old volume's windows): the new
// volume never reads the old bytes. The new volume is written without the
// cache, so only a lookup that ignored the volume id could hit.
func TestCacheForeignVolume(t *testing.T) {
	const (
		bs     = 4096
		blocks = 4 * mib / bs
	)
	rc := newCache(t, 32*mib, 256*kib)
	eo := enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 1 * mib, Cache: rc}
	var ids []string
	for round := range 2 {
		st := mem.New() // a wiped bucket
		wo := eo
		if round == 1 {
			wo.Cache, wo.NoCache = nil, true
		}
		w := enginetest.Open(t, st, wo)
		m := newVModel(bs)
		m.next = uint64(round) << 32 // other content at the same blocks and keys
		for b := int64(0); b < blocks; b += 32 {
			m.write(t, w.Dev, b, 32)
		}
		w.Close(t)
		e := enginetest.Open(t, st, eo)
		ids = append(ids, e.Volume.Superblock().VolumeID)
		hits := rc.Stats().Hits
		m.verify(t, e.Dev, blocks, 64)
		m.verify(t, e.Dev, blocks, 64)
		if rc.Stats().Hits == hits {
			t.Fatalf("round %d: no cache hits", round)
		}
		e.Close(t)
	}
	if ids[0] == ids[1] {
		t.Fatalf("both volumes have id %s", ids[0])
	}
}

// TestCacheCoalescesAndServes counts GETs: a read whose blocks alternate
// between two objects costs one GET per object, not one per run, and a
// second read costs none.
func TestCacheCoalescesAndServes(t *testing.T) {
	const bs = 4096
	for _, withCache := range []bool{false, true} {
		t.Run(fmt.Sprintf("cache=%v", withCache), func(t *testing.T) {
			eo := enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 4 * mib, NoCache: !withCache}
			e := enginetest.Open(t, mem.New(), eo)
			m := newVModel(bs)
			m.write(t, e.Dev, 0, 64) // one object
			drainEngine(t, e)
			for b := int64(0); b < 64; b += 2 { // every other block in a second object
				m.write(t, e.Dev, b, 1)
			}
			drainEngine(t, e)
			if e.Cache != nil {
				e.Cache.Purge() // a cold cache: the reads below must fetch
			}
			gets := func() uint64 { return e.Objs.Stats().Get.Attempts }
			before := gets()
			m.verify(t, e.Dev, 64, 64)
			if n := gets() - before; n != 2 {
				t.Errorf("a read over 32 runs in 2 objects made %d GETs, want 2", n)
			}
			before = gets()
			m.verify(t, e.Dev, 64, 64)
			want := uint64(2)
			if withCache {
				want = 0
			}
			if n := gets() - before; n != want {
				t.Errorf("reading the same blocks again made %d GETs, want %d", n, want)
			}
		})
	}
}

// TestCacheConcurrentReadersWriters runs writers (each owning a stripe of
// blocks) and readers over a small cache that evicts all the time. Every
// block a reader sees is intact, is the block it asked for, and is a
// version at least as new as the one acknowledged before the read began
// and no newer than any handed out when it ended.
func TestCacheConcurrentReadersWriters(t *testing.T) {
	const (
		bs      = 4096
		writers = 4
		stripe  = 512 // blocks per writer
		blocks  = writers * stripe
	)
	rc := newCache(t, 2*mib, 16*kib)
	e := enginetest.Open(t, mem.New(), enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 1 * mib, Cache: rc})
	var acked, issued [blocks]atomic.Uint64
	var next atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errc := make(chan error, 16)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			buf := make([]byte, 16*bs)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				n := 1 + rng.Int64N(16)
				windows := w%2 == 1 // half the writers hand their payload over in windows
				if windows && rng.IntN(2) == 0 {
					n = 4 * (1 + rng.Int64N(4)) // whole 16 KiB windows
				}
				b := int64(w*stripe) + rng.Int64N(stripe-n+1)
				vers := make([]uint64, n)
				var wins [][]byte
				for j := range vers {
					vers[j] = next.Add(1)
					issued[b+int64(j)].Store(vers[j])
					dst := buf[int64(j)*bs : int64(j+1)*bs]
					if windows {
						if j%4 == 0 {
							wins = append(wins, e.Dev.PayloadWindow()[:0])
						}
						k := len(wins) - 1
						wins[k] = wins[k][:len(wins[k])+bs]
						dst = wins[k][len(wins[k])-bs:]
					}
					enginetest.BlockVersion(dst, b+int64(j), vers[j])
				}
				var err error
				if windows {
					var crcs []uint32 // half the time the caller's checksums
					if rng.IntN(2) == 0 {
						for _, w := range wins {
							crcs = append(crcs, crc32c.Checksum(w))
						}
					}
					err = e.Dev.WriteWindows(context.Background(), wins, crcs, n*bs, b*bs, false)
				} else {
					err = e.Dev.WriteAt(context.Background(), buf[:n*bs], b*bs, false)
				}
				if err != nil {
					errc <- err
					return
				}
				for j, v := range vers {
					acked[b+int64(j)].Store(v)
				}
				if i%50 == 0 {
					if err := e.Dev.Flush(context.Background()); err != nil {
						errc <- err
						return
					}
				}
			}
		}()
	}
	var reads atomic.Int64
	for r := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 2))
			buf := make([]byte, 128*bs)
			want := make([]byte, bs)
			var pos int64
			for {
				select {
				case <-stop:
					return
				default:
				}
				n := 1 + rng.Int64N(128)
				b := rng.Int64N(blocks - n + 1)
				if r == 0 { // a sequential stream: readahead runs under the writes
					n = 32
					if pos+n > blocks {
						pos = 0
					}
					b, pos = pos, pos+n
				}
				var low [128]uint64
				for j := range n {
					low[j] = acked[b+j].Load()
				}
				if err := e.Dev.ReadAt(context.Background(), buf[:n*bs], b*bs); err != nil {
					errc <- err
					return
				}
				for j := range n {
					got := buf[j*bs : (j+1)*bs]
					gb, gv := int64(binary.LittleEndian.Uint64(got)), binary.LittleEndian.Uint64(got[8:])
					high := issued[b+j].Load()
					enginetest.BlockVersion(want, b+j, gv)
					if (gv != 0 && gb != b+j) || gv < low[j] || gv > high || !bytes.Equal(got, want) {
						errc <- fmt.Errorf("block %d: read block %d version %d, want a version in [%d, %d], intact", b+j, gb, gv, low[j], high)
						return
					}
				}
				reads.Add(1)
			}
		}()
	}
	select {
	case err := <-errc:
		close(stop)
		wg.Wait()
		t.Fatal(err)
	case <-time.After(4 * time.Second):
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errc:
		t.Fatal(err)
	default:
	}
	st := rc.Stats()
	t.Logf("%d reads; cache %+v", reads.Load(), st)
	if st.Hits == 0 || st.Misses == 0 || st.RAFetches == 0 || e.Dev.AdoptedWindows() == 0 {
		t.Errorf("cache hits %d, misses %d, readahead GETs %d, payload windows taken without a copy %d: the test did not exercise every path",
			st.Hits, st.Misses, st.RAFetches, e.Dev.AdoptedWindows())
	}
	if used := rc.MemoryUsed(); used > rc.MemoryLimit() {
		t.Errorf("memory tier holds %d bytes, over its %d-byte limit", used, rc.MemoryLimit())
	}
}

func newDiskCache(tb testing.TB, dir string) *cache.Cache {
	tb.Helper()
	c, err := cache.New(cache.Options{MemoryBytes: 32 * mib, Window: 64 * kib, Dir: dir, DiskBytes: 64 * mib, Logger: zerolog.Nop()})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(c.Close)
	return c
}

// damage flips bytes in every cache segment under dir, so that every
// record in it is damaged (the segments' index files are left as they
// are: they point at the damaged records); it returns the number of
// segments.
func damage(tb testing.TB, dir string) int {
	tb.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() || filepath.Ext(p) != ".seg" {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		// Every 64th byte: every record of a segment (64 bytes or more,
		// header included) has one flipped.
		for i := 0; i < len(b); i += 64 {
			b[i] ^= 0x40
		}
		n++
		return os.WriteFile(p, b, 0o600)
	})
	if err != nil {
		tb.Fatal(err)
	}
	return n
}

// TestDiskCacheRestartAndDamage restarts the daemon (a new cache over the
// same directory): the warm disk tier serves the same bytes with fewer
// GETs. Then every file gets one flipped byte: the next start reads the
// right bytes anyway, having dropped and refetched every damaged window.
func TestDiskCacheRestartAndDamage(t *testing.T) {
	const (
		bs     = 4096
		blocks = 4 * mib / bs
	)
	dir := t.TempDir()
	st := mem.New()
	m := newVModel(bs)
	eo := enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 1 * mib, Cache: newDiskCache(t, dir)}
	e := enginetest.Open(t, st, eo)
	for b := int64(0); b < blocks; b += 32 {
		m.write(t, e.Dev, b, 32)
	}
	for i := int64(0); i < blocks; i += 7 {
		m.write(t, e.Dev, i, 1)
	}
	drainEngine(t, e)
	m.verify(t, e.Dev, blocks, 64)
	e.Close(t)
	eo.Cache.Close() // the daemon stops

	run := func(name string) cache.Stats {
		eo.Cache = newDiskCache(t, dir)
		e := enginetest.Open(t, st, eo)
		g0 := e.Objs.Stats().Get.Attempts
		m.verify(t, e.Dev, blocks, 64)
		gets := e.Objs.Stats().Get.Attempts - g0
		e.Close(t)
		eo.Cache.Close()
		s := eo.Cache.Stats()
		t.Logf("%s: %d GETs, cache %+v", name, gets, s)
		return s
	}
	warmThenDamaged(t, dir, run)
	again := run("after the refetch")
	if again.DiskHits == 0 || again.DiskDropped != 0 {
		t.Fatalf("refetched windows not cached again: disk hits %d, dropped %d", again.DiskHits, again.DiskDropped)
	}
}

// TestDiskCacheForeignVolume fills the cache directory from one volume,
// wipes the bucket, creates a new volume (written without the cache, so
// it reuses the same keys with other content) and moves the old volume's
// files under the new volume's id: none of them is served.
func TestDiskCacheForeignVolume(t *testing.T) {
	const (
		bs     = 4096
		blocks = 2 * mib / bs
	)
	dir := t.TempDir()
	old := newVModel(bs)
	eo := enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 1 * mib, Cache: newDiskCache(t, dir)}
	e := enginetest.Open(t, mem.New(), eo)
	for b := int64(0); b < blocks; b += 32 {
		old.write(t, e.Dev, b, 32)
	}
	oldID := e.Volume.Superblock().VolumeID
	e.Close(t)
	eo.Cache.Close()

	st := mem.New() // wiped
	m := newVModel(bs)
	m.next = 1 << 40
	w := enginetest.Open(t, st, enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 1 * mib, NoCache: true})
	for b := int64(0); b < blocks; b += 32 {
		m.write(t, w.Dev, b, 32)
	}
	newID := w.Volume.Superblock().VolumeID
	w.Close(t)
	if err := os.Rename(filepath.Join(dir, oldID), filepath.Join(dir, newID)); err != nil {
		t.Fatal(err)
	}
	eo.Cache = newDiskCache(t, dir)
	e = enginetest.Open(t, st, eo)
	m.verify(t, e.Dev, blocks, 64)
	e.Close(t)
	s := eo.Cache.Stats()
	t.Logf("cache %+v", s)
	// The bytes were checked above; here, that the foreign files were
	// dropped, and that any disk hit was on a file this run wrote itself
	// (a window fetched, written to disk, evicted from memory and read
	// again under load), never on one left by the other volume.
	if s.DiskDropped == 0 || s.DiskHits > s.DiskWritten {
		t.Fatalf("disk hits %d (files written this run %d), dropped %d: want the foreign files dropped and none served", s.DiskHits, s.DiskWritten, s.DiskDropped)
	}
}

// TestReadahead reads a cold volume sequentially, 64 KiB at a time with a
// pause between reads (as a slow consumer would): after the first reads
// of the stream, the windows are already in the cache, fetched by
// readahead at low priority, so the reads themselves fetch little. Random
// reads start no readahead. Every byte matches the model.
func TestReadahead(t *testing.T) {
	const (
		bs     = 4096
		blocks = 16 * mib / bs
		step   = 64 * kib / bs
	)
	rc := newCache(t, 64*mib, 256*kib)
	e := enginetest.Open(t, mem.New(), enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: 4 * mib, Cache: rc})
	m := newVModel(bs)
	for b := int64(0); b < blocks; b += 256 {
		m.write(t, e.Dev, b, 256)
	}
	drainEngine(t, e)

	rc.Purge()
	s0 := rc.Stats()
	rng := rand.New(rand.NewPCG(5, 5))
	for range 64 { // random 64 KiB reads, never adjacent: no stream
		b := rng.Int64N(blocks/step/2) * 2 * step
		m.verifyRange(t, e.Dev, b, b+step, step)
		time.Sleep(time.Millisecond)
	}
	if s := rc.Stats(); s.RAFetches != s0.RAFetches {
		t.Fatalf("random reads started %d readahead GETs", s.RAFetches-s0.RAFetches)
	}

	rc.Purge()
	s0 = rc.Stats()
	buf := make([]byte, step*bs)
	want := make([]byte, bs)
	for b := int64(0); b < blocks; b += step {
		if err := e.Dev.ReadAt(context.Background(), buf, b*bs); err != nil {
			t.Fatal(err)
		}
		for i := range int64(step) {
			enginetest.BlockVersion(want, b+i, m.ver[b+i])
			if !bytes.Equal(buf[i*bs:(i+1)*bs], want) {
				t.Fatalf("block %d differs from the model", b+i)
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	s := rc.Stats()
	fg := (s.Fetches - s.RAFetches) - (s0.Fetches - s0.RAFetches)
	ra := s.RAFetches - s0.RAFetches
	t.Logf("sequential read of %d MiB in 64 KiB reads: %d GETs by reads, %d by readahead (%d MiB), %d readahead hits", blocks*bs>>20, fg, ra, (s.RAFetchedBytes-s0.RAFetchedBytes)>>20, s.RAHits-s0.RAHits)
	if ra == 0 || fg > 4 {
		t.Fatalf("readahead made %d GETs, the reads %d: want readahead to fetch ahead of nearly every read", ra, fg)
	}
	if hits := s.RAHits - s0.RAHits; hits < blocks*bs/rc.Window()/2 {
		t.Fatalf("%d readahead hits over %d windows read: want most windows read to come from readahead", hits, blocks*bs/rc.Window())
	}
}

// TestRandomReadsPlanLittleReadahead reads random 4 KiB blocks of a
// cached 1 MiB hot set, where the 16 tracked streams are continued by
// chance (one read in 16): readahead must plan a small fraction of what
// the reads return, where a full-distance prefetch per chance
// continuation would plan 32 MiB each, and the planning alone (a map
// lookup over the range) cost a quarter of a hot-set read's CPU.
func TestRandomReadsPlanLittleReadahead(t *testing.T) {
	const (
		bs    = 4096
		hot   = mib / bs
		reads = 20000
	)
	rc := newCache(t, 64*mib, 64*kib)
	e := enginetest.Open(t, mem.New(), enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: 4 * mib, Cache: rc})
	m := newVModel(bs)
	for b := int64(0); b < 64*mib/bs; b += 256 {
		m.write(t, e.Dev, b, 256)
	}
	for b := int64(0); b < hot; b++ { // scatter the hot set over objects
		m.write(t, e.Dev, b, 1)
	}
	drainEngine(t, e)
	m.verifyRange(t, e.Dev, 0, hot, hot) // warm
	s0 := rc.Stats()
	rng := rand.New(rand.NewPCG(9, 9))
	for range reads {
		b := rng.Int64N(hot)
		m.verifyRange(t, e.Dev, b, b+1, 1)
	}
	s := rc.Stats()
	planned, starts := s.RAPlannedBytes-s0.RAPlannedBytes, s.RAStarts-s0.RAStarts
	t.Logf("%d random 4 KiB reads over %d KiB: %d prefetches planned %d KiB", reads, hot*bs>>10, starts, planned>>10)
	if limit := int64(reads * bs / 8); planned > limit {
		t.Fatalf("readahead planned %d KiB in %d prefetches for %d KiB of random reads: want at most %d KiB", planned>>10, starts, reads*bs>>10, limit>>10)
	}
}

// encryptedDiskEngine attaches the encrypted volume in raw (key file with
// every byte key) as main does, with a disk cache in dir sealed under the
// volume's cache key.
func encryptedDiskEngine(t *testing.T, raw store.Store, key byte, dir string, noCache bool) (*enginetest.Engine, enginetest.Options) {
	t.Helper()
	kf := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(kf, bytes.Repeat([]byte{key}, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	st, rec, err := sealed.Open(context.Background(), raw, sealed.KeyConfig{KeyFile: kf})
	if err != nil {
		t.Fatal(err)
	}
	eo := enginetest.Options{Size: 32 * mib, BlockSize: 4096, ChunkSize: 1 * mib, Encryption: rec, NoCache: noCache}
	if !noCache {
		cs, err := st.(*sealed.Store).CacheSealer()
		if err != nil {
			t.Fatal(err)
		}
		c, err := cache.New(cache.Options{MemoryBytes: 32 * mib, Window: 64 * kib, Dir: dir, DiskBytes: 64 * mib, Sealer: cs, Logger: zerolog.Nop()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		eo.Cache = c
	}
	return enginetest.Open(t, st, eo), eo
}

// plaintextIn returns a file under dir that holds 32 bytes from the middle
// of any block the model wrote, or "".
func plaintextIn(t *testing.T, dir string, m *vmodel) string {
	t.Helper()
	pieces := map[string]bool{}
	blk := make([]byte, m.bs)
	for b, v := range m.ver {
		if v != 0 {
			enginetest.BlockVersion(blk, b, v)
			pieces[string(blk[1000:1032])] = true
		}
	}
	found := ""
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() || found != "" {
			return err
		}
		raw, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for i := 0; i+32 <= len(raw); i++ {
			if pieces[string(raw[i:i+32])] {
				found = p
				break
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// TestEncryptedDiskCache runs an encrypted volume on MinIO with a disk
// cache (docs/ARCHITECTURE.md §16.5): no written block appears in the
// cache files; a restart is served from the warm disk tier with the same
// bytes; files with a flipped byte are dropped and refetched; and the
// directory moved under another encrypted volume (another key) serves
// nothing.
func TestEncryptedDiskCache(t *testing.T) {
	const blocks = 4 * mib / 4096
	srv := minio.Start(t)
	raw := srv.Store(t, srv.Bucket(t))
	dir := t.TempDir()
	m := newVModel(4096)
	e, _ := encryptedDiskEngine(t, raw, 1, dir, false)
	for b := int64(0); b < blocks; b += 32 {
		m.write(t, e.Dev, b, 32)
	}
	for i := int64(0); i < blocks; i += 7 {
		m.write(t, e.Dev, i, 1)
	}
	drainEngine(t, e)
	m.verify(t, e.Dev, blocks, 64) // reads fill the cache as well
	oldID := e.Volume.Superblock().VolumeID
	e.Close(t)
	e.Cache.Close()
	if s := e.Cache.Stats(); s.DiskWritten == 0 {
		t.Fatalf("no cache file written: %+v", s)
	}
	if p := plaintextIn(t, dir, m); p != "" {
		t.Fatalf("cache file %s holds plaintext of a written block", p)
	}

	run := func(name string) cache.Stats {
		e, _ := encryptedDiskEngine(t, raw, 1, dir, false)
		m.verify(t, e.Dev, blocks, 64)
		e.Close(t)
		e.Cache.Close()
		s := e.Cache.Stats()
		t.Logf("%s: cache %+v", name, s)
		return s
	}
	warmThenDamaged(t, dir, run)

	// Another encrypted volume, another key, the same keys with other
	// content; the old cache directory moved under its id.
	raw2 := srv.Store(t, srv.Bucket(t))
	m2 := newVModel(4096)
	m2.next = 1 << 40
	w, _ := encryptedDiskEngine(t, raw2, 2, "", true)
	for b := int64(0); b < blocks; b += 32 {
		m2.write(t, w.Dev, b, 32)
	}
	newID := w.Volume.Superblock().VolumeID
	w.Close(t)
	if err := os.Rename(filepath.Join(dir, oldID), filepath.Join(dir, newID)); err != nil {
		t.Fatal(err)
	}
	f, _ := encryptedDiskEngine(t, raw2, 2, dir, false)
	m2.verify(t, f.Dev, blocks, 64)
	f.Close(t)
	f.Cache.Close()
	s := f.Cache.Stats()
	t.Logf("foreign volume: cache %+v", s)
	if s.DiskHits > s.DiskWritten || s.DiskDropped == 0 {
		t.Fatalf("foreign directory: disk hits %d (of %d files written), dropped %d; want every foreign file dropped, none served", s.DiskHits, s.DiskWritten, s.DiskDropped)
	}
}

// warmThenDamaged restarts twice through run, which attaches with the disk
// cache in dir, reads every block back and returns the cache's stats: a
// warm restart is served from disk without a fetch; after every file is
// damaged, every damaged segment is dropped (at least one drop each), so
// no record is served, and the only disk hits are of windows that run wrote again after a
// refetch (a lookup that finds a window on disk before memory, e.g. while
// planning a stream's fetch of a whole object).
func warmThenDamaged(t *testing.T, dir string, run func(name string) cache.Stats) {
	t.Helper()
	warm := run("warm restart")
	if warm.DiskHits == 0 || warm.DiskDropped != 0 || warm.Fetches != 0 {
		t.Fatalf("warm restart: disk hits %d, dropped %d, fetches %d; want hits, nothing dropped, no fetch", warm.DiskHits, warm.DiskDropped, warm.Fetches)
	}
	n := damage(t, dir)
	hurt := run("after damaging every file")
	if hurt.DiskDropped < int64(n) || hurt.Fetches == 0 || hurt.DiskHits > hurt.DiskWritten {
		t.Fatalf("damaged %d files: dropped %d, fetches %d, disk hits %d of %d files written again; want every damaged file dropped, fetches, and hits only on rewritten files",
			n, hurt.DiskDropped, hurt.Fetches, hurt.DiskHits, hurt.DiskWritten)
	}
}

// TestReadaheadLoadsFromDisk: after a restart over a warm disk tier, a
// sequential stream's readahead loads the windows ahead of it from the
// disk tier (no GET), so its reads find them in memory and count
// readahead hits.
func TestReadaheadLoadsFromDisk(t *testing.T) {
	t.Run("mem", func(t *testing.T) { testReadaheadLoadsFromDisk(t, mem.New()) })
	t.Run("minio", func(t *testing.T) {
		srv := minio.Start(t)
		testReadaheadLoadsFromDisk(t, srv.Store(t, srv.Bucket(t)))
	})
}

func testReadaheadLoadsFromDisk(t *testing.T, st store.Store) {
	const (
		bs     = 4096
		blocks = 16 * mib / bs
		step   = mib / bs
	)
	dir := t.TempDir()
	m := newVModel(bs)
	eo := enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 1 * mib, Cache: newDiskCache(t, dir)}
	e := enginetest.Open(t, st, eo)
	for b := int64(0); b < blocks; b += step {
		m.write(t, e.Dev, b, step)
	}
	drainEngine(t, e)
	eo.Cache.Sync()
	e.Close(t)
	eo.Cache.Close()

	eo.Cache = newDiskCache(t, dir)
	e = enginetest.Open(t, st, eo)
	defer e.Close(t)
	m.verifyRange(t, e.Dev, 0, 4*step, step) // a stream: 4 MiB in 1 MiB reads
	read := int64(4 * mib / (64 * kib))
	// Its readahead loads the windows ahead of it: disk hits beyond what
	// the reads themselves took (a liveness wait, not a timing claim).
	deadline := time.Now().Add(20 * time.Second)
	for eo.Cache.Stats().DiskHits < read+32 {
		if time.Now().After(deadline) {
			t.Fatalf("no window loaded ahead from disk: %+v", eo.Cache.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	m.verifyRange(t, e.Dev, 4*step, blocks, step)
	if s := eo.Cache.Stats(); s.Fetches != 0 || s.RAHits == 0 {
		t.Fatalf("fetches %d, readahead hits %d; want every window from disk, some loaded ahead", s.Fetches, s.RAHits)
	}
}
