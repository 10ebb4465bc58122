package cache

import (
	"bytes"
	"testing"
)

// TestStreamTierKeepsMainTier: windows a stream takes once go to the
// stream tier and leave it oldest first; however many pass through, the
// main tier's windows stay, and the memory bound holds.
func TestStreamTierKeepsMainTier(t *testing.T) {
	const window = 4 << 10
	c := newTest(t, 1<<20, window)
	key := func(obj, w int64) Key { return Key{Volume: "v", Object: obj, Window: w} }
	data := func(b byte) []byte { return bytes.Repeat([]byte{b}, window) }
	const mainWindows = 64 // 256 KiB and overheads: well inside the main tier
	for w := int64(0); w < mainWindows; w++ {
		put(c, key(1, w), data(1))
		get(c, key(1, w)) // used often, as a scattered object's windows are
		get(c, key(1, w))
	}
	// Twenty times the whole memory bound streams through, each window
	// used once.
	for w := int64(0); w < 20*(1<<20)/window; w++ {
		putStream(c, key(2, w), data(2), w%2 == 0)
		if got, ok := get(c, key(2, w)); !ok || !bytes.Equal(got, data(2)) {
			t.Fatalf("stream window %d just stored: found %v", w, ok)
		}
	}
	for w := int64(0); w < mainWindows; w++ {
		if !c.Contains(key(1, w)) {
			t.Fatalf("main-tier window %d evicted by windows that streamed through once", w)
		}
	}
	if used, limit := c.MemoryUsed(), c.MemoryLimit(); used > limit {
		t.Fatalf("memory used %d over the limit %d", used, limit)
	}
	if s := c.stream.weight(); s > c.StreamLimit() || s == 0 {
		t.Fatalf("stream tier holds %d bytes, want some and at most %d", s, c.StreamLimit())
	}
	// The first stream windows filled the main tier to three quarters;
	// the later ones went through the stream tier: the oldest of those
	// are gone, the newest are there.
	if !c.Contains(key(2, 0)) {
		t.Fatal("the first stream window, stored while the main tier had room, is not held")
	}
	if c.Contains(key(2, 10*(1<<20)/window)) {
		t.Fatal("a stream window is still held after 10× the memory bound streamed through after it")
	}
	last := key(2, 20*(1<<20)/window-1)
	if !c.Contains(last) {
		t.Fatal("the newest stream window is not held")
	}
	if st := c.Stats(); st.RAHits == 0 {
		t.Fatal("windows stored as readahead and then used counted no readahead hit")
	}
}

// TestStreamTierSecondUse: a stream window used a second time is no
// longer a stream's: it moves to the main tier and stays when the stream
// tier turns over.
func TestStreamTierSecondUse(t *testing.T) {
	const window = 4 << 10
	c := newTest(t, 1<<20, window)
	// A main tier three quarters full: stream windows go to the stream
	// tier.
	for w := int64(0); w*(window+entryOverhead+1) < c.mainMax/4*3; w++ {
		put(c, Key{Volume: "v", Object: 1, Window: w}, bytes.Repeat([]byte{1}, window))
	}
	c.MemoryUsed() // applies the pending writes to the main tier's weight
	k := Key{Volume: "v", Object: 7, Window: 3}
	putStream(c, k, bytes.Repeat([]byte{7}, window), false)
	if !c.stream.contains(k) {
		t.Fatal("a stream window stored while the main tier is three quarters full is not in the stream tier")
	}
	for i := 0; i < 2; i++ {
		if _, ok := get(c, k); !ok {
			t.Fatalf("use %d: window not found", i+1)
		}
	}
	if c.stream.contains(k) {
		t.Fatal("a window used twice is still in the stream tier")
	}
	for w := int64(0); w < 4*c.StreamLimit()/window; w++ {
		putStream(c, Key{Volume: "v", Object: 8, Window: w}, bytes.Repeat([]byte{8}, window), false)
	}
	if got, ok := get(c, k); !ok || got[0] != 7 {
		t.Fatal("a window used twice was lost when the stream tier turned over")
	}
}
