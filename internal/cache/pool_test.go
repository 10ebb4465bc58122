package cache

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"
)

// Every buffer the pool takes back is overwritten in this package's
// tests: a holder that reads one after its memory was reused reads
// garbage, not the old bytes by luck.
func init() { poisonRecycled = true }

// content is what window k holds in these tests: its key, then bytes
// derived from it, so a window that shows another's bytes is caught.
func content(k Key, n int) []byte {
	b := make([]byte, n)
	binary.LittleEndian.PutUint64(b, uint64(k.Object))
	binary.LittleEndian.PutUint64(b[8:], uint64(k.Window))
	for i := 16; i < n; i++ {
		b[i] = byte(int64(i) ^ k.Object*7 ^ k.Window*13)
	}
	return b
}

func keep(c *Cache, k Key, stream bool) {
	buf := c.Buffer(int(c.Window()))
	copy(buf, content(k, len(buf)))
	c.Keep(k, buf, stream, false)
}

// put stores data as window k as the read and commit paths do: copied
// into a buffer from Buffer (shorter than a window for an object's last
// window) and handed over with Keep.
func put(c *Cache, k Key, data []byte) { keepData(c, k, data, false, false) }

// putAhead is put for a window readahead fetched (Keep with ahead).
func putAhead(c *Cache, k Key, data []byte) { keepData(c, k, data, false, true) }

// putStream is put for a window a sequential stream takes once (Keep
// with stream); ahead marks one its readahead fetched.
func putStream(c *Cache, k Key, data []byte, ahead bool) { keepData(c, k, data, true, ahead) }

func keepData(c *Cache, k Key, data []byte, stream, ahead bool) {
	if int64(len(data)) > c.Window() {
		// Buffer would cut it to a window: a bug in the test, not a
		// case of the cache (a buffer not from Buffer is tested with
		// Keep directly).
		panic(fmt.Sprintf("test puts %d bytes in a window of %d", len(data), c.Window()))
	}
	buf := c.Buffer(len(data))
	copy(buf, data)
	c.Keep(k, buf, stream, ahead)
}

// get returns a copy of window k's bytes, read as the read path does:
// Acquire, copy out, Release.
func get(c *Cache, k Key) ([]byte, bool) { return copyOut(c.Acquire(k)) }

// getStream is get for a sequential stream's read (AcquireStream).
func getStream(c *Cache, k Key) ([]byte, bool) { return copyOut(c.AcquireStream(k)) }

func copyOut(v View, ok bool) ([]byte, bool) {
	if !ok {
		return nil, false
	}
	defer v.Release()
	return bytes.Clone(v.Data), true
}

// keepMany keeps windows 2 to 199 of volA, enough to evict window 1 of a
// cache of 16 windows; with streams, every other one as a stream's.
func keepMany(c *Cache, streams bool) {
	for i := int64(2); i < 200; i++ {
		keep(c, Key{Volume: volA, Object: i}, streams && i%2 == 0)
		c.mem.CleanUp()
	}
}

// TestHeldWindowNotReused: a window a reader holds keeps its bytes while
// it is evicted and the cache goes on reusing evicted windows' memory;
// once released, its memory is reused.
func TestHeldWindowNotReused(t *testing.T) {
	const w = MinWindow
	c := newTest(t, 16*(w+entryOverhead+int64(len(volA))), w)
	held := Key{Volume: volA, Object: 1}
	keep(c, held, false)
	v, ok := c.Acquire(held)
	if !ok {
		t.Fatal("a window just kept is missing")
	}
	keepMany(c, true)
	s := c.Stats()
	if s.BuffersReused == 0 || s.BuffersFreed == 0 {
		t.Fatalf("buffers reused %d, freed %d: the cache did not reuse evicted windows", s.BuffersReused, s.BuffersFreed)
	}
	if _, ok := c.Acquire(held); ok {
		t.Fatal("the held window is still cached after 200 others: this test needs it evicted")
	}
	if !bytes.Equal(v.Data, content(held, w)) {
		t.Fatal("a held window's bytes changed after it was evicted: its memory was reused while a reader held it")
	}
	before := c.Stats().BuffersFreed
	v.Release()
	if got := c.Stats().BuffersFreed; got != before+1 {
		t.Fatalf("buffers freed %d after the release, want %d", got, before+1)
	}
	if s := c.Stats(); s.RefErrors != 0 {
		t.Fatalf("%d releases past zero", s.RefErrors)
	}
}

