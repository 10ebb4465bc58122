package sealed

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/bs3/bs3/internal/crc32c"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/store/storetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

func newChecksummed(t testing.TB, inner store.Store) *Store {
	t.Helper()
	s, err := NewChecksummed(inner, testSeal)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestChecksumConformanceMem(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return newChecksummed(t, mem.New()) })
}

func TestChecksumConformanceMinIO(t *testing.T) {
	srv := minio.Start(t)
	storetest.Run(t, func(t *testing.T) store.Store { return newChecksummed(t, srv.Store(t, srv.Bucket(t))) })
}

// The damage tests of the sealed format, over the checksum-only framing:
// a flipped byte anywhere, a segment moved, replayed, mixed from two
// writes or cut off, each reads as ErrCorrupt and never as other bytes.
func TestChecksumFramingDamage(t *testing.T) {
	old := framing
	framing = func(inner store.Store, seal []byte) (*Store, error) { return NewChecksummed(inner, seal) }
	defer func() { framing = old }()
	t.Run("FlippedByte", TestFlippedByte)
	t.Run("SegmentMovedOrReplayed", TestSegmentMovedOrReplayed)
	t.Run("Truncated", TestTruncated)
}

// The framing keeps the body in the clear (it is not encryption) and
// costs the same 32 bytes per 4 KiB segment as sealing.
func TestChecksumFramingLayout(t *testing.T) {
	ctx := context.Background()
	inner := mem.New()
	s := newChecksummed(t, inner)
	body := pattern(2*SegmentSize+7, 11)
	if err := s.Put(ctx, "o", body, false); err != nil {
		t.Fatal(err)
	}
	raw := rawBytes(t, inner, "o")
	if int64(len(raw)) != SealedSize(int64(len(body))) {
		t.Fatalf("stored %d bytes for %d, want %d", len(raw), len(body), SealedSize(int64(len(body))))
	}
	if !bytes.Equal(raw[saltSize:saltSize+SegmentSize], body[:SegmentSize]) {
		t.Error("segment 0's body is not stored as it is")
	}
	// A zeroed tag never verifies, even over a zeroed body.
	zero := make([]byte, len(raw))
	copy(zero, raw[:saltSize])
	if err := inner.Put(ctx, "z", zero[:storedSize], false); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetRange(ctx, "z", 0, make([]byte, 10)); err == nil {
		t.Error("a zeroed segment verified")
	}
}

// TestPutVSealsAcrossPieces: a body given in pieces whose boundaries fall
// inside segments (and empty pieces) is sealed as its concatenation, in
// the checksummed and the encrypted format: it reads back whole and in
// ranges, and one flipped stored byte is still caught.
func TestPutVSealsAcrossPieces(t *testing.T) {
	ctx := context.Background()
	body := make([]byte, 3*SegmentSize+1234)
	for i := range body {
		body[i] = byte(i*31 + i>>9)
	}
	pieces := [][]byte{body[:100], body[100:100], body[100 : SegmentSize+1], body[SegmentSize+1 : 2*SegmentSize+7], body[2*SegmentSize+7:]}
	for _, kind := range []string{"checksummed", "encrypted"} {
		inner := mem.New()
		var s *Store
		if kind == "checksummed" {
			s = newChecksummed(t, inner)
		} else {
			s = newSealed(t, inner, testSeal)
		}
		name := store.DataName(1)
		if err := s.PutV(ctx, name, pieces, true); err != nil {
			t.Fatalf("%s: PutV: %v", kind, err)
		}
		if sz, err := inner.Size(ctx, name); err != nil || sz != SealedSize(int64(len(body))) {
			t.Fatalf("%s: stored %d bytes (%v), want %d", kind, sz, err, SealedSize(int64(len(body))))
		}
		for _, r := range [][2]int{{0, len(body)}, {90, 200}, {SegmentSize - 3, SegmentSize + 10}, {len(body) - 5, 5}} {
			got := make([]byte, r[1])
			if n, err := s.GetRange(ctx, name, int64(r[0]), got); err != nil || n != r[1] || !bytes.Equal(got, body[r[0]:r[0]+r[1]]) {
				t.Fatalf("%s: range %v reads back %d bytes (%v), equal %v", kind, r, n, err, bytes.Equal(got[:n], body[r[0]:r[0]+n]))
			}
		}
		raw := make([]byte, SealedSize(int64(len(body))))
		if _, err := inner.GetRange(ctx, name, 0, raw); err != nil {
			t.Fatal(err)
		}
		raw[storedSize+100] ^= 1 // in the second segment
		if err := inner.Put(ctx, name, raw, false); err != nil {
			t.Fatal(err)
		}
		if _, err := s.GetRange(ctx, name, 0, make([]byte, len(body))); !errors.Is(err, store.ErrCorrupt) {
			t.Fatalf("%s: a flipped byte read back with err %v, want ErrCorrupt", kind, err)
		}
	}
}

