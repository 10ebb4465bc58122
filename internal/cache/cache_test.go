package cache

import (
	"bytes"
	"fmt"
	"sync"
	"testing"

	"github.com/rs/zerolog"
)

func newTest(t *testing.T, mem, window int64) *Cache {
	t.Helper()
	c, err := New(Options{MemoryBytes: mem, Window: window, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func TestNewRefusesBadOptions(t *testing.T) {
	for _, o := range []Options{
		{MemoryBytes: 0, Window: MinWindow},
		{MemoryBytes: 1 << 20, Window: MinWindow - 1},
		{MemoryBytes: 1 << 20, Window: 3 * MinWindow},
		{MemoryBytes: 1 << 20, Window: 2 * MaxWindow},
	} {
		if _, err := New(o); err == nil {
			t.Errorf("New(%+v) accepted", o)
		}
	}
}

// TestKeysAreComplete: entries differing only in the volume id, the
// object key or the window never answer for each other.
func TestKeysAreComplete(t *testing.T) {
	c := newTest(t, 1<<20, MinWindow)
	keys := []Key{
		{Volume: "a", Object: 1, Window: 0},
		{Volume: "b", Object: 1, Window: 0},
		{Volume: "a", Object: 2, Window: 0},
		{Volume: "a", Object: 1, Window: 1},
	}
	for i, k := range keys {
		put(c, k, bytes.Repeat([]byte{byte(i + 1)}, MinWindow))
	}
	for i, k := range keys {
		got, ok := get(c, k)
		if !ok || got[0] != byte(i+1) {
			t.Errorf("Acquire(%+v) = %v, %v; want the bytes put under it (%d)", k, ok, got[:min(1, len(got))], i+1)
		}
	}
	if _, ok := get(c, Key{Volume: "c", Object: 1}); ok {
		t.Error("hit for a volume never put")
	}
}

// TestPutObjectSlicesAndCopies: an object's data area becomes aligned
// windows (the last one short), copied, so the caller may reuse its buffer.
func TestPutObjectSlicesAndCopies(t *testing.T) {
	const w = MinWindow
	c := newTest(t, 1<<20, w)
	data := make([]byte, 2*w+100)
	for i := range data {
		data[i] = byte(i / 7)
	}
	want := append([]byte(nil), data...)
	c.PutObject("v", 9, data)
	clear(data) // the chunk buffer is recycled
	for win, l := range []int{w, w, 100} {
		got, ok := get(c, Key{Volume: "v", Object: 9, Window: int64(win)})
		if !ok || !bytes.Equal(got, want[win*w:win*w+l]) {
			t.Errorf("window %d: found %v, %d bytes, not the object's bytes", win, ok, len(got))
		}
	}
	if _, ok := get(c, Key{Volume: "v", Object: 9, Window: 3}); ok {
		t.Error("a window past the object's end is cached")
	}
	c.Keep(Key{Volume: "v", Object: 1}, make([]byte, w+1), false, false)
	if _, ok := get(c, Key{Volume: "v", Object: 1}); ok {
		t.Error("an entry larger than a window was kept")
	}
}

// TestMemoryBound inserts ten times the limit from several goroutines:
// the weight held never ends over the limit, and the limit is used.
func TestMemoryBound(t *testing.T) {
	const (
		limit = 4 << 20
		w     = 64 << 10
	)
	c := newTest(t, limit, w)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 10 * limit / w / 4 {
				put(c, Key{Volume: fmt.Sprint("vol", g), Object: int64(i), Window: 0}, make([]byte, w))
				if i%64 == 0 {
					if used := c.MemoryUsed(); used > limit {
						t.Errorf("holds %d bytes, over the %d-byte limit", used, limit)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	used := c.MemoryUsed()
	t.Logf("after inserting %d MiB: %d bytes held of %d", 10*limit>>20, used, limit)
	if used > limit || used < limit/2 {
		t.Errorf("holds %d bytes: want at most %d and at least half of it", used, limit)
	}
	var data int64 // measured from the entries, not from the weigher
	for _, v := range c.mem.All() {
		data += int64(len(v.data))
	}
	if data > limit {
		t.Errorf("entries hold %d bytes of data, over the %d-byte limit", data, limit)
	}
}

// TestReadaheadHits: a window stored by readahead counts one readahead hit
// at its first use, and none after; a window stored by a read counts none.
func TestReadaheadHits(t *testing.T) {
	c := newTest(t, 1<<20, MinWindow)
	k := func(w int64) Key { return Key{Volume: "v", Object: 1, Window: w} }
	putAhead(c, k(0), make([]byte, MinWindow))
	put(c, k(1), make([]byte, MinWindow))
	for range 3 {
		for w := int64(0); w < 2; w++ {
			if _, ok := get(c, k(w)); !ok {
				t.Fatalf("window %d not found", w)
			}
		}
	}
	s := c.Stats()
	if s.RAHits != 1 || s.RAHitBytes != MinWindow || s.Hits != 6 {
		t.Fatalf("readahead hits %d (%d bytes), hits %d: want 1 (%d bytes) and 6", s.RAHits, s.RAHitBytes, s.Hits, MinWindow)
	}
}

// TestFetchSizeChecked: the fetch size must be a power-of-two multiple of
// the window, and defaults to it.
func TestFetchSizeChecked(t *testing.T) {
	for _, fetch := range []int64{MinWindow / 2, 3 * MinWindow, 2 * MaxWindow} {
		if _, err := New(Options{MemoryBytes: 1 << 20, Window: MinWindow, FetchSize: fetch}); err == nil {
			t.Errorf("fetch size %d accepted", fetch)
		}
	}
	c, err := New(Options{MemoryBytes: 1 << 20, Window: 2 * MinWindow})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.FetchSize() != 2*MinWindow {
		t.Fatalf("default fetch size %d, want the window %d", c.FetchSize(), 2*MinWindow)
	}
}
