package fuse

import (
	"testing"

	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/dir"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// The user's path on current kernels: ext4 on a loop device on the FUSE
// file on the real engine, on MinIO and on the dir store, across a clean
// restart of the engine.
func TestKernelPathOnEngine(t *testing.T) {
	requireFUSE(t, "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount", "cp", "sync")
	stores := map[string]func(t *testing.T) store.Store{
		"minio": func(t *testing.T) store.Store {
			srv := minio.Start(t)
			return srv.Store(t, srv.Bucket(t))
		},
		"dir": func(t *testing.T) store.Store {
			st, err := dir.New(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			return st
		},
	}
	for name, newStore := range stores {
		t.Run(name, func(t *testing.T) {
			st := newStore(t)
			o := enginetest.Options{Size: 512 << 20, BlockSize: 4096}
			e := enginetest.Open(t, st, o)
			runKernelPath(t, e.Dev, func() frontend.Device {
				e.Close(t)
				e = enginetest.Open(t, st, o)
				return e.Dev
			})
		})
	}
}