// TestFramedMatchesSealed: a checksum-only put framed around the caller's
// pieces (framed.go) stores byte for byte what sealing a copy stores, for
// bodies cut at segment boundaries, inside segments and into empty
// pieces, without copying any of the body, and the stored bytes'
// checksum it returns is theirs.
func TestFramedMatchesSealed(t *testing.T) {
	s := newChecksummed(t, mem.New())
	rng := rand.New(rand.NewPCG(3, 4))
	name := store.DataName(7)
	var salt [saltSize]byte
	for _, size := range []int{0, 1, SegmentSize - 1, SegmentSize, SegmentSize + 1, 3*SegmentSize + 1234, 64 << 10} {
		body := make([]byte, size)
		for i := range body {
			body[i] = byte(rng.Uint32())
		}
		for trial := range 8 {
			// Trial 0: one piece; 1: cut at segment boundaries; then
			// random cuts, some empty.
			var pieces [][]byte
			switch rest := body; trial {
			case 0:
				pieces = [][]byte{body}
			case 1:
				for len(rest) > SegmentSize {
					pieces, rest = append(pieces, rest[:SegmentSize]), rest[SegmentSize:]
				}
				pieces = append(pieces, rest)
			default:
				for len(rest) > 0 {
					n := min(len(rest), rng.IntN(2*SegmentSize))
					pieces, rest = append(pieces, rest[:n]), rest[n:]
				}
			}
			for i := range salt {
				salt[i] = byte(rng.Uint32())
			}
			want := make([]byte, SealedSize(int64(size)))
			if err := s.sealWith(want, name, [][]byte{body}, salt); err != nil {
				t.Fatal(err)
			}
			fp := new(framedPut)
			crc, plain := s.frame(fp, name, pieces, salt)
			got := store.Join(fp.pieces)
			if !bytes.Equal(got, want) {
				t.Fatalf("%d bytes in %d pieces: framed form differs from the sealed one", size, len(pieces))
			}
			if crc != crc32c.Checksum(want) {
				t.Fatalf("%d bytes in %d pieces: checksum %08x, stored bytes have %08x", size, len(pieces), crc, crc32c.Checksum(want))
			}
			if plain != crc32c.Checksum(body) {
				t.Fatalf("%d bytes in %d pieces: plaintext checksum %08x, body has %08x", size, len(pieces), plain, crc32c.Checksum(body))
			}
			// Nothing is copied: every piece is the caller's memory or
			// the framing's.
			for _, p := range fp.pieces {
				if !within(p, body) && !within(p, fp.frame) {
					t.Fatalf("%d bytes in %d pieces: a piece of %d bytes is a copy", size, len(pieces), len(p))
				}
			}
		}
	}
}

// within reports whether p lies in b's memory.
func within(p, b []byte) bool {
	if len(p) == 0 || len(b) == 0 {
		return false
	}
	start := uintptr(unsafe.Pointer(&b[0]))
	at := uintptr(unsafe.Pointer(&p[0]))
	return at >= start && at+uintptr(len(p)) <= start+uintptr(len(b))
}

