package sealed

import (
	"bytes"
	"context"
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
