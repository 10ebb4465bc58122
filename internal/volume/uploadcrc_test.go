package volume_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/crc32c"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// crcCheckStore checks the payload checksum every Put of a data object
// carries (store.BodyCRC32C) against the body it stores.
type crcCheckStore struct {
	store.Store
	mu      sync.Mutex
	carried int
	pieces  int // of carried: uploads in pieces (PutV)
	wrong   []string
}

func (c *crcCheckStore) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	if crc, ok := store.BodyCRC32C(ctx, body); ok {
		c.mu.Lock()
		c.carried++
		if want := crc32c.Checksum(body); crc != want {
			c.wrong = append(c.wrong, fmt.Sprintf("%s: %08x, body's %08x (%d bytes)", name, crc, want, len(body)))
		}
		c.mu.Unlock()
	}
	return c.Store.Put(ctx, name, body, ifAbsent)
}

// PutV checks the checksum of a chunk uploaded from cache windows.
func (c *crcCheckStore) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	if crc, ok := store.PiecesCRC32C(ctx, body); ok {
		joined := store.Join(body)
		c.mu.Lock()
		c.carried++
		c.pieces++
		if want := crc32c.Checksum(joined); crc != want {
			c.wrong = append(c.wrong, fmt.Sprintf("%s: %08x, body's %08x (%d bytes in %d pieces)", name, crc, want, len(joined), len(body)))
		}
		c.mu.Unlock()
	}
	return store.PutPieces(ctx, c.Store, name, body, ifAbsent)
}

// TestUploadCRCFromBuilder: the CRC32C an upload carries, combined from
// the checksum the chunk builder kept of the data as it was copied in and
// the metadata in front of it, is the checksum of the object's bytes: for
// full and flushed (compact) chunks, writes of every size, and items
// without data (trims, zeroes). A wrong one would have every upload
// refused by an S3 store that checks it.
func TestUploadCRCFromBuilder(t *testing.T) {
	// With the read cache the chunker builds chunks in cache windows and
	// the engine uploads them in pieces; without it, one buffer.
	for _, noCache := range []bool{false, true} {
		t.Run(fmt.Sprintf("nocache=%v", noCache), func(t *testing.T) { testUploadCRCFromBuilder(t, noCache) })
	}
}

func testUploadCRCFromBuilder(t *testing.T, noCache bool) {
	const bs = 4096
	st := &crcCheckStore{Store: mem.New()}
	e := enginetest.Open(t, st, enginetest.Options{Size: 64 << 20, BlockSize: bs, ChunkSize: 1 << 20, NoCache: noCache})
	defer e.Close(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 400 {
		n := int64(1+rng.IntN(64)) * bs
		off := rng.Int64N((64<<20-n)/bs) * bs
		switch {
		case i%37 == 0:
			if err := e.Dev.Zero(ctx, off, n, true, false); err != nil {
				t.Fatal(err)
			}
		case i%29 == 0:
			if err := e.Dev.Zero(ctx, off, n, false, false); err != nil {
				t.Fatal(err)
			}
		default:
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			if err := e.Dev.WriteAt(ctx, p, off, false); err != nil {
				t.Fatal(err)
			}
		}
		if i%13 == 0 { // a flush closes a part-filled chunk: a compact object
			if err := e.Dev.Flush(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := e.Dev.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.carried < 30 {
		t.Fatalf("only %d uploads carried a checksum", st.carried)
	}
	if want := map[bool]int{false: st.carried, true: 0}[noCache]; st.pieces != want {
		t.Fatalf("%d of %d uploads were in pieces, want %d", st.pieces, st.carried, want)
	}
	if len(st.wrong) > 0 {
		t.Fatalf("%d of %d uploads carried a wrong checksum, first: %s", len(st.wrong), st.carried, st.wrong[0])
	}
}

// TestUploadCRCAcceptedByMinIO: MinIO, which checks the CRC32C payload
// checksum of every upload, takes the ones combined from the builder's
// checksum, and the data reads back.
func TestUploadCRCAcceptedByMinIO(t *testing.T) {
	srv := minio.Start(t)
	for _, noCache := range []bool{false, true} {
		t.Run(fmt.Sprintf("nocache=%v", noCache), func(t *testing.T) { testUploadCRCAcceptedByMinIO(t, srv, noCache) })
	}
}

func testUploadCRCAcceptedByMinIO(t *testing.T, srv *minio.Server, noCache bool) {
	const bs = 4096
	o := srv.Options(t, srv.Bucket(t))
	o.PayloadChecksum = s3.PayloadCRC32C
	st := srv.StoreWith(t, o)
	e := enginetest.Open(t, st, enginetest.Options{Size: 16 << 20, BlockSize: bs, ChunkSize: 1 << 20, NoCache: noCache})
	defer e.Close(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(5, 6))
	want := make([]byte, 16<<20)
	for i := range 60 {
		n := int64(1+rng.IntN(32)) * bs
		off := rng.Int64N((16<<20-n)/bs) * bs
		for j := off; j < off+n; j++ {
			want[j] = byte(rng.Uint32())
		}
		if err := e.Dev.WriteAt(ctx, want[off:off+n], off, false); err != nil {
			t.Fatal(err)
		}
		if i%7 == 0 {
			if err := e.Dev.Flush(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Uploads MinIO refuses are retried without end: give up after a
	// minute (these take well under a second).
	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := e.Dev.Drain(dctx); err != nil {
		t.Fatalf("drain: %v (put stats %+v: MinIO refused the uploads' checksums?)", err, e.Objs.Stats().Put)
	}
	if s := e.Objs.Stats().Put; s.Retries != 0 || s.Failures != 0 {
		t.Fatalf("uploads retried %d times, failed %d: MinIO refused their checksums", s.Retries, s.Failures)
	}
	if e.Cache != nil {
		e.Cache.Purge() // read back what MinIO stored, not the windows
	}
	got := make([]byte, len(want))
	if err := e.Dev.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the device does not read back what was written")
	}
	if e.Cache != nil && e.Cache.Stats().Misses == 0 {
		t.Fatal("the read back never missed the purged cache: it did not read what MinIO stored")
	}
}
