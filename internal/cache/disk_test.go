package cache

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

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
		got, ok := get(c, Key{Volume: volA, Object: 7, Window: win})
		want := data[win*w : min((win+1)*w, int64(len(data)))]
		if !ok || !bytes.Equal(got, want) {
			t.Fatalf("window %d after restart: found %v, bytes equal %v", win, ok, bytes.Equal(got, want))
		}
	}
	if s := c.Stats(); s.DiskHits != 3 || s.DiskDropped != 0 {
		t.Fatalf("disk hits %d, dropped %d; want 3, 0", s.DiskHits, s.DiskDropped)
	}
}

// recordOf finds window k's record on disk: the segment's path and the
// record's offset and size.
func recordOf(t *testing.T, dir string, win int64, seal Sealer, k Key) (string, int64, int64) {
	t.Helper()
	d, err := openDisk(dir, 1<<30, win, 0, seal, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	loc, ok := d.index[k]
	if !ok {
		t.Fatalf("window %+v is not on disk", k)
	}
	return filepath.Join(dir, loc.seg.rel), loc.off, loc.size
}

// overwrite writes b at off of the file p, in place.
func overwrite(t *testing.T, p string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func readAt(t *testing.T, p string, off, n int64) []byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDiskRefusesDamagedAndForeignRecords flips one byte at several places
// of a record, cuts its segment inside it, copies another volume's record
// and another key's over it, and reopens with another window size: each
// time the window is a miss that counts as dropped, and once it is put
// again a restart serves the fresh record, not the bad one.
func TestDiskRefusesDamagedAndForeignRecords(t *testing.T) {
	const w = 16 << 10
	k := Key{Volume: volA, Object: 3, Window: 1}
	otherVol := Key{Volume: volB, Object: 3, Window: 1}
	otherKey := Key{Volume: volA, Object: 4, Window: 1}
	putAll := func(c *Cache) {
		put(c, k, pattern(w, 2))
		put(c, otherVol, pattern(w, 3))
		put(c, otherKey, pattern(w, 4))
	}
	prepare := func(t *testing.T) string {
		dir := t.TempDir()
		c := newDisk(t, dir, 1<<20, w)
		putAll(c)
		c.Close()
		return dir
	}
	check := func(t *testing.T, c *Cache, dir string, window, dropped int64) {
		t.Helper()
		if got, ok := get(c, k); ok {
			t.Fatalf("served a bad record (%d bytes, equal to the original %v)", len(got), bytes.Equal(got, pattern(w, 2)))
		}
		if s := c.Stats(); s.DiskDropped != dropped || s.DiskHits != 0 {
			t.Fatalf("dropped %d records, %d disk hits; want %d dropped, no hit", s.DiskDropped, s.DiskHits, dropped)
		}
		put(c, k, pattern(w, 2)) // as a refetch does
		c.Close()
		c = newDisk(t, dir, 1<<20, window)
		if got, ok := get(c, k); !ok || !bytes.Equal(got, pattern(w, 2)) {
			t.Fatalf("after a refetch and a restart: found %v, equal %v", ok, bytes.Equal(got, pattern(w, 2)))
		}
	}
	for _, at := range []int64{0, 9, 20, 40, 60, 100, -1, -w / 2} { // magic, header fields, id, CRCs, data
		t.Run("flip", func(t *testing.T) {
			dir := prepare(t)
			p, off, size := recordOf(t, dir, w, nil, k)
			if at < 0 {
				at += size
			}
			b := readAt(t, p, off+at, 1)
			b[0] ^= 0x10
			overwrite(t, p, off+at, b)
			check(t, newDisk(t, dir, 1<<20, w), dir, w, 1)
		})
	}
	t.Run("truncated", func(t *testing.T) {
		dir := prepare(t)
		p, off, _ := recordOf(t, dir, w, nil, k)
		if err := os.Truncate(p, off+100); err != nil {
			t.Fatal(err)
		}
		check(t, newDisk(t, dir, 1<<20, w), dir, w, 1)
	})
	t.Run("other volume", func(t *testing.T) {
		dir := prepare(t)
		p, off, size := recordOf(t, dir, w, nil, k)
		q, qoff, qsize := recordOf(t, dir, w, nil, otherVol)
		if qsize != size {
			t.Fatalf("records of %d and %d bytes", size, qsize)
		}
		overwrite(t, p, off, readAt(t, q, qoff, qsize))
		check(t, newDisk(t, dir, 1<<20, w), dir, w, 1)
	})
	t.Run("other key", func(t *testing.T) {
		// With the tier running, so that its index still points there.
		dir := t.TempDir()
		c := newDisk(t, dir, 1<<20, w)
		putAll(c)
		c.Sync()
		c.Purge()
		d := c.disk
		d.mu.Lock()
		loc, oloc := d.index[k], d.index[otherKey]
		d.mu.Unlock()
		p := filepath.Join(dir, loc.seg.rel)
		overwrite(t, p, loc.off, readAt(t, p, oloc.off, oloc.size))
		check(t, c, dir, w, 1)
	})
	t.Run("other window size", func(t *testing.T) {
		dir := prepare(t)
		check(t, newDisk(t, dir, 1<<20, 2*w), dir, 2*w, 3)
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
		put(c, Key{Volume: volA, Object: int64(i)}, pattern(w, byte(i)))
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
	if got, ok := get(c, Key{Volume: volA, Object: last}); !ok || !bytes.Equal(got, pattern(w, byte(last))) {
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
		put(c, Key{Volume: id, Object: 1}, pattern(100, 1))
	}
	c.Sync()
	if f := files(t, dir); len(f) != 0 {
		t.Fatalf("files written for unsafe ids: %v", f)
	}
}

// TestDiskKeepsWhatIsRead: a window read while its segment is among the
// oldest, with the tier three quarters full, is appended again, so it
// survives the segment being freed; an unread window of the same segment
// does not.
func TestDiskKeepsWhatIsRead(t *testing.T) {
	dir := t.TempDir()
	const (
		w     = 64 << 10
		limit = 4 << 20 // segments of 256 KiB: three windows each
	)
	c := newDisk(t, dir, limit, w)
	putRange := func(from, to int) {
		for i := from; i < to; i++ {
			put(c, Key{Volume: volA, Object: int64(i)}, pattern(w, byte(i)))
			c.Sync() // the queue must not drop any
		}
	}
	putRange(0, 56) // over three quarters of the limit: freeing is near
	c.Purge()
	if got, ok := get(c, Key{Volume: volA, Object: 0}); !ok || !bytes.Equal(got, pattern(w, 0)) {
		t.Fatal("window 0 not served from disk")
	}
	c.Sync()
	putRange(40, 80) // frees the first segments many times over
	c.Purge()
	if got, ok := get(c, Key{Volume: volA, Object: 0}); !ok || !bytes.Equal(got, pattern(w, 0)) {
		t.Fatal("window 0, read while old, was freed with its segment")
	}
	if _, ok := get(c, Key{Volume: volA, Object: 1}); ok {
		t.Fatal("window 1, never read, outlived its segment (the limit is not enforced?)")
	}
}

// TestDiskTornTail: a crash in the middle of an append leaves a cut
// record at the end of a segment; a restart serves every record before it
// and drops the cut one.
func TestDiskTornTail(t *testing.T) {
	dir := t.TempDir()
	const w = 16 << 10
	c := newDisk(t, dir, 1<<20, w)
	for i := range 4 {
		put(c, Key{Volume: volA, Object: 9, Window: int64(i)}, pattern(w, byte(i)))
	}
	c.Close()
	p, off, size := recordOf(t, dir, w, nil, Key{Volume: volA, Object: 9, Window: 3})
	if err := os.Truncate(p, off+size/2); err != nil {
		t.Fatal(err)
	}
	c = newDisk(t, dir, 1<<20, w)
	for i := range 3 {
		if got, ok := get(c, Key{Volume: volA, Object: 9, Window: int64(i)}); !ok || !bytes.Equal(got, pattern(w, byte(i))) {
			t.Fatalf("window %d before the torn record: found %v", i, ok)
		}
	}
	if _, ok := get(c, Key{Volume: volA, Object: 9, Window: 3}); ok {
		t.Fatal("the torn record was served")
	}
	if s := c.Stats(); s.DiskDropped != 1 {
		t.Fatalf("dropped %d, want 1 (the torn record)", s.DiskDropped)
	}
}

// TestDiskDirectoryOfAnotherProcess: a second tier over a directory
// whose volume directory is in use (flock'ed) neither serves nor writes
// nor frees anything there.
func TestDiskDirectoryOfAnotherProcess(t *testing.T) {
	dir := t.TempDir()
	const w = 16 << 10
	first := newDisk(t, dir, 1<<20, w)
	k := Key{Volume: volA, Object: 1}
	put(first, k, pattern(w, 1))
	first.Sync()
	before := files(t, dir)
	second := newDisk(t, dir, 64<<10, w) // a limit the first's segment exceeds
	if _, ok := get(second, k); ok {
		t.Fatal("the second tier served a window of a directory in use")
	}
	for i := range 20 {
		put(second, Key{Volume: volA, Object: int64(100 + i)}, pattern(w, 2))
	}
	second.Sync()
	if after := files(t, dir); len(after) != len(before) {
		t.Fatalf("files changed under the second tier: %v, then %v", before, after)
	}
	first.Purge()
	if got, ok := get(first, k); !ok || !bytes.Equal(got, pattern(w, 1)) {
		t.Fatal("the first tier lost its window")
	}
	// Once the first is gone, the directory is free to use.
	first.Close()
	second.Close()
	third := newDisk(t, dir, 1<<20, w)
	if got, ok := get(third, k); !ok || !bytes.Equal(got, pattern(w, 1)) {
		t.Fatal("after both closed, the window is not served")
	}
}

// TestDiskFormerFormatRemoved: files of the one-file-per-window format
// are removed at start-up, other files are left alone.
func TestDiskFormerFormatRemoved(t *testing.T) {
	dir := t.TempDir()
	vd := filepath.Join(dir, volA)
	if err := os.MkdirAll(vd, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"0000000000000003-1", ".tmp-123", "notes.txt"} {
		if err := os.WriteFile(filepath.Join(vd, name), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	newDisk(t, dir, 1<<20, 16<<10)
	f := files(t, dir)
	if len(f) != 1 || f[filepath.Join(volA, "notes.txt")] != 1 {
		t.Fatalf("files left: %v; want only notes.txt", f)
	}
}

// TestDiskConcurrentReadsAndEviction reads windows while a writer pushes
// the tier through its limit many times (run with -race): every hit has
// the bytes put for its key.
func TestDiskConcurrentReadsAndEviction(t *testing.T) {
	dir := t.TempDir()
	const (
		w = 16 << 10
		n = 600
	)
	c := newDisk(t, dir, 1<<20, w)
	done := make(chan struct{})
	var hits atomic.Int64
	var wg sync.WaitGroup
	for r := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := r; ; i = (i + 7) % n {
				select {
				case <-done:
					return
				default:
				}
				k := Key{Volume: volA, Object: int64(i)}
				if !c.disk.contains(k) {
					continue
				}
				got, _, ok := c.disk.get(k)
				if ok {
					hits.Add(1)
					if !bytes.Equal(got, pattern(w, byte(i))) {
						t.Errorf("window %d: wrong bytes", i)
						return
					}
					c.pool.put(got)
				}
			}
		}()
	}
	for i := range n {
		put(c, Key{Volume: volA, Object: int64(i)}, pattern(w, byte(i)))
		if i%16 == 0 {
			c.Sync()
		}
	}
	c.Sync()
	close(done)
	wg.Wait()
	if hits.Load() == 0 {
		t.Fatal("no read found a window on disk")
	}
	if s := c.Stats(); s.DiskDropped != 0 || s.DiskEvicted == 0 {
		t.Fatalf("dropped %d, evicted %d; want none dropped (a read must never see a freed segment) and evictions", s.DiskDropped, s.DiskEvicted)
	}
}

// TestContainsDoesNotLoad: Contains reports a window that is only on disk
// without reading it into memory (planning asks it of many windows ahead).
func TestContainsDoesNotLoad(t *testing.T) {
	dir := t.TempDir()
	const w = 16 << 10
	c := newDisk(t, dir, 1<<20, w)
	k := Key{Volume: volA, Object: 2}
	put(c, k, pattern(w, 1))
	c.Sync()
	c.Purge()
	if !c.Contains(k) {
		t.Fatal("a window on disk is not reported")
	}
	if s := c.Stats(); s.DiskHits != 0 || c.MemoryUsed() != 0 {
		t.Fatalf("Contains read the window: %d disk hits, %d bytes in memory", s.DiskHits, c.MemoryUsed())
	}
	if c.Contains(Key{Volume: volA, Object: 3}) {
		t.Fatal("a window nowhere is reported")
	}
}

// TestAcquireStreamKeepsDiskWindowsOutOfMain: a window a stream reads
// back from disk goes to the stream tier, also while the main tier is
// empty (a fetched one would go to the main tier then); a plain Acquire
// puts it in the main tier; a stream window used a second time moves
// there too.
func TestAcquireStreamKeepsDiskWindowsOutOfMain(t *testing.T) {
	dir := t.TempDir()
	const w = 16 << 10
	c := newDisk(t, dir, 1<<20, w)
	onDisk := []Key{{Volume: volA, Object: 1}, {Volume: volA, Object: 2}}
	for _, k := range onDisk {
		put(c, k, pattern(w, 1))
	}
	c.Sync()
	c.Purge()
	if c.mainUsed.Load() != 0 {
		t.Fatalf("main tier holds %d bytes after Purge", c.mainUsed.Load())
	}
	if b, ok := getStream(c, onDisk[0]); !ok || !bytes.Equal(b, pattern(w, 1)) {
		t.Fatal("AcquireStream: not served from disk, or wrong bytes")
	}
	if !c.stream.contains(onDisk[0]) || c.mainUsed.Load() != 0 {
		t.Fatalf("AcquireStream put the disk window in the main tier (main holds %d bytes)", c.mainUsed.Load())
	}
	// The tier counts the lookups it serves: the second moves the window.
	for i := 0; i < 2; i++ {
		if b, ok := getStream(c, onDisk[0]); !ok || !bytes.Equal(b, pattern(w, 1)) {
			t.Fatal("stream window read again: not found, or wrong bytes")
		}
	}
	if c.stream.contains(onDisk[0]) {
		t.Fatal("a stream window used a second time stayed in the stream tier")
	}
	if _, ok := c.mem.GetIfPresent(onDisk[0]); !ok {
		t.Fatal("a stream window used a second time did not move to the main tier")
	}
	if _, ok := get(c, onDisk[1]); !ok {
		t.Fatal("Acquire: not served from disk")
	}
	if c.stream.contains(onDisk[1]) {
		t.Fatal("Acquire put the disk window in the stream tier")
	}
	if _, ok := c.mem.GetIfPresent(onDisk[1]); !ok {
		t.Fatal("Acquire did not keep the disk window in the main tier")
	}
}

// TestEvictedWindowsReachDisk: a window whose disk write was skipped (its
// queue was full) is written when memory evicts it, from the main tier
// and from the stream tier; one whose write was not skipped is not
// written again.
func TestEvictedWindowsReachDisk(t *testing.T) {
	dir := t.TempDir()
	const w = 16 << 10
	c := newDisk(t, dir, 64<<20, w) // holds every window written here
	main, streamed := Key{Volume: volA, Object: 1}, Key{Volume: volA, Object: 2}
	// Stored in memory with their disk writes skipped (a full queue).
	em, es := &entry{data: pattern(w, 1)}, &entry{data: pattern(w, 2)}
	em.diskSkipped.Store(true)
	es.diskSkipped.Store(true)
	c.setMain(main, em)
	c.stream.put(streamed, es)
	for i := range 4 * int(c.max) / w {
		put(c, Key{Volume: volB, Object: int64(100 + i)}, pattern(w, 3))
		putStream(c, Key{Volume: volB, Object: int64(100000 + i)}, pattern(w, 4), false)
		c.mem.CleanUp() // evictions now, not in one burst at the end
		if i%16 == 0 {
			c.Sync() // room in the queue: no write may be dropped here
		}
	}
	c.mem.CleanUp()
	c.Sync()
	for _, k := range []Key{main, streamed} {
		if _, ok := c.mem.GetIfPresent(k); ok || c.stream.contains(k) {
			t.Fatalf("window %d still in memory", k.Object)
		}
		if !c.disk.contains(k) {
			t.Fatalf("window %d, evicted, is not on disk", k.Object)
		}
	}
}

// TestDiskWriteFailures: when appends fail (here the volume directory
// vanishes, so no new segment can be created), the windows are skipped
// and counted, and what is on disk is still served.
func TestDiskWriteFailures(t *testing.T) {
	dir := t.TempDir()
	const w = 64 << 10
	c := newDisk(t, dir, 4<<20, w) // segments of 256 KiB: three windows each
	first := Key{Volume: volA, Object: 1}
	put(c, first, pattern(w, 1))
	c.Sync()
	if err := os.RemoveAll(filepath.Join(dir, volA)); err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		put(c, Key{Volume: volA, Object: int64(10 + i)}, pattern(w, 2))
		c.Sync()
	}
	s := c.Stats()
	if s.DiskWriteErrors == 0 {
		t.Fatalf("no write error counted: %+v", s)
	}
	c.Purge()
	if got, ok := get(c, first); !ok || !bytes.Equal(got, pattern(w, 1)) {
		t.Fatal("the window written before the failures is not served")
	}
}

// TestDiskBufferedAppends runs the restart, torn-tail and damage tests
// with buffered appends, the fallback where the file system refuses
// O_DIRECT; and checks that O_DIRECT is used where it is available.
func TestDiskBufferedAppends(t *testing.T) {
	dir := t.TempDir()
	c := newDisk(t, dir, 1<<20, 16<<10)
	put(c, Key{Volume: volA, Object: 1}, pattern(100, 1))
	c.Sync()
	c.disk.mu.Lock()
	s := c.disk.open[volA]
	direct := s != nil && s.df != nil && s.df != s.f
	c.disk.mu.Unlock()
	if s == nil {
		t.Fatal("no segment open after a put")
	}
	probe, err := os.OpenFile(filepath.Join(dir, "probe"), os.O_CREATE|os.O_WRONLY|syscall.O_DIRECT, 0o600)
	if err == nil {
		probe.Close()
		if !direct {
			t.Fatal("O_DIRECT works in this directory but the segment appends are buffered")
		}
	} else {
		t.Logf("this file system refuses O_DIRECT (%v): the appends are buffered either way", err)
	}
	c.Close()
	directIO = false
	t.Cleanup(func() { directIO = true })
	t.Run("restart", TestDiskSurvivesRestart)
	t.Run("torn", TestDiskTornTail)
	t.Run("damaged", TestDiskRefusesDamagedAndForeignRecords)
	t.Run("bound", TestDiskBound)
}

// TestWhereAndLoadAhead: Where tells memory, disk and nowhere apart
// without loading; LoadAhead brings a disk window into memory marked as
// readahead, and refuses a damaged one.
func TestWhereAndLoadAhead(t *testing.T) {
	dir := t.TempDir()
	const w = 16 << 10
	c := newDisk(t, dir, 1<<20, w)
	a, b, none := Key{Volume: volA, Object: 1}, Key{Volume: volA, Object: 2}, Key{Volume: volA, Object: 3}
	put(c, a, pattern(w, 1))
	put(c, b, pattern(w, 2))
	c.Sync()
	c.Purge()
	put(c, a, pattern(w, 1))
	if c.Where(a) != InMemory || c.Where(b) != OnDisk || c.Where(none) != Missing {
		t.Fatalf("where: %v %v %v", c.Where(a), c.Where(b), c.Where(none))
	}
	if c.Stats().DiskHits != 0 {
		t.Fatal("Where read the disk")
	}
	if !c.LoadAhead(b) || c.Where(b) != InMemory {
		t.Fatal("LoadAhead did not bring the disk window into memory")
	}
	if got, ok := get(c, b); !ok || !bytes.Equal(got, pattern(w, 2)) || c.Stats().RAHits != 1 || c.Stats().DiskHits != 1 {
		t.Fatalf("after LoadAhead: found %v, stats %+v; want it from memory as a readahead hit", ok, c.Stats())
	}
	// A damaged record is not loaded.
	d := Key{Volume: volA, Object: 4}
	put(c, d, pattern(w, 4))
	c.Sync()
	c.Purge()
	c.disk.mu.Lock()
	loc := c.disk.index[d]
	c.disk.mu.Unlock()
	overwrite(t, filepath.Join(dir, loc.seg.rel), loc.off+loc.size-1, []byte{0xee})
	if c.LoadAhead(d) || c.Where(d) != Missing {
		t.Fatal("a damaged record was loaded, or is still indexed")
	}
	if c.LoadAhead(none) {
		t.Fatal("LoadAhead of a window nowhere")
	}
}

// removeIndexFiles removes the segments' index files under dir, so that
// the next start scans the records.
func removeIndexFiles(t *testing.T, dir string) {
	t.Helper()
	for rel := range files(t, dir) {
		if filepath.Ext(rel) == ".idx" {
			if err := os.Remove(filepath.Join(dir, rel)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestDiskIndexFiles: a clean stop leaves an index file per segment and
// the next start reads no record header; a damaged index file is ignored
// (the segment is scanned); an index file that points a window at
// another window's record costs a drop, never wrong bytes.
func TestDiskIndexFiles(t *testing.T) {
	dir := t.TempDir()
	const w = 64 << 10
	key := func(i int) Key { return Key{Volume: volA, Object: 9, Window: int64(i)} }
	const n = 20 // segments of 256 KiB: several of them
	c := newDisk(t, dir, 4<<20, w)
	for i := range n {
		put(c, key(i), pattern(w, byte(i)))
		c.Sync()
	}
	c.Close()
	check := func(what string, wantScan bool) *Cache {
		t.Helper()
		c := newDisk(t, dir, 4<<20, w)
		if scanned := c.disk.scanned.Load(); (scanned > 0) != wantScan {
			t.Fatalf("%s: %d record headers scanned at start-up", what, scanned)
		}
		for i := range n {
			if got, ok := get(c, key(i)); !ok || !bytes.Equal(got, pattern(w, byte(i))) {
				t.Fatalf("%s: window %d found %v", what, i, ok)
			}
		}
		return c
	}
	c = check("after a clean stop", false)
	c.Close()

	var idx []string
	for rel := range files(t, dir) {
		if filepath.Ext(rel) == ".idx" {
			idx = append(idx, filepath.Join(dir, rel))
		}
	}
	if len(idx) < 3 {
		t.Fatalf("%d index files, want one per segment", len(idx))
	}
	b := readAt(t, idx[0], 20, 1)
	b[0] ^= 1
	overwrite(t, idx[0], 20, b)
	c = check("with a damaged index file", true)
	c.Close()

	// A lying index: window 0's entry points at window 1's record (the
	// file's CRC is right).
	c = newDisk(t, dir, 4<<20, w)
	d := c.disk
	d.mu.Lock()
	l0, l1 := d.index[key(0)], d.index[key(1)]
	if l0.seg != l1.seg {
		d.mu.Unlock()
		t.Fatal("windows 0 and 1 in different segments")
	}
	d.index[key(0)] = recordLoc{seg: l1.seg, off: l1.off, size: l1.size}
	d.mu.Unlock()
	c.Close() // writes no index for old segments: write it by hand
	seg := l0.seg
	seg.dead = false
	d.writeIndex(seg)
	c = newDisk(t, dir, 4<<20, w)
	if got, ok := get(c, key(0)); ok {
		t.Fatalf("served window 1's record as window 0 (equal to window 1: %v)", bytes.Equal(got, pattern(w, 1)))
	}
	if s := c.Stats(); s.DiskDropped != 1 {
		t.Fatalf("dropped %d, want 1", s.DiskDropped)
	}
	if got, ok := get(c, key(1)); !ok || !bytes.Equal(got, pattern(w, 1)) {
		t.Fatal("window 1 lost")
	}
}

// TestDiskLoadsArePooled: windows loaded from the disk tier (plaintext
// and encrypted) land in buffers of the pool and go back to it: after a
// restart, loading more windows than memory holds reuses evicted
// windows' memory, a window a reader holds keeps its bytes while its
// memory would otherwise be reused (poisoned in these tests), and no
// window is released more often than held.
func TestDiskLoadsArePooled(t *testing.T) {
	const w = 64 << 10
	for _, tc := range []struct {
		name string
		seal func(t *testing.T) Sealer
	}{
		{"plain", func(*testing.T) Sealer { return nil }},
		{"sealed", func(t *testing.T) Sealer { return cacheSealer(t, 1, 2) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			seal := tc.seal(t)
			open := func() *Cache {
				// Memory for 8 windows, so loading 64 evicts most.
				c, err := New(Options{MemoryBytes: 8 * (w + entryOverhead + int64(len(volA))), Window: w, Dir: dir, DiskBytes: 64 << 20, Sealer: seal, Logger: zerolog.Nop()})
				if err != nil {
					t.Fatal(err)
				}
				return c
			}
			want := func(i int64) []byte { return pattern(w-int(i)*100, byte(i)) } // every length differs
			c := open()
			for i := range int64(64) {
				put(c, Key{Volume: volA, Object: i}, want(i))
			}
			c.Close()

			c = open()
			defer c.Close()
			held, ok := c.Acquire(Key{Volume: volA, Object: 0})
			if !ok || !bytes.Equal(held.Data, want(0)) {
				t.Fatalf("window 0 after restart: found %v, bytes right %v", ok, ok && bytes.Equal(held.Data, want(0)))
			}
			for range 2 {
				for i := int64(1); i < 64; i++ {
					got, ok := get(c, Key{Volume: volA, Object: i})
					if !ok || !bytes.Equal(got, want(i)) {
						t.Fatalf("window %d from disk: found %v, bytes right %v", i, ok, ok && bytes.Equal(got, want(i)))
					}
					c.mem.CleanUp()
				}
			}
			if !bytes.Equal(held.Data, want(0)) {
				t.Fatal("a held window loaded from disk changed while others were loaded: its memory was reused under a reader")
			}
			held.Release()
			s := c.Stats()
			if s.DiskHits < 100 {
				t.Fatalf("%d disk hits, want the 127 loads to come from disk", s.DiskHits)
			}
			if s.BuffersReused < 64 || s.BuffersFreed < 64 {
				t.Fatalf("buffers reused %d, freed %d over %d disk loads: loads do not go through the pool", s.BuffersReused, s.BuffersFreed, s.DiskHits)
			}
			if s.RefErrors != 0 || s.DiskDropped != 0 {
				t.Fatalf("%d releases past zero, %d records dropped", s.RefErrors, s.DiskDropped)
			}
		})
	}
}

// TestPreadvFullTakesNoReadLock: a load does not wait for another read
// of the same file, so concurrent loads from one segment run side by side.
// A Read blocked on a pipe holds the file's read lock; preadvFull on the
// same file must still get to the kernel (which refuses a positioned read
// of a pipe) instead of queueing behind it.
func TestPreadvFullTakesNoReadLock(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	blocked := make(chan struct{})
	go func() {
		close(blocked)
		var b [1]byte
		_, _ = r.Read(b[:]) // returns when w closes; its result is not the point
	}()
	<-blocked
	time.Sleep(50 * time.Millisecond) // let the Read reach its wait
	done := make(chan error, 1)
	go func() { done <- preadvFull(r, [][]byte{make([]byte, 8)}, 0) }()
	select {
	case err := <-done:
		if !errors.Is(err, syscall.ESPIPE) {
			t.Fatalf("preadvFull on a pipe: %v, want ESPIPE", err)
		}
	case <-time.After(10 * time.Second):
		w.Close()
		<-done
		t.Fatal("preadvFull waited for a Read of the same file: loads from one segment are serialized")
	}
	w.Close()
}

// TestPlainSplit: the data length and header size found from a record's
// size are those of the record encodeWindow wrote, for every length near
// a CRC block boundary, and a size no record has is refused.
func TestPlainSplit(t *testing.T) {
	const w = 64 << 10
	k := Key{Volume: volA, Object: 3, Window: 1}
	for n := 1; n <= w; n++ {
		if r := n % crcBlock; n > 8 && r > 4 && r < crcBlock-4 && n < w-8 {
			continue // the boundaries are where a mistake shows
		}
		rec := encodeWindow(k, w, make([]byte, n))
		gotN, h, ok := plainSplit(int64(len(rec)), len(volA), w)
		if !ok || gotN != int64(n) || h != int64(len(rec)-n) {
			t.Fatalf("length %d: split gives %d, %d, %v; want %d, %d", n, gotN, h, ok, n, len(rec)-n)
		}
	}
	for _, size := range []int64{0, headerFixed, int64(len(encodeWindow(k, w, make([]byte, w)))) + 1} {
		if n, h, ok := plainSplit(size, len(volA), w); ok {
			t.Errorf("size %d: split as %d + %d, want refused", size, h, n)
		}
	}
}
