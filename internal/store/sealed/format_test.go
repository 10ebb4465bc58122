package sealed

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"testing"

	"github.com/bs3/bs3/internal/store/mem"
)

// refSegmentAEAD and refAD rebuild the on-bucket format of
// docs/ARCHITECTURE.md §16.1 from the documentation alone, without this
// package's helpers, so that a change to the seal or open path that would
// make existing volumes unreadable fails here.
func refSegmentAEAD(t *testing.T, dataKey, salt []byte) cipher.AEAD {
	t.Helper()
	sub, err := hkdf.Key(sha256.New, dataKey, salt, "bs3 object v1", 32)
	if err != nil {
		t.Fatal(err)
	}
	b, err := aes.NewCipher(sub)
	if err != nil {
		t.Fatal(err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func refAD(seal []byte, name string, i uint64, final bool) []byte {
	ad := append([]byte("bs3seal1"), seal...)
	ad = binary.BigEndian.AppendUint64(ad, i)
	if final {
		ad = append(ad, 1)
	} else {
		ad = append(ad, 0)
	}
	return append(ad, name...)
}

func refNonce(i uint64) []byte {
	n := make([]byte, 12)
	binary.BigEndian.PutUint64(n[4:], i)
	return n
}

// TestFormatReference: what Put stores opens segment by segment with the
// reference construction, and an object sealed by the reference reads
// back through GetRange, for sizes around segment boundaries.
func TestFormatReference(t *testing.T) {
	ctx := context.Background()
	const name = "0000002a/00000000"
	for _, size := range []int{0, 1, SegmentSize - 1, SegmentSize, SegmentSize + 1, 5*SegmentSize + 77} {
		inner := mem.New()
		s := newSealed(t, inner, testSeal)
		body := pattern(size, uint64(size))
		if err := s.Put(ctx, name, body, false); err != nil {
			t.Fatal(err)
		}
		stored := make([]byte, SealedSize(int64(size))+1)
		n, err := inner.GetRange(ctx, name, 0, stored)
		if err != nil || int64(n) != SealedSize(int64(size)) {
			t.Fatalf("size %d: stored %d bytes (%v), want %d", size, n, err, SealedSize(int64(size)))
		}
		stored = stored[:n]
		segs := max(1, (size+SegmentSize-1)/SegmentSize)
		var got []byte
		for i := range segs {
			seg := stored[i*storedSize : min((i+1)*storedSize, len(stored))]
			g := refSegmentAEAD(t, testKey, seg[:saltSize])
			p, err := g.Open(nil, refNonce(uint64(i)), seg[saltSize:], refAD(testSeal, name, uint64(i), i == segs-1))
			if err != nil {
				t.Fatalf("size %d: segment %d does not open with the reference format: %v", size, i, err)
			}
			got = append(got, p...)
		}
		if !bytes.Equal(got, body) {
			t.Fatalf("size %d: reference open differs from what was put", size)
		}

		// The reverse: an object sealed by the reference reads back.
		salt := bytes.Repeat([]byte{0x5c}, saltSize)
		g := refSegmentAEAD(t, testKey, salt)
		var ref []byte
		for i := range segs {
			ref = append(ref, salt...)
			ref = g.Seal(ref, refNonce(uint64(i)), body[i*SegmentSize:min((i+1)*SegmentSize, size)], refAD(testSeal, name, uint64(i), i == segs-1))
		}
		if err := inner.Put(ctx, name, ref, false); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, size)
		if n, err := s.GetRange(ctx, name, 0, buf); err != nil || n != size || !bytes.Equal(buf, body) {
			t.Fatalf("size %d: reference-sealed object read back %d bytes, err %v, equal %v", size, n, err, bytes.Equal(buf[:n], body))
		}
	}
}
