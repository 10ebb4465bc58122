package cache

// The disk tier of an encrypted volume (docs/ARCHITECTURE.md §16.5): no
// plaintext on disk, a warm restart served from disk, and a damaged or
// foreign file dropped, never served.

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/sealed"
)

func cacheSealer(t *testing.T, key, seal byte) Sealer {
	t.Helper()
	st, err := sealed.New(mem.New(), bytes.Repeat([]byte{key}, 32), bytes.Repeat([]byte{seal}, 16))
	if err != nil {
		t.Fatal(err)
	}
	cs, err := st.CacheSealer()
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func newSealedDisk(t *testing.T, dir string, s Sealer) *Cache {
	t.Helper()
	c, err := New(Options{MemoryBytes: 1 << 20, Window: 64 << 10, Dir: dir, DiskBytes: 64 << 20, Sealer: s, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// blockPattern is 4 KiB block i of a window: distinct and recognizable.
func blockPattern(win, i int) []byte {
	b := make([]byte, 4096)
	for j := range b {
		b[j] = byte(j*7 + i*13 + win*101)
	}
	copy(b, []byte("BS3-PLAINTEXT-MARKER"))
	return b
}

// sealedWindows puts windows 0..n-1 of key 5 (the last one short) and
// returns their data.
func sealedWindows(c *Cache, n int) [][]byte {
	var out [][]byte
	for w := range n {
		blocks := 16
		if w == n-1 {
			blocks = 3
		}
		var data []byte
		for i := range blocks {
			data = append(data, blockPattern(w, i)...)
		}
		put(c, Key{Volume: volA, Object: 5, Window: int64(w)}, data)
		out = append(out, data)
	}
	c.Sync()
	return out
}

func checkMissAll(t *testing.T, c *Cache, n, dropped int, what string) {
	t.Helper()
	for w := range n {
		if v, ok := get(c, Key{Volume: volA, Object: 5, Window: int64(w)}); ok {
			t.Fatalf("%s: window %d served (%d bytes); want it dropped", what, w, len(v))
		}
	}
	if s := c.Stats(); s.DiskHits != 0 || s.DiskDropped != int64(dropped) {
		t.Fatalf("%s: disk hits %d, dropped %d; want 0 hits and %d drops", what, s.DiskHits, s.DiskDropped, dropped)
	}
	if f := files(t, c.disk.dir); len(f) != 0 {
		t.Fatalf("%s: files left after the drop: %v", what, f)
	}
}

// TestSealedDiskNoPlaintextAndRestart: no 4 KiB block written, nor the
// marker every block starts with, appears in any file; a new cache over
// the directory with the same key serves every window from disk.
func TestSealedDiskNoPlaintextAndRestart(t *testing.T) {
	const n = 4
	dir := t.TempDir()
	s := cacheSealer(t, 1, 2)
	c := newSealedDisk(t, dir, s)
	want := sealedWindows(c, n)
	c.Close()
	fs := files(t, dir)
	if len(fs) == 0 {
		t.Fatal("no file written")
	}
	for rel := range fs {
		raw, err := os.ReadFile(filepath.Join(dir, rel))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(raw, []byte("BS3-PLAINTEXT-MARKER")) {
			t.Fatalf("%s holds plaintext", rel)
		}
		for w := range n {
			for i := range 16 {
				if bytes.Contains(raw, blockPattern(w, i)[1000:1064]) {
					t.Fatalf("%s holds part of block %d of window %d", rel, i, w)
				}
			}
		}
	}
	c = newSealedDisk(t, dir, s)
	for w := range n {
		got, ok := get(c, Key{Volume: volA, Object: 5, Window: int64(w)})
		if !ok || !bytes.Equal(got, want[w]) {
			t.Fatalf("window %d after restart: found %v, equal %v", w, ok, bytes.Equal(got, want[w]))
		}
	}
	if st := c.Stats(); st.DiskHits != n || st.DiskDropped != 0 {
		t.Fatalf("after restart: disk hits %d, dropped %d; want %d hits, none dropped", st.DiskHits, st.DiskDropped, n)
	}
}

// TestSealedDiskDamage flips one byte in each record, at a different
// place each (salt, ciphertext, tag, and the last record's magic): every
// record is dropped, none served, and the emptied segment is removed.
func TestSealedDiskDamage(t *testing.T) {
	const n = 4
	dir := t.TempDir()
	s := cacheSealer(t, 1, 2)
	c := newSealedDisk(t, dir, s)
	sealedWindows(c, n)
	c.Close()
	hdr := int64(headerFixed + len(volA))
	for w := range n {
		p, off, size := recordOf(t, dir, 64<<10, s, Key{Volume: volA, Object: 5, Window: int64(w)})
		at := off + []int64{hdr + 3, hdr + 16 + 100, size - 1, 5}[w]
		b := readAt(t, p, at, 1)
		b[0] ^= 0x01
		overwrite(t, p, at, b)
	}
	checkMissAll(t, newSealedDisk(t, dir, s), n, n, "flipped bytes")
}

// TestSealedDiskForeign: files written under another data key, another
// volume's seal id with the same data key, another volume id, or for
// another window are all dropped; so are plaintext files in an encrypted
// tier, and encrypted files in a plaintext tier.
func TestSealedDiskForeign(t *testing.T) {
	const n = 3
	fill := func(t *testing.T, s Sealer) string {
		dir := t.TempDir()
		var c *Cache
		if s == nil {
			c = newDisk(t, dir, 64<<20, 64<<10)
		} else {
			c = newSealedDisk(t, dir, s)
		}
		sealedWindows(c, n)
		c.Close()
		return dir
	}
	t.Run("other data key", func(t *testing.T) {
		dir := fill(t, cacheSealer(t, 9, 2))
		checkMissAll(t, newSealedDisk(t, dir, cacheSealer(t, 1, 2)), n, n, "other data key")
	})
	t.Run("other seal id", func(t *testing.T) {
		dir := fill(t, cacheSealer(t, 1, 7))
		checkMissAll(t, newSealedDisk(t, dir, cacheSealer(t, 1, 2)), n, n, "other seal id")
	})
	t.Run("plaintext file", func(t *testing.T) {
		dir := fill(t, nil)
		checkMissAll(t, newSealedDisk(t, dir, cacheSealer(t, 1, 2)), n, 1, "plaintext records in an encrypted tier")
	})
	t.Run("sealed file in a plaintext tier", func(t *testing.T) {
		dir := fill(t, cacheSealer(t, 1, 2))
		checkMissAll(t, newDisk(t, dir, 64<<20, 64<<10), n, 1, "encrypted records in a plaintext tier")
	})
	t.Run("other volume id", func(t *testing.T) {
		s := cacheSealer(t, 1, 2)
		dir := t.TempDir()
		c := newSealedDisk(t, dir, s)
		for w := range n {
			put(c, Key{Volume: volB, Object: 5, Window: int64(w)}, pattern(64<<10, byte(w)))
		}
		c.Close()
		if err := os.Rename(filepath.Join(dir, volB), filepath.Join(dir, volA)); err != nil {
			t.Fatal(err)
		}
		checkMissAll(t, newSealedDisk(t, dir, s), n, n, "another volume's records")
	})
	t.Run("other window", func(t *testing.T) {
		s := cacheSealer(t, 1, 2)
		dir := t.TempDir()
		c := newSealedDisk(t, dir, s)
		put(c, Key{Volume: volA, Object: 5, Window: 1}, pattern(64<<10, 1))
		c.Close()
		// Window 1's record with its header edited to name window 0,
		// and no index file, so the start-up scan indexes it as window
		// 0: only the AEAD can tell.
		p, off, _ := recordOf(t, dir, 64<<10, s, Key{Volume: volA, Object: 5, Window: 1})
		overwrite(t, p, off+24, []byte{0})
		removeIndexFiles(t, dir)
		checkMissAll(t, newSealedDisk(t, dir, s), 1, 1, "a window's record edited to name another window")
	})
}

// BenchmarkDiskWindow is the CPU a disk-tier file costs to build and to
// check, plaintext (CRC32C) and sealed (AES-256-GCM), for a 64 KiB window.
func BenchmarkDiskWindow(b *testing.B) {
	st, err := sealed.New(mem.New(), bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 16))
	if err != nil {
		b.Fatal(err)
	}
	s, err := st.CacheSealer()
	if err != nil {
		b.Fatal(err)
	}
	k := Key{Volume: volA, Object: 5, Window: 1}
	data := pattern(64<<10, 3)
	b.Run("crc32c/write", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			encodeWindow(k, 64<<10, data)
		}
	})
	b.Run("crc32c/read", func(b *testing.B) {
		file := encodeWindow(k, 64<<10, data)
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			if _, err := decodeWindow(file, k, 64<<10); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("sealed/write", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			if _, err := sealWindow(s, k, 64<<10, data); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("sealed/read", func(b *testing.B) {
		file, err := sealWindow(s, k, 64<<10, data)
		if err != nil {
			b.Fatal(err)
		}
		work := make([]byte, 0, 64<<10)
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			if _, err := openWindow(s, file, k, 64<<10, work); err != nil {
				b.Fatal(err)
			}
		}
	})
}
