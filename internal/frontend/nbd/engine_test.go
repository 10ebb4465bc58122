package nbd

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// The real NBD clients against the real engine on MinIO, and the device
// contents unchanged across a clean restart of the engine.
func TestRealClientsOnEngine(t *testing.T) {
	needTool(t, "nbdcopy", "libnbd-bin")
	const size = 384 << 20
	srv := minio.Start(t)
	st := srv.Store(t, srv.Bucket(t))
	e := enginetest.Open(t, st, enginetest.Options{Size: size, BlockSize: 4096})
	s := startServer(t, e.Dev, Options{})
	t.Run("nbdinfo", func(t *testing.T) { runNbdinfo(t, s.URI(), size, 4096, DefaultMaxRequest) })
	t.Run("qemu-io", func(t *testing.T) { runQemuIOPatterns(t, s.URI(), size) })
	t.Run("nbdcopy", func(t *testing.T) { runNbdcopy(t, s.URI(), 256<<20) })
	t.Run("fio", func(t *testing.T) { runFio(t, s.URI(), 64<<20) })
	before := exportSum(t, s.URI())
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	e.Close(t)

	e2 := enginetest.Open(t, st, enginetest.Options{Size: size, BlockSize: 4096})
	s2 := startServer(t, e2.Dev, Options{})
	if after := exportSum(t, s2.URI()); !bytes.Equal(before, after) {
		t.Fatalf("device contents changed across a restart: sha256 %x, then %x", before, after)
	}
}

// exportSum copies the whole export out with nbdcopy and hashes it.
func exportSum(t *testing.T, uri string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "export.img")
	if o, err := runTool(t, "nbdcopy", uri, out); err != nil {
		t.Fatalf("nbdcopy export → %s: %v\n%s", out, err, o)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	defer os.Remove(out)
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return h.Sum(nil)
}

// Concurrent writes and reads of the same blocks through NBD never return
// data older than an acknowledged write, while chunks upload to MinIO.
func TestReadAfterWriteOnEngine(t *testing.T) {
	srv := minio.Start(t)
	st := srv.Store(t, srv.Bucket(t))
	e := enginetest.Open(t, st, enginetest.Options{Size: 64 << 20, BlockSize: 4096})
	s := startServer(t, e.Dev, Options{})
	const clients, blocks, rounds = 4, 8, 60
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := connect(t, s.Addr(), "bs3")
			defer cl.disconnect()
			payload := make([]byte, 4096)
			for v := uint64(1); v <= rounds; v++ {
				for b := 0; b < blocks; b++ {
					off := uint64(c*blocks+b) * 4096
					for i := 0; i < len(payload); i += 8 {
						binary.LittleEndian.PutUint64(payload[i:], v)
					}
					if errno := cl.writeAt(off, payload, 0); errno != 0 {
						errs <- fmt.Errorf("write errno %d", errno)
						return
					}
					errno, data := cl.readAt(off, 4096)
					if errno != 0 {
						errs <- fmt.Errorf("read errno %d", errno)
						return
					}
					if got := binary.LittleEndian.Uint64(data); got != v {
						errs <- fmt.Errorf("client %d block %d: read version %d right after acknowledged write %d", c, b, got, v)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
