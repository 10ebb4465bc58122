package sealed

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
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
