package volume_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/volume"
)

// TestCommitKeepsWindowsOnlyOnceStored: a chunk's data is in cache
// windows before its upload (the chunker builds it there), but the cache
// keeps them only once the object is stored. An upload refused for good (another writer's object at that
// key) leaves nothing in the cache, so no later read can be served bytes
// the bucket never held; a stored one is served from the cache.
func TestCommitKeepsWindowsOnlyOnceStored(t *testing.T) {
	const bs = 4096
	for _, fail := range []bool{false, true} {
		name := "stored"
		if fail {
			name = "refused"
		}
		t.Run(name, func(t *testing.T) {
			f := faulty.New(mem.New())
			e, err := enginetest.New(f, enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 4 * mib})
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				// A fenced volume's close reports the write it lost.
				if err := e.Engine.Close(context.Background()); (err != nil) != fail {
					t.Errorf("close: %v", err)
				}
			}()
			if e.Cache == nil {
				t.Fatal("the engine has no read cache")
			}
			if fail {
				f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Err: store.ErrExists, Match: func(name string) bool {
					return len(name) == len(store.DataName(0)) && name[8] == '/'
				}})
			}
			before := e.Cache.Stats()
			data := bytes.Repeat([]byte{0x5a}, 64*bs)
			ctx := context.Background()
			werr := e.Dev.WriteAt(ctx, data, 0, false)
			if werr == nil {
				werr = e.Dev.Drain(ctx) // waits for the commit
			}
			after := e.Cache.Stats()
			if fail {
				if werr == nil {
					t.Fatal("a write whose upload was refused was drained without an error")
				}
				if !errors.Is(werr, volume.ErrFenced) && e.Volume.Err() == nil {
					t.Fatalf("write error %v and a volume still accepting writes, want it fenced", werr)
				}
				if n := after.Inserted - before.Inserted; n != 0 {
					t.Fatalf("%d windows kept for an object that was never stored", n)
				}
				if used := e.Cache.MemoryUsed(); used != 0 {
					t.Fatalf("the cache holds %d bytes after a refused upload", used)
				}
				// The acknowledged write is still served, from the
				// windows the chunk was built in (still the chunker's).
				got := make([]byte, len(data))
				if err := e.Dev.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, data) {
					t.Fatalf("read of a write whose upload was refused: %v, equal %v", err, bytes.Equal(got, data))
				}
				return
			}
			if werr != nil {
				t.Fatal(werr)
			}
			if n := after.Inserted - before.Inserted; n != int64(len(data))/e.Cache.Window() {
				t.Fatalf("%d windows kept for a stored object of %d bytes (window %d)", n, len(data), e.Cache.Window())
			}
			got := make([]byte, len(data))
			gets := e.Objs.Stats().Get.Attempts
			if err := e.Dev.ReadAt(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) || e.Objs.Stats().Get.Attempts != gets {
				t.Fatalf("re-read of a committed write: bytes right %v, %d GETs (want 0)", bytes.Equal(got, data), e.Objs.Stats().Get.Attempts-gets)
			}
		})
	}
}