// TestPooledWindowsConcurrent: writers keep windows (main and stream
// tier), readers acquire and check them while they are evicted and their
// memory reused, with the disk tier queueing evicted windows; every byte
// a reader sees and every record the disk tier wrote is the window's
// own. Run with -race.
func TestPooledWindowsConcurrent(t *testing.T) {
	const w = MinWindow
	dir := t.TempDir()
	c, err := New(Options{MemoryBytes: 32 * (w + entryOverhead + int64(len(volA))), Window: w, Dir: dir, DiskBytes: 64 << 20, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	const keys = 400
	key := func(r *rand.Rand) Key {
		return Key{Volume: volA, Object: int64(r.IntN(keys / 4)), Window: int64(r.IntN(4))}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 4 {
		wg.Add(2)
		go func() { // writer
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for i := range 3000 {
				k := key(r)
				switch i % 5 {
				case 0:
					putAhead(c, k, content(k, w)) // first use races to count the readahead hit
				case 1:
					c.LoadAhead(k) // not pooled: read from disk
				default:
					keep(c, k, i%2 == 0)
				}
			}
		}()
		go func() { // reader
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 2))
			for i := range 6000 {
				k := key(r)
				acquire := c.Acquire
				if i%2 == 0 {
					acquire = c.AcquireStream
				}
				v, ok := acquire(k)
				if !ok {
					continue
				}
				want := content(k, w)
				if !bytes.Equal(v.Data, want) {
					errs <- fmt.Errorf("window %+v: wrong bytes on acquire", k)
					v.Release()
					return // one error per reader: errs never fills
				}
				runtime.Gosched() // let writers evict it and reuse memory
				if !bytes.Equal(v.Data, want) {
					errs <- fmt.Errorf("window %+v: bytes changed while held", k)
					v.Release()
					return
				}
				v.Release()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	s := c.Stats()
	if s.RefErrors != 0 {
		t.Errorf("%d releases past zero", s.RefErrors)
	}
	if s.BuffersReused == 0 {
		t.Error("no buffer was reused: the test did not exercise reuse")
	}
	c.Close()
	// What the disk tier wrote from pooled windows is each window's own.
	c, err = New(Options{MemoryBytes: 1 << 20, Window: w, Dir: dir, DiskBytes: 64 << 20, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	found := 0
	for o := range int64(keys / 4) {
		for win := range int64(4) {
			k := Key{Volume: volA, Object: o, Window: win}
			if got, ok := get(c, k); ok {
				found++
				if !bytes.Equal(got, content(k, w)) {
					t.Errorf("window %+v: the disk tier holds other bytes", k)
				}
			}
		}
	}
	if found == 0 {
		t.Error("nothing reached the disk tier: the test did not exercise it")
	}
	t.Logf("reused %d buffers, %d windows on disk checked", s.BuffersReused, found)
}

// TestRefErrorWarned: a release past zero (a bug in a holder) is counted
// every time and warned about in the log, at most once a minute.
func TestRefErrorWarned(t *testing.T) {
	var logged bytes.Buffer
	c, err := New(Options{MemoryBytes: 1 << 20, Window: MinWindow, Logger: zerolog.New(&logged)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range int64(2) {
		k := Key{Volume: volA, Object: i}
		keep(c, k, false)
		v, ok := c.Acquire(k)
		if !ok {
			t.Fatal("a window just kept is missing")
		}
		v.Release()
		v.Release() // the tier's reference: gone
		v.Release() // past zero
	}
	if got := c.Stats().RefErrors; got != 2 {
		t.Fatalf("ref errors %d, want 2", got)
	}
	if n := strings.Count(logged.String(), "released more often than it was held"); n != 1 {
		t.Fatalf("%d warnings logged for 2 ref errors within a minute, want 1:\n%s", n, logged.String())
	}
}

// TestReservePoolKeepsEvictedWindows: the pool keeps at most its base
// count of evicted windows for reuse, and ReservePool(n) lets it keep n
// more (the windows of the chunks the chunker fills), without adding up
// over calls.
func TestReservePoolKeepsEvictedWindows(t *testing.T) {
	const w = MinWindow
	const windows = 300
	for _, reserve := range []int{0, 100} {
		c := newTest(t, 16*(w+entryOverhead+int64(len(volA))), w)
		base := c.pool.base
		if reserve > 0 {
			c.ReservePool(reserve)
			c.ReservePool(reserve) // again: no more than once
		}
		bufs := make([][]byte, windows)
		for i := range bufs {
			bufs[i] = c.Buffer(int(w))
		}
		for i, b := range bufs {
			c.Keep(Key{Volume: volA, Object: int64(i)}, b, false, false)
			c.mem.CleanUp()
		}
		before := c.Stats().BuffersReused
		for range windows {
			c.Buffer(int(w))
		}
		reused := int(c.Stats().BuffersReused - before)
		if want := base + reserve; reused != want {
			t.Errorf("reserve %d: %d evicted windows reused, want %d (pool base %d)", reserve, reused, want, base)
		}
	}
}
