package cache

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"
)

const (
	volA = "0123456789abcdef0123456789abcdef"
	volB = "fedcba9876543210fedcba9876543210"
)

func newDisk(t *testing.T, dir string, disk, window int64) *Cache {
	t.Helper()
	c, err := New(Options{MemoryBytes: 1 << 20, Window: window, Dir: dir, DiskBytes: disk, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i/3) ^ seed
	}
	return b
}

// files lists the cache files under dir with their sizes.
func files(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		info, err := e.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = info.Size()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestDiskSurvivesRestart: a new cache over the same directory serves
// the same bytes from disk, the last (short) window included.
func TestDiskSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	const w = 16 << 10
	data := pattern(2*w+5000, 1)
	c := newDisk(t, dir, 1<<20, w)
	c.PutObject(volA, 7, data)
	c.Close()
	c = newDisk(t, dir, 1<<20, w)
	for win := int64(0); win < 3; win++ {
		got, ok := c.Get(Key{Volume: volA, Object: 7, Window: win})
		want := data[win*w : min((win+1)*w, int64(len(data)))]
		if !ok || !bytes.Equal(got, want) {
			t.Fatalf("window %d after restart: found %v, bytes equal %v", win, ok, bytes.Equal(got, want))
		}
	}
	if s := c.Stats(); s.DiskHits != 3 || s.DiskDropped != 0 {
		t.Fatalf("disk hits %d, dropped %d; want 3, 0", s.DiskHits, s.DiskDropped)
	}
}

// TestDiskRefusesDamagedAndForeignFiles flips one byte at several places
// of a file, puts another volume's file under this volume's name, another
// key's under this key's name, and reopens with another window size:
// each is a miss, and the file is removed.
func TestDiskRefusesDamagedAndForeignFiles(t *testing.T) {
	const w = 16 << 10
	k := Key{Volume: volA, Object: 3, Window: 1}
	rel := filepath.Join(volA, "0000000000000003-1")
	prepare := func(t *testing.T) string {
		dir := t.TempDir()
		c := newDisk(t, dir, 1<<20, w)
		c.Put(k, pattern(w, 2))
		c.Put(Key{Volume: volB, Object: 3, Window: 1}, pattern(w, 3))
		c.Put(Key{Volume: volA, Object: 4, Window: 1}, pattern(w, 4))
		c.Close()
		return dir
	}
	check := func(t *testing.T, dir string, window int64) {
		t.Helper()
		c := newDisk(t, dir, 1<<20, window)
		if got, ok := c.Get(Key{Volume: k.Volume, Object: k.Object, Window: k.Window}); ok {
			t.Fatalf("served a bad file (%d bytes, equal to the original %v)", len(got), bytes.Equal(got, pattern(w, 2)))
		}
		if s := c.Stats(); s.DiskDropped != 1 {
			t.Fatalf("dropped %d files, want 1", s.DiskDropped)
		}
		if _, err := os.Stat(filepath.Join(dir, rel)); !os.IsNotExist(err) {
			t.Fatalf("bad file still there: %v", err)
		}
	}
	for _, at := range []int{0, 9, 20, 40, 60, 100, -1, -w / 2} { // magic, header fields, id, CRCs, data
		t.Run("flip", func(t *testing.T) {
			dir := prepare(t)
			p := filepath.Join(dir, rel)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			i := at
			if i < 0 {
				i += len(b)
			}
			b[i] ^= 0x10
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
			check(t, dir, w)
		})
	}
	t.Run("truncated", func(t *testing.T) {
		dir := prepare(t)
		if err := os.Truncate(filepath.Join(dir, rel), 100); err != nil {
			t.Fatal(err)
		}
		check(t, dir, w)
	})
	t.Run("other volume", func(t *testing.T) {
		dir := prepare(t)
		if err := os.Rename(filepath.Join(dir, volB, "0000000000000003-1"), filepath.Join(dir, rel)); err != nil {
			t.Fatal(err)
		}
		check(t, dir, w)
	})
	t.Run("other key", func(t *testing.T) {
		dir := prepare(t)
		if err := os.Rename(filepath.Join(dir, volA, "0000000000000004-1"), filepath.Join(dir, rel)); err != nil {
			t.Fatal(err)
		}
		check(t, dir, w)
	})
	t.Run("other window size", func(t *testing.T) {
		dir := prepare(t)
		check(t, dir, 2*w)
	})
}

// TestDiskBound writes ten times the limit: the files on disk (measured)
// never add up to more than the limit, and the newest windows are kept.
func TestDiskBound(t *testing.T) {
	dir := t.TempDir()
	const (
		w     = 64 << 10
		limit = 1 << 20
	)
	c := newDisk(t, dir, limit, w)
	for i := range 10 * limit / w {
		c.Put(Key{Volume: volA, Object: int64(i)}, pattern(w, byte(i)))
		if i%8 == 0 {
			c.Sync()
			var sum int64
			for _, s := range files(t, dir) {
				sum += s
			}
			if sum > limit || c.DiskUsed() > limit {
				t.Fatalf("after %d windows: %d bytes in files, %d counted; limit %d", i+1, sum, c.DiskUsed(), limit)
			}
		}
	}
	c.Sync()
	var sum int64
	for _, s := range files(t, dir) {
		sum += s
	}
	t.Logf("%d MiB written, %d bytes on disk in %d files, limit %d", 10*limit>>20, sum, len(files(t, dir)), limit)
	if sum < limit/2 {
		t.Errorf("only %d bytes kept of a %d-byte limit", sum, limit)
	}
	c.Purge()
	last := int64(10*limit/w - 1)
	if got, ok := c.Get(Key{Volume: volA, Object: last}); !ok || !bytes.Equal(got, pattern(w, byte(last))) {
		t.Error("the newest window is not on disk")
	}
	// A reopen over a directory fuller than a smaller limit trims it.
	c.Close()
	newDisk(t, dir, limit/4, w)
	sum = 0
	for _, s := range files(t, dir) {
		sum += s
	}
	if sum > limit/4 {
		t.Errorf("reopened with a %d-byte limit: %d bytes left", limit/4, sum)
	}
}

// TestDiskSkipsUnsafeVolumeIDs: an id that is not hex (it could name a
// path, or be the shared "unknown" fallback) stays in memory only.
func TestDiskSkipsUnsafeVolumeIDs(t *testing.T) {
	dir := t.TempDir()
	c := newDisk(t, dir, 1<<20, 16<<10)
	for _, id := range []string{"unknown", "../x", volA + "/.."} {
		c.Put(Key{Volume: id, Object: 1}, pattern(100, 1))
	}
	c.Sync()
	if f := files(t, dir); len(f) != 0 {
		t.Fatalf("files written for unsafe ids: %v", f)
	}
}
