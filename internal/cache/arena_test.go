package cache

import (
	"bytes"
	"testing"

	"github.com/rs/zerolog"
)

// TestArenaBoundedAndReleased fills a cache with twice its memory bound
// of windows: window memory comes from the arena, which never maps more
// than the bound, starts every slab on a huge-page boundary, hands out
// windows that do not overlap (each cached window keeps its own bytes),
// and is unmapped by Close.
func TestArenaBoundedAndReleased(t *testing.T) {
	const w = 64 << 10
	const limit = 40 << 20 // a slab and a part of one
	c, err := New(Options{MemoryBytes: limit, Window: w, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	n := int64(2 * limit / w)
	for i := range n {
		keep(c, Key{Volume: volA, Object: i}, false)
	}
	c.mem.CleanUp()
	s := c.Stats()
	if s.WindowMapped <= 0 || s.WindowMapped > limit {
		t.Fatalf("arena mapped %d bytes for a %d-byte cache: want some, at most the bound", s.WindowMapped, limit)
	}
	if s.BuffersReused == 0 {
		t.Fatal("no window was reused: the cache grew past its bound instead")
	}
	c.pool.mu.Lock()
	for _, sl := range c.pool.arena.slabs {
		if sl[0]%hugePage != 0 {
			t.Errorf("slab at %#x is not aligned to a huge page", sl[0])
		}
	}
	c.pool.mu.Unlock()
	held, inArena := 0, 0
	for i := range n {
		k := Key{Volume: volA, Object: i}
		v, ok := c.Acquire(k)
		if !ok {
			continue
		}
		held++
		if c.pool.arena.owns(v.Data) {
			inArena++
		}
		if !bytes.Equal(v.Data, content(k, w)) {
			t.Fatalf("window %d holds other bytes: windows overlap or were reused while cached", i)
		}
		v.Release()
	}
	if held == 0 || inArena == 0 {
		t.Fatalf("%d windows cached, %d of them arena memory: want some, from the arena", held, inArena)
	}
	c.Close()
	if got := c.Stats().WindowMapped; got != 0 {
		t.Fatalf("%d bytes of window memory still mapped after Close", got)
	}
}

// TestArenaHeldAcrossClose: a window a reader holds when the cache is
// closed keeps the arena mapped (its bytes stay readable) until the
// reader releases it.
func TestArenaHeldAcrossClose(t *testing.T) {
	const w = MinWindow
	c, err := New(Options{MemoryBytes: 1 << 20, Window: w, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	k := Key{Volume: volA, Object: 1}
	keep(c, k, false)
	v, ok := c.Acquire(k)
	if !ok {
		t.Fatal("a window just kept is missing")
	}
	if !c.pool.arena.owns(v.Data) {
		t.Fatal("the window is not arena memory: this test needs it to be")
	}
	c.Close()
	if c.Stats().WindowMapped == 0 {
		t.Fatal("the arena was unmapped while a reader held one of its windows")
	}
	if !bytes.Equal(v.Data, content(k, w)) {
		t.Fatal("a held window's bytes changed across Close")
	}
	v.Release()
	if got := c.Stats().WindowMapped; got != 0 {
		t.Fatalf("%d bytes still mapped after the last window came back", got)
	}
	// A closed cache hands out heap buffers only.
	if b := c.Buffer(w); c.pool.arena.owns(b) || c.Stats().WindowMapped != 0 {
		t.Fatal("a closed cache mapped window memory again")
	}
}
