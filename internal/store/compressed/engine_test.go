package compressed_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/inspect"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/compressed"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
	"github.com/bs3/bs3/internal/testutil/textlike"
)

const (
	volSize = 32 << 20
	bs      = 4096
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// text is the device's text-like content; block b of version v is its
// block b with the block number and version in the first 16 bytes.
var text = textlike.Bytes(3, volSize)

func block(dst []byte, b int64, ver uint64) {
	if ver == 0 {
		clear(dst)
		return
	}
	copy(dst, text[b*bs:(b+1)*bs])
	dst[0], dst[1], dst[2], dst[3] = byte(b), byte(b>>8), byte(b>>16), byte(ver)
}

// stack opens the store as main does: raw → sealed (optional) →
// compressed; the engine then puts its object proxy on top.
func stack(t *testing.T, raw store.Store, key *sealed.KeyConfig, codec string) (store.Store, *sealed.Record) {
	t.Helper()
	st, rec := raw, (*sealed.Record)(nil)
	if key != nil {
		var err error
		if st, rec, err = sealed.Open(ctxT(t), raw, *key); err != nil {
			t.Fatal(err)
		}
	}
	c, err := compressed.Open(ctxT(t), st, compressed.Options{Codec: codec})
	if err != nil {
		t.Fatal(err)
	}
	return c, rec
}

func attach(t *testing.T, raw store.Store, key *sealed.KeyConfig, codec string) *enginetest.Engine {
	t.Helper()
	st, rec := stack(t, raw, key, codec)
	return enginetest.Open(t, st, enginetest.Options{Size: volSize, BlockSize: bs, Encryption: rec})
}

// versions: block b has version ver[b] (0: never written).
func write(t *testing.T, e *enginetest.Engine, vers []uint64, every int64, ver uint64) {
	t.Helper()
	ctx := ctxT(t)
	buf := make([]byte, bs)
	for b := int64(0); b < volSize/bs; b += every {
		block(buf, b, ver)
		if err := e.Dev.WriteAt(ctx, buf, b*bs, false); err != nil {
			t.Fatal(err)
		}
		vers[b] = ver
	}
	if err := e.Dev.Flush(ctx); err != nil {
		t.Fatal(err)
	}
}

func check(t *testing.T, e *enginetest.Engine, vers []uint64) {
	t.Helper()
	ctx := ctxT(t)
	got, want := make([]byte, bs), make([]byte, bs)
	// Unaligned multi-block reads too: they cross segment boundaries.
	for b := int64(0); b < volSize/bs; b++ {
		block(want, b, vers[b])
		if err := e.Dev.ReadAt(ctx, got, b*bs); err != nil {
			t.Fatalf("read block %d: %v", b, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("block %d: wrong content", b)
		}
	}
}

// dataBytes is the stored size of the bucket's data objects.
func dataBytes(t *testing.T, raw store.Store) int64 {
	t.Helper()
	var n int64
	if err := raw.List(ctxT(t), "", func(name string, size int64) error {
		if _, ok := store.ParseDataName(name); ok {
			n += size
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestEngine writes and reads a volume through the real engine with
// compression on, over MinIO, plaintext and encrypted: text-like data is
// stored at under half its size, the codec changes between attaches
// (zstd, lz4, none) and everything stays readable, check finds no damage,
// and damage is an I/O error, never wrong bytes.
func TestEngine(t *testing.T) {
	srv := minio.Start(t)
	for _, encrypted := range []bool{false, true} {
		name := "plain"
		if encrypted {
			name = "sealed"
		}
		t.Run(name, func(t *testing.T) {
			raw := srv.Store(t, srv.Bucket(t))
			var key *sealed.KeyConfig
			if encrypted {
				p := filepath.Join(t.TempDir(), "key")
				if err := os.WriteFile(p, bytes.Repeat([]byte{5}, 32), 0o600); err != nil {
					t.Fatal(err)
				}
				key = &sealed.KeyConfig{KeyFile: p}
			}
			vers := make([]uint64, volSize/bs)
			e := attach(t, raw, key, "zstd")
			write(t, e, vers, 1, 1)
			e.Close(t)
			stored := dataBytes(t, raw)
			t.Logf("%d MiB written, %d KiB of data objects stored (%.1f%%)", volSize>>20, stored>>10, 100*float64(stored)/volSize)
			if stored*2 > volSize {
				t.Errorf("text-like data stored at %.1f%% with zstd, want <= 50%%", 100*float64(stored)/volSize)
			}
			if _, err := raw.Size(ctxT(t), compressed.MarkerName); err != nil {
				t.Errorf("no %q object after compressed writes: %v", compressed.MarkerName, err)
			}

			e = attach(t, raw, key, "lz4")
			check(t, e, vers)
			write(t, e, vers, 3, 2)
			e.Close(t)
			e = attach(t, raw, key, "none")
			check(t, e, vers)
			write(t, e, vers, 5, 3)
			e.Close(t)

			// bs3 check reads through compressed objects (sizes from
			// their headers) and finds nothing wrong.
			st, _ := stack(t, raw, key, "none")
			ro, err := compressed.Open(ctxT(t), st.(*compressed.Store).Inner(), compressed.Options{AssumeCompressed: true})
			if err != nil {
				t.Fatal(err)
			}
			objs := objproxy.New(ro, objproxy.Options{Uploaders: 2, Downloaders: 8, MaxAttempts: 3, Logger: zerolog.Nop()})
			rep, err := inspect.Check(ctxT(t), objs, inspect.CheckOptions{Fallback: inspect.Fallback{Size: volSize, BlockSize: bs, ChunkSize: 4 << 20}})
			objs.Close()
			if err != nil {
				t.Fatal(err)
			}
			if !rep.Healthy() {
				t.Fatalf("check of a healthy compressed volume found damage: %+v", rep.Findings)
			}

			// Damage inside every compressed (or sealed) data object:
			// each block reads back right or fails with ErrCorrupt.
			ctx := ctxT(t)
			var names []string
			if err := raw.List(ctx, "", func(name string, size int64) error {
				if _, ok := store.ParseDataName(name); ok && size > 8<<10 {
					names = append(names, name)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			for _, n := range names {
				size, err := raw.Size(ctx, n)
				if err != nil {
					t.Fatal(err)
				}
				b := make([]byte, size)
				if _, err := raw.GetRange(ctx, n, 0, b); err != nil {
					t.Fatal(err)
				}
				if key == nil && !bytes.HasPrefix(b, []byte("BS3CMPR\x00")) {
					// Stored as it is (written with codec none): without
					// encryption nothing checks those bytes; that is the
					// integrity item's business, not compression's.
					continue
				}
				b[len(b)*2/3] ^= 0x10
				if err := raw.Put(ctx, n, b, false); err != nil {
					t.Fatal(err)
				}
			}
			e = attach(t, raw, key, "zstd")
			got, want := make([]byte, bs), make([]byte, bs)
			failed := 0
			for b := int64(0); b < volSize/bs; b++ {
				block(want, b, vers[b])
				if err := e.Dev.ReadAt(ctx, got, b*bs); err != nil {
					if !errors.Is(err, store.ErrCorrupt) {
						t.Fatalf("block %d: error %v does not wrap ErrCorrupt", b, err)
					}
					failed++
					continue
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("block %d: wrong bytes returned from a damaged object", b)
				}
			}
			if failed == 0 {
				t.Fatal("no read failed although every data object was damaged")
			}
			t.Logf("%d of %d block reads failed with ErrCorrupt, the rest were right", failed, volSize/bs)
		})
	}
}
