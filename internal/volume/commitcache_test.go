package volume_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/volume"
)

// TestCommitKeepsWindowsOnlyOnceStored: a commit copies its data into
// cache windows before the upload but keeps them only once the object is
// stored. An upload refused for good (another writer's object at that
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
