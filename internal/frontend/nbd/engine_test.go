package nbd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/bs3/bs3/internal/store/s3"
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
	// The large writes reached their chunks in the payload windows the
	// server read them into (frontend.WindowWriter), not as copies.
	if e.Dev.AdoptedWindows() == 0 {
		t.Error("no payload window was taken into a chunk as it is")
	}
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
// data older than an acknowledged write, while chunks upload to MinIO:
// with 4 KiB writes, and with 128 KiB writes, which the server reads into
// payload windows that their chunks keep.
func TestReadAfterWriteOnEngine(t *testing.T) {
	for _, size := range []int{4096, 128 << 10} {
		t.Run(fmt.Sprintf("%dKiB", size>>10), func(t *testing.T) { readAfterWriteOnEngine(t, size) })
	}
}

func readAfterWriteOnEngine(t *testing.T, size int) {
	srv := minio.Start(t)
	st := srv.Store(t, srv.Bucket(t))
	// As the daemon runs: every PUT carries a CRC32C that MinIO checks,
	// combined from the checksums the server took of each payload
	// window as it read it.
	if mode, err := st.ProbePayloadChecksum(context.Background(), "payload-probe"); err != nil || mode != s3.PayloadCRC32C {
		t.Fatalf("payload mode %q (%v), want crc32c", mode, err)
	}
	e := enginetest.Open(t, st, enginetest.Options{Size: 64 << 20, BlockSize: 4096})
	s := startServer(t, e.Dev, Options{})
	const clients, blocks = 4, 8
	rounds := uint64(60)
	if size > 4096 {
		rounds = 20
	}
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := connect(t, s.Addr(), "bs3")
			defer cl.disconnect()
			payload := make([]byte, size)
			for v := uint64(1); v <= rounds; v++ {
				for b := 0; b < blocks; b++ {
					off := uint64((c*blocks + b) * size)
					for i := 0; i < len(payload); i += 8 {
						binary.LittleEndian.PutUint64(payload[i:], v<<32|uint64(i))
					}
					if errno := cl.writeAt(off, payload, 0); errno != 0 {
						errs <- fmt.Errorf("write errno %d", errno)
						return
					}
					errno, data := cl.readAt(off, uint32(size))
					if errno != 0 {
						errs <- fmt.Errorf("read errno %d", errno)
						return
					}
					if !bytes.Equal(data, payload) {
						errs <- fmt.Errorf("client %d write %d: read version %d right after acknowledged write %d", c, b, binary.LittleEndian.Uint64(data)>>32, v)
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
	if size >= 64<<10 && e.Dev.AdoptedWindows() == 0 {
		t.Error("no payload window was taken into a chunk as it is")
	}
}