// TestCommitWindowsCachesWithoutCopy: a chunk built in the read cache's
// windows (the chunker's path whenever there is a cache) is uploaded from
// them and they become the cache's windows of the new object: the cache
// serves the very memory the data was written into, not a copy. The
// stored hook runs before the cache holds them (from then on the cache
// may recycle them, so the chunker must have let go first), and the
// object in the store holds the same bytes.
func TestCommitWindowsCachesWithoutCopy(t *testing.T) {
	const bs = 4096
	e := enginetest.Open(t, mem.New(), enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 1 * mib})
	win, alloc := e.Volume.ChunkWindow(1)
	if win == 0 || e.Cache == nil {
		t.Fatal("an engine with a read cache takes no chunk windows")
	}
	l := e.Volume.Layout()
	b := chunk.NewWindowed(l, make([]byte, l.MetadataSize()), win, alloc)
	data := make([]byte, 3*win+win/2)
	for i := range data {
		data[i] = byte(i*13 + i>>12)
	}
	b.Add(chunk.Item{Sector: 8 * 16, Length: uint64(len(data)) / chunk.SectorSize, Seqno: 1, Flag: chunk.OpWrite}, data)
	pieces := b.Data()
	if len(pieces) != 4 {
		t.Fatalf("%d windows for %d bytes", len(pieces), len(data))
	}
	vol := e.Volume.Superblock().VolumeID
	key := e.Volume.NextKey()
	cached := func() int {
		n := 0
		for w := range pieces {
			if v, ok := e.Cache.Acquire(cache.Key{Volume: vol, Object: key, Window: int64(w)}); ok {
				n++
				v.Release()
			}
		}
		return n
	}
	atHook := -1
	ctx := chunk.WithStoredHook(context.Background(), func(int64) { atHook = cached() })
	ctx = chunk.WithDataCRC(ctx, b.DataCRC())
	if err := e.Volume.CommitWindows(ctx, key, b.Metadata(), pieces, b.Items()); err != nil {
		t.Fatal(err)
	}
	if atHook != 0 {
		t.Fatalf("the stored hook ran with %d of the windows in the cache already (or not at all: -1)", atHook)
	}
	for w, p := range pieces {
		v, ok := e.Cache.Acquire(cache.Key{Volume: vol, Object: key, Window: int64(w)})
		if !ok {
			t.Fatalf("window %d of the committed object is not cached", w)
		}
		same := len(v.Data) == len(p) && &v.Data[0] == &p[0]
		v.Release()
		if !same {
			t.Fatalf("window %d is cached as a copy, not as the window it was written into", w)
		}
	}
	got := make([]byte, len(data))
	if err := e.Dev.ReadAt(context.Background(), got, 8*16*chunk.SectorSize); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back from the cache: %v, equal %v", err, bytes.Equal(got, data))
	}
	e.Cache.Purge()
	clear(got)
	if err := e.Dev.ReadAt(context.Background(), got, 8*16*chunk.SectorSize); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back from the store: %v, equal %v", err, bytes.Equal(got, data))
	}
}

// TestCommitWindowsWithoutStoredHook: a caller that does not take the
// stored hook keeps its windows (nothing tells it when they would stop
// being its own), so the cache gets copies of them, never the windows.
func TestCommitWindowsWithoutStoredHook(t *testing.T) {
	const bs = 4096
	e := enginetest.Open(t, mem.New(), enginetest.Options{Size: 32 * mib, BlockSize: bs, ChunkSize: 1 * mib})
	win, alloc := e.Volume.ChunkWindow(1)
	l := e.Volume.Layout()
	b := chunk.NewWindowed(l, make([]byte, l.MetadataSize()), win, alloc)
	data := bytes.Repeat([]byte{0x3c}, int(2*win))
	b.Add(chunk.Item{Sector: 0, Length: uint64(len(data)) / chunk.SectorSize, Seqno: 1, Flag: chunk.OpWrite}, data)
	pieces := b.Data()
	key := e.Volume.NextKey()
	if err := e.Volume.CommitWindows(context.Background(), key, b.Metadata(), pieces, b.Items()); err != nil {
		t.Fatal(err)
	}
	vol := e.Volume.Superblock().VolumeID
	for w, p := range pieces {
		v, ok := e.Cache.Acquire(cache.Key{Volume: vol, Object: key, Window: int64(w)})
		if !ok {
			t.Fatalf("window %d of the committed object is not cached", w)
		}
		same := &v.Data[0] == &p[0]
		equal := bytes.Equal(v.Data, p)
		v.Release()
		if same || !equal {
			t.Fatalf("window %d: cached as the caller's own window %v, equal bytes %v; want a copy", w, same, equal)
		}
	}
}
