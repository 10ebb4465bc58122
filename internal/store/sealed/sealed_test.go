package sealed

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/chacha20poly1305"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/storetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

var (
	testKey  = bytes.Repeat([]byte{7}, 32)
	testSeal = bytes.Repeat([]byte{9}, 16)
)

// framing builds the store newSealed returns: AES-GCM sealing, or the
// checksum-only framing while TestChecksumFramingDamage runs the damage
// tests over it.
var framing = func(inner store.Store, seal []byte) (*Store, error) { return New(inner, testKey, seal) }

func newSealed(t testing.TB, inner store.Store, seal []byte) *Store {
	t.Helper()
	s, err := framing(inner, seal)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConformanceMem(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return newSealed(t, mem.New(), testSeal) })
}

func TestConformanceMinIO(t *testing.T) {
	srv := minio.Start(t)
	storetest.Run(t, func(t *testing.T) store.Store {
		return newSealed(t, srv.Store(t, srv.Bucket(t)), testSeal)
	})
}

func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func rawBytes(t *testing.T, st store.Store, name string) []byte {
	t.Helper()
	ctx := context.Background()
	n, err := st.Size(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, n)
	if _, err := st.GetRange(ctx, name, 0, b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSizesAndOverhead(t *testing.T) {
	for _, n := range []int64{0, 1, 4095, 4096, 4097, 8192, 4 << 20, 4<<20 + 32<<10 + 5} {
		stored := SealedSize(n)
		got, ok := PlainSize(stored)
		if !ok || got != n {
			t.Errorf("PlainSize(SealedSize(%d) = %d) = %d, %v", n, stored, got, ok)
		}
	}
	for _, bad := range []int64{0, 1, 31, storedSize + 31} {
		if _, ok := PlainSize(bad); ok {
			t.Errorf("PlainSize(%d) accepted a size no sealed object has", bad)
		}
	}
	// The stored object really has the computed size.
	inner := mem.New()
	s := newSealed(t, inner, testSeal)
	ctx := context.Background()
	body := pattern(3*SegmentSize+100, 1)
	if err := s.Put(ctx, "o", body, false); err != nil {
		t.Fatal(err)
	}
	if n, _ := inner.Size(ctx, "o"); n != int64(len(body))+4*Overhead {
		t.Fatalf("stored %d bytes for %d, want %d", n, len(body), len(body)+4*Overhead)
	}
}

// The plaintext appears nowhere in what is stored.
func TestNoPlaintextStored(t *testing.T) {
	inner := mem.New()
	s := newSealed(t, inner, testSeal)
	ctx := context.Background()
	body := pattern(8*SegmentSize, 2)
	if err := s.Put(ctx, "00000000/00000000", body, false); err != nil {
		t.Fatal(err)
	}
	raw := rawBytes(t, inner, "00000000/00000000")
	for i := 0; i+16 <= len(body); i += 512 {
		if bytes.Contains(raw, body[i:i+16]) {
			t.Fatalf("16 plaintext bytes at %d appear in the stored object", i)
		}
	}
}

// A flipped byte anywhere gives ErrCorrupt on a read of its segment, and
// the read returns no bytes; other segments still read correctly.
func TestFlippedByte(t *testing.T) {
	ctx := context.Background()
	inner := mem.New()
	s := newSealed(t, inner, testSeal)
	body := pattern(3*SegmentSize+1000, 3)
	if err := s.Put(ctx, "obj", body, false); err != nil {
		t.Fatal(err)
	}
	orig := rawBytes(t, inner, "obj")
	buf := make([]byte, SegmentSize)
	step := 1
	if testing.Short() {
		step = 13
	}
	for pos := 0; pos < len(orig); pos += step {
		bad := bytes.Clone(orig)
		bad[pos] ^= 0x40
		if err := inner.Put(ctx, "obj", bad, false); err != nil {
			t.Fatal(err)
		}
		seg := int64(pos / storedSize)
		clear(buf)
		n, err := s.GetRange(ctx, "obj", seg*SegmentSize, buf)
		if !errors.Is(err, store.ErrCorrupt) || n != 0 {
			t.Fatalf("flip at stored byte %d (segment %d): n=%d err=%v, want 0 and ErrCorrupt", pos, seg, n, err)
		}
		// A 1-byte read inside the segment fails too.
		if _, err := s.GetRange(ctx, "obj", seg*SegmentSize+17, buf[:1]); !errors.Is(err, store.ErrCorrupt) {
			t.Fatalf("flip at %d: small read err=%v, want ErrCorrupt", pos, err)
		}
		other := (seg + 1) % 4
		n, err = s.GetRange(ctx, "obj", other*SegmentSize, buf)
		want := body[other*SegmentSize : min(int64(len(body)), (other+1)*SegmentSize)]
		if err != nil || !bytes.Equal(buf[:n], want) {
			t.Fatalf("flip at %d in segment %d broke segment %d: n=%d err=%v", pos, seg, other, n, err)
		}
	}
}

func TestSegmentMovedOrReplayed(t *testing.T) {
	ctx := context.Background()
	inner := mem.New()
	s := newSealed(t, inner, testSeal)
	a, b := pattern(4*SegmentSize, 4), pattern(4*SegmentSize, 5)
	for name, body := range map[string][]byte{"a": a, "b": b} {
		if err := s.Put(ctx, name, body, false); err != nil {
			t.Fatal(err)
		}
	}
	ra, rb := rawBytes(t, inner, "a"), rawBytes(t, inner, "b")
	segOf := func(raw []byte, i int) []byte { return raw[i*storedSize : (i+1)*storedSize] }
	check := func(what, name string, raw []byte, seg int64) {
		t.Helper()
		if err := inner.Put(ctx, name, raw, false); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, SegmentSize)
		n, err := s.GetRange(ctx, name, seg*SegmentSize, buf)
		if !errors.Is(err, store.ErrCorrupt) || n != 0 {
			t.Errorf("%s: n=%d err=%v, want ErrCorrupt", what, n, err)
		}
	}
	// Segment 1 of a put in place of segment 1 of b (another name).
	x := bytes.Clone(rb)
	copy(segOf(x, 1), segOf(ra, 1))
	check("segment from another object", "x", x, 1)
	// Segments 1 and 2 of a swapped (another offset).
	y := bytes.Clone(ra)
	copy(segOf(y, 1), segOf(ra, 2))
	copy(segOf(y, 2), segOf(ra, 1))
	check("segments swapped", "y", y, 1)
	check("segments swapped", "y", y, 2)
	// The whole object a copied under another name.
	check("object renamed", "z", ra, 0)
	// The object a read by another volume (other seal id, same key).
	other := newSealed(t, inner, bytes.Repeat([]byte{1}, 16))
	if _, err := other.GetRange(ctx, "a", 0, make([]byte, 10)); !errors.Is(err, store.ErrCorrupt) {
		t.Errorf("object of another volume: err=%v, want ErrCorrupt", err)
	}
	// A segment of an older write of the same name, read together with
	// the new write's segments.
	if err := s.Put(ctx, "a", b, false); err != nil {
		t.Fatal(err)
	}
	mixed := rawBytes(t, inner, "a")
	copy(segOf(mixed, 2), segOf(ra, 2))
	if err := inner.Put(ctx, "a", mixed, false); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetRange(ctx, "a", 0, make([]byte, 4*SegmentSize)); !errors.Is(err, store.ErrCorrupt) {
		t.Errorf("segments of two writes mixed: err=%v, want ErrCorrupt", err)
	}
}

func TestTruncated(t *testing.T) {
	ctx := context.Background()
	inner := mem.New()
	s := newSealed(t, inner, testSeal)
	for _, size := range []int{4 * SegmentSize, 4*SegmentSize - 100} {
		body := pattern(size, 6)
		if err := s.Put(ctx, "o", body, false); err != nil {
			t.Fatal(err)
		}
		raw := rawBytes(t, inner, "o")
		for k := 1; k*storedSize < len(raw); k++ {
			if err := inner.Put(ctx, "o", raw[:k*storedSize], false); err != nil {
				t.Fatal(err)
			}
			n, err := s.Size(ctx, "o")
			if err != nil || n != int64(k*SegmentSize) {
				t.Fatalf("truncated to %d segments: Size = %d, %v", k, n, err)
			}
			// Any read that reaches the (new) end fails.
			for _, r := range []struct{ off, n int64 }{{0, n}, {n - 1, 1}, {0, int64(size)}, {n, 10}, {n + 3*SegmentSize, 10}} {
				got, err := s.GetRange(ctx, "o", r.off, make([]byte, r.n))
				if !errors.Is(err, store.ErrCorrupt) {
					t.Errorf("size %d truncated to %d segments: read [%d,+%d) = %d, %v; want ErrCorrupt", size, k, r.off, r.n, got, err)
				}
			}
			// A read whose segments stay before the end still works
			// (with one segment left, segment 0 is the end).
			buf := make([]byte, 100)
			if k == 1 {
				continue
			}
			if got, err := s.GetRange(ctx, "o", 0, buf); err != nil || got != 100 || !bytes.Equal(buf, body[:100]) {
				t.Errorf("read before the cut: %d, %v", got, err)
			}
		}
		// Cut inside the salt of a segment: the size itself is impossible.
		if err := inner.Put(ctx, "o", raw[:storedSize+10], false); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Size(ctx, "o"); !errors.Is(err, store.ErrCorrupt) {
			t.Errorf("cut inside a segment header: Size err=%v, want ErrCorrupt", err)
		}
		// Under a data name, List lists the whole segments (reads past
		// them fail); under a name that is not bs3's it lists the
		// object as it is.
		if err := s.List(ctx, "", func(string, int64) error { return nil }); err != nil {
			t.Errorf("List with a foreign object of odd size: %v", err)
		}
		if err := inner.Put(ctx, store.DataName(1), raw[:storedSize+10], false); err != nil {
			t.Fatal(err)
		}
		listed := int64(-1)
		if err := s.List(ctx, "", func(name string, size int64) error {
			if name == store.DataName(1) {
				listed = size
			}
			return nil
		}); err != nil || listed != SegmentSize {
			t.Errorf("data object cut inside a segment header: List err=%v size %d, want it listed with %d bytes (its whole segments)", err, listed, SegmentSize)
		}
		if _, err := s.GetRange(ctx, store.DataName(1), 0, make([]byte, SegmentSize+1)); !errors.Is(err, store.ErrCorrupt) {
			t.Errorf("data object cut inside a segment header: a read up to the cut: err=%v, want ErrCorrupt", err)
		}
		// Cut inside the first segment (or to nothing): listed as 1 byte,
		// so it is not taken for an empty placeholder, and unreadable.
		for _, cut := range []int{0, 10} {
			if err := inner.Put(ctx, store.DataName(1), raw[:cut], false); err != nil {
				t.Fatal(err)
			}
			listed = -1
			if err := s.List(ctx, "", func(name string, size int64) error {
				if name == store.DataName(1) {
					listed = size
				}
				return nil
			}); err != nil || listed != 1 {
				t.Errorf("data object cut to %d stored bytes: List err=%v size %d, want 1", cut, err, listed)
			}
			if _, err := s.GetRange(ctx, store.DataName(1), 0, make([]byte, 1)); !errors.Is(err, store.ErrCorrupt) {
				t.Errorf("data object cut to %d stored bytes: read err=%v, want ErrCorrupt", cut, err)
			}
		}
		if err := inner.Delete(ctx, store.DataName(1)); err != nil {
			t.Fatal(err)
		}
		if _, err := s.GetRange(ctx, "o", SegmentSize, make([]byte, 10)); !errors.Is(err, store.ErrCorrupt) {
			t.Errorf("cut inside a segment header: read err=%v, want ErrCorrupt", err)
		}
	}
	// Zero stored bytes is damage, not an empty object.
	if err := inner.Put(ctx, "e", nil, false); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetRange(ctx, "e", 0, make([]byte, 10)); !errors.Is(err, store.ErrCorrupt) {
		t.Errorf("zero stored bytes: err=%v, want ErrCorrupt", err)
	}
	if _, err := s.Size(ctx, "e"); !errors.Is(err, store.ErrCorrupt) {
		t.Errorf("zero stored bytes: Size err=%v, want ErrCorrupt", err)
	}
}

// The control objects stay readable without the key; everything else is
// sealed.
func TestClearNames(t *testing.T) {
	ctx := context.Background()
	inner := mem.New()
	s := newSealed(t, inner, testSeal)
	for _, name := range []string{store.SuperblockName, store.LeaseName, store.AttachName(3)} {
		if err := s.Put(ctx, name, []byte(`{"x":1}`), false); err != nil {
			t.Fatal(err)
		}
		if got := rawBytes(t, inner, name); string(got) != `{"x":1}` {
			t.Errorf("%s stored as %q, want it in the clear", name, got)
		}
	}
	for _, name := range []string{store.DataName(5), store.CheckpointName(7), "something-else"} {
		if err := s.Put(ctx, name, []byte(`{"x":1}`), false); err != nil {
			t.Fatal(err)
		}
		if got := rawBytes(t, inner, name); bytes.Contains(got, []byte(`{"x":1}`)) {
			t.Errorf("%s stored in the clear", name)
		}
	}
}

// xchachaSuite is the alternative the lead's design offered:
// XChaCha20-Poly1305 under the data key, nonce = salt || segment index.
// It lives here only to be measured against aesSuite.
type xchachaSuite struct{ key []byte }

func (s xchachaSuite) aead([]byte) (cipher.AEAD, error) { return chacha20poly1305.NewX(s.key) }

func (xchachaSuite) nonce(n []byte, salt []byte, i uint64) []byte {
	n = append(n[:0], salt...)
	return binary.BigEndian.AppendUint64(n, i)
}

func suites() map[string]suite {
	return map[string]suite{
		"aes-gcm-hkdf":      aesSuite{dataKey: testKey},
		"xchacha20poly1305": xchachaSuite{key: testKey},
	}
}

// The alternative suite is a working format too (so the benchmark
// compares like with like).
func TestXChaChaSuiteRoundTrip(t *testing.T) {
	s, err := newWithSuite(mem.New(), xchachaSuite{key: testKey}, testSeal)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	body := pattern(3*SegmentSize+5, 7)
	if err := s.Put(ctx, "o", body, false); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(body))
	if n, err := s.GetRange(ctx, "o", 0, buf); err != nil || n != len(body) || !bytes.Equal(buf, body) {
		t.Fatalf("round trip: %d, %v", n, err)
	}
}