// TestFramedPutVerifiedByMinIO: a checksum-only object put from pieces
// reaches MinIO with the payload checksum combined while framing, which
// MinIO verifies, and reads back whole.
func TestFramedPutVerifiedByMinIO(t *testing.T) {
	ctx := context.Background()
	srv := minio.Start(t)
	o := srv.Options(t, srv.Bucket(t))
	o.PayloadChecksum = s3.PayloadCRC32C
	raw := srv.StoreWith(t, o)
	if mode, err := raw.ProbePayloadChecksum(ctx, "payload-probe"); err != nil || mode != s3.PayloadCRC32C {
		t.Fatalf("payload mode %q (%v), want crc32c", mode, err)
	}
	s := newChecksummed(t, raw)
	body := make([]byte, 1<<20+5000)
	for i := range body {
		body[i] = byte(i*7 + i>>12)
	}
	pieces := [][]byte{body[:32<<10], body[32<<10 : 96<<10], body[96<<10 : 96<<10+100], body[96<<10+100:]}
	name := store.DataName(9)
	if err := s.PutV(ctx, name, pieces, true); err != nil {
		t.Fatalf("PutV: %v", err)
	}
	got := make([]byte, len(body))
	if n, err := s.GetRange(ctx, name, 0, got); err != nil || n != len(body) || !bytes.Equal(got, body) {
		t.Fatalf("read back %d bytes (%v), equal %v", n, err, bytes.Equal(got[:n], body[:n]))
	}
}

// TestFramedPutRefusesChangedData: a body whose bytes no longer match the
// checksum taken when they came in (damaged in memory on the way) is
// refused with ErrCorrupt and nothing is stored, whether given in pieces
// or whole; a body that matches is stored.
func TestFramedPutRefusesChangedData(t *testing.T) {
	ctx := context.Background()
	srv := minio.Start(t)
	raw := srv.Store(t, srv.Bucket(t))
	s := newChecksummed(t, raw)
	body := make([]byte, 256<<10+123)
	for i := range body {
		body[i] = byte(i*13 + i>>9)
	}
	pieces := [][]byte{body[:1000], body[1000 : 64<<10], body[64<<10:]}
	crc := crc32c.Checksum(body)

	ok := store.DataName(1)
	if err := s.PutV(store.WithPiecesCRC32C(ctx, pieces, crc), ok, pieces, true); err != nil {
		t.Fatalf("PutV with the right checksum: %v", err)
	}
	got := make([]byte, len(body))
	if n, err := s.GetRange(ctx, ok, 0, got); err != nil || n != len(body) || !bytes.Equal(got, body) {
		t.Fatalf("read back %d bytes (%v)", n, err)
	}

	for _, at := range []int{0, 999, 1000, 70000, len(body) - 1} {
		damaged := bytes.Clone(body)
		damaged[at] ^= 0x10
		dp := [][]byte{damaged[:1000], damaged[1000 : 64<<10], damaged[64<<10:]}
		name := store.DataName(int64(100 + at))
		err := s.PutV(store.WithPiecesCRC32C(ctx, dp, crc), name, dp, true)
		if !errors.Is(err, store.ErrCorrupt) {
			t.Fatalf("byte %d changed after its checksum was taken: PutV returned %v, want ErrCorrupt", at, err)
		}
		if _, err := raw.Size(ctx, name); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("byte %d changed: the object was stored anyway (size: %v)", at, err)
		}
		// Put (one slice, its checksum from WithBodyCRC32C) takes the
		// same path.
		err = s.Put(store.WithBodyCRC32C(ctx, damaged, crc), name, damaged, true)
		if !errors.Is(err, store.ErrCorrupt) {
			t.Fatalf("byte %d changed: Put returned %v, want ErrCorrupt", at, err)
		}
		if _, err := raw.Size(ctx, name); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("byte %d changed: Put stored the object anyway (size: %v)", at, err)
		}
	}
}