// nullStore keeps one object without copying, so the benchmarks measure
// sealing and opening rather than the store.
type nullStore struct {
	store.Store
	body    []byte
	discard bool // Put keeps nothing (the Seal benchmark)
}

func (n *nullStore) Put(_ context.Context, _ string, body []byte, _ bool) error {
	if !n.discard {
		n.body = append(n.body[:0], body...)
	}
	return nil
}

func (n *nullStore) GetRange(_ context.Context, _ string, off int64, buf []byte) (int, error) {
	if off >= int64(len(n.body)) {
		return 0, nil
	}
	return copy(buf, n.body[off:]), nil
}

// cpuSeconds is the process's user+system CPU time: on a shared machine
// it is a truer cost than wall time.
func cpuSeconds(b *testing.B) float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// BenchmarkSeal and BenchmarkOpen report CPU-seconds (getrusage) per GiB
// of plaintext for a 4 MiB chunk, and for Open also a 4 KiB random read.
func BenchmarkSeal(b *testing.B) {
	body := pattern(4<<20, 8)
	for name, su := range suites() {
		b.Run(name, func(b *testing.B) {
			s, err := newWithSuite(&nullStore{discard: true}, su, testSeal)
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			b.SetBytes(int64(len(body)))
			cpu0 := cpuSeconds(b)
			for b.Loop() {
				if err := s.Put(ctx, "00000000/00000000", body, false); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric((cpuSeconds(b)-cpu0)/float64(b.N)/float64(len(body))*(1<<30), "cpu-s/GiB")
		})
	}
}

func BenchmarkOpen(b *testing.B) {
	body := pattern(4<<20, 9)
	for name, su := range suites() {
		for _, size := range []int{4 << 20, 4096} {
			b.Run(fmt.Sprintf("%s/%d", name, size), func(b *testing.B) {
				ns := &nullStore{}
				s, err := newWithSuite(ns, su, testSeal)
				if err != nil {
					b.Fatal(err)
				}
				ctx := context.Background()
				if err := s.Put(ctx, "00000000/00000000", body, false); err != nil {
					b.Fatal(err)
				}
				buf := make([]byte, size)
				r := rand.New(rand.NewPCG(1, 2))
				b.SetBytes(int64(size))
				cpu0 := cpuSeconds(b)
				for b.Loop() {
					off := int64(r.IntN(len(body)/size) * size)
					if _, err := s.GetRange(ctx, "00000000/00000000", off, buf); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric((cpuSeconds(b)-cpu0)/float64(b.N)/float64(size)*(1<<30), "cpu-s/GiB")
			})
		}
	}
}

// BenchmarkRawAEAD is the floor: the bare AEAD over 4 KiB segments of a
// 4 MiB buffer, without the store layer, in the same units.
func BenchmarkRawAEAD(b *testing.B) {
	body := pattern(4<<20, 10)
	out := make([]byte, 0, SealedSize(int64(len(body))))
	for name, su := range suites() {
		b.Run(name, func(b *testing.B) {
			a, err := su.aead(testSeal)
			if err != nil {
				b.Fatal(err)
			}
			var nb [24]byte
			b.SetBytes(int64(len(body)))
			cpu0 := cpuSeconds(b)
			for b.Loop() {
				out = out[:0]
				for i := 0; i < len(body); i += SegmentSize {
					out = a.Seal(out, su.nonce(nb[:], testSeal, uint64(i)), body[i:i+SegmentSize], testSeal)
				}
			}
			b.ReportMetric((cpuSeconds(b)-cpu0)/float64(b.N)/float64(len(body))*(1<<30), "cpu-s/GiB")
		})
	}
}

// BenchmarkAEADFloor is the floor under any segment format: bare
// AES-256-GCM Seal and Open (one key, no HKDF, no associated data beyond
// what a segment carries, output buffer reused) over 4 MiB cut into
// segments of 4 KiB (the format), 64 KiB and 4 MiB, in cpu-s/GiB.
func BenchmarkAEADFloor(b *testing.B) {
	body := pattern(4<<20, 11)
	a, err := aesSuite{dataKey: testKey}.aead(testSeal)
	if err != nil {
		b.Fatal(err)
	}
	ad := make([]byte, len(adPrefix)+16+9+len("00000000/00000000"))
	for _, seg := range []int{4 << 10, 64 << 10, 4 << 20} {
		out := make([]byte, 0, len(body)+len(body)/seg*Overhead)
		var nonce [12]byte
		b.Run(fmt.Sprintf("seal/%d", seg), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			cpu0 := cpuSeconds(b)
			for b.Loop() {
				out = out[:0]
				for i := 0; i < len(body); i += seg {
					out = a.Seal(out, nonce[:], body[i:i+seg], ad)
				}
			}
			b.ReportMetric((cpuSeconds(b)-cpu0)/float64(b.N)/float64(len(body))*(1<<30), "cpu-s/GiB")
		})
		sealedBody := append([]byte(nil), out...)
		if len(sealedBody) == 0 {
			for i := 0; i < len(body); i += seg {
				sealedBody = a.Seal(sealedBody, nonce[:], body[i:i+seg], ad)
			}
		}
		plain := make([]byte, 0, len(body))
		b.Run(fmt.Sprintf("open/%d", seg), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			cpu0 := cpuSeconds(b)
			for b.Loop() {
				plain = plain[:0]
				for i := 0; i < len(sealedBody); i += seg + tagSize {
					if plain, err = a.Open(plain, nonce[:], sealedBody[i:i+seg+tagSize], ad); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric((cpuSeconds(b)-cpu0)/float64(b.N)/float64(len(body))*(1<<30), "cpu-s/GiB")
		})
	}
	// AES-128-GCM (10 rounds instead of 14) for comparison only: not a
	// format bs3 writes.
	blk, err := aes.NewCipher(testKey[:16])
	if err != nil {
		b.Fatal(err)
	}
	a128, err := cipher.NewGCM(blk)
	if err != nil {
		b.Fatal(err)
	}
	out := make([]byte, 0, SealedSize(int64(len(body))))
	b.Run("seal-aes128/4096", func(b *testing.B) {
		var nonce [12]byte
		b.SetBytes(int64(len(body)))
		cpu0 := cpuSeconds(b)
		for b.Loop() {
			out = out[:0]
			for i := 0; i < len(body); i += SegmentSize {
				out = a128.Seal(out, nonce[:], body[i:i+SegmentSize], ad)
			}
		}
		b.ReportMetric((cpuSeconds(b)-cpu0)/float64(b.N)/float64(len(body))*(1<<30), "cpu-s/GiB")
	})
}
