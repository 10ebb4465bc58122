package compressed

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/store/storetest"
	"github.com/bs3/bs3/internal/testutil/minio"
	"github.com/bs3/bs3/internal/testutil/textlike"
)

// textLike is the text-like data of the ratio target.
func textLike(seed uint64, n int) []byte { return textlike.Bytes(seed, n) }

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func newStore(t testing.TB, inner store.Store, o Options) *Store {
	t.Helper()
	s, err := New(inner, o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func put(t testing.TB, s store.Store, name string, body []byte) {
	t.Helper()
	if err := s.Put(context.Background(), name, body, false); err != nil {
		t.Fatalf("put %s: %v", name, err)
	}
}

func whole(t testing.TB, s store.Store, name string) []byte {
	t.Helper()
	n, err := s.Size(context.Background(), name)
	if err != nil {
		t.Fatalf("size %s: %v", name, err)
	}
	buf := make([]byte, n+10)
	m, err := s.GetRange(context.Background(), name, 0, buf)
	if err != nil {
		t.Fatalf("read %s: %v", name, err)
	}
	if int64(m) != n {
		t.Fatalf("read %s: %d bytes, Size says %d", name, m, n)
	}
	return buf[:m]
}

func TestConformanceMem(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return newStore(t, mem.New(), Options{Codec: "zstd"}) })
}

// TestConformanceFramedMem runs the suite with every object framed (the
// suite writes random bytes, which would otherwise be stored raw).
func TestConformanceFramedMem(t *testing.T) {
	for _, c := range []string{"none", "zstd", "lz4", "s2"} {
		t.Run(c, func(t *testing.T) {
			storetest.RunWith(t, func(t *testing.T) store.Store {
				return newStore(t, mem.New(), Options{Codec: c, SegmentSize: 4096, frameAll: true})
			}, storetest.Options{StoredListSizes: true})
		})
	}
}

func TestConformanceMinIO(t *testing.T) {
	srv := minio.Start(t)
	storetest.Run(t, func(t *testing.T) store.Store {
		return newStore(t, srv.Store(t, srv.Bucket(t)), Options{Codec: "zstd"})
	})
	t.Run("framed", func(t *testing.T) {
		storetest.RunWith(t, func(t *testing.T) store.Store {
			return newStore(t, srv.Store(t, srv.Bucket(t)), Options{Codec: "zstd", SegmentSize: 4096, frameAll: true})
		}, storetest.Options{StoredListSizes: true})
	})
}

// mixedBody alternates compressible and incompressible stretches, so
// that some segments are compressed and others raw.
func mixedBody(n, seg int) []byte {
	b := textLike(1, n)
	for s := seg; s < n; s += 3 * seg {
		copy(b[s:min(n, s+seg)], randBytes(uint64(s), seg))
	}
	return b
}

// TestRangesAtBoundaries reads every range starting and ending at or
// next to a segment boundary, and the object's end, for every codec.
func TestRangesAtBoundaries(t *testing.T) {
	const seg = 4096
	size := 5*seg + 123
	body := mixedBody(size, seg)
	for _, c := range []string{"none", "zstd", "lz4", "s2"} {
		t.Run(c, func(t *testing.T) {
			inner := mem.New()
			s := newStore(t, inner, Options{Codec: c, SegmentSize: seg, frameAll: true})
			put(t, s, "obj", body)
			ctx := context.Background()
			var points []int64
			for b := int64(0); b <= int64(size)+seg; b += seg {
				points = append(points, b-1, b, b+1)
			}
			points = append(points, int64(size)-1, int64(size), int64(size)+1)
			for _, off := range points {
				if off < 0 {
					continue
				}
				for _, end := range points {
					if end <= off {
						continue
					}
					buf := bytes.Repeat([]byte{0xEE}, int(end-off))
					n, err := s.GetRange(ctx, "obj", off, buf)
					if err != nil {
						t.Fatalf("GetRange(%d, %d): %v", off, end-off, err)
					}
					want := body[min(int64(size), off):min(int64(size), end)]
					if n != len(want) || !bytes.Equal(buf[:n], want) {
						t.Fatalf("GetRange(%d, %d) = %d bytes, want %d (equal: %v)", off, end-off, n, len(want), bytes.Equal(buf[:n], want))
					}
					for i := n; i < len(buf); i++ {
						if buf[i] != 0xEE {
							t.Fatalf("GetRange(%d, %d) wrote past its %d bytes", off, end-off, n)
						}
					}
				}
			}
			if got := whole(t, s, "obj"); !bytes.Equal(got, body) {
				t.Fatal("whole object differs")
			}
		})
	}
}

func storedBytes(t testing.TB, inner store.Store, name string) []byte {
	t.Helper()
	return whole(t, inner, name)
}

func TestIncompressibleStoredRaw(t *testing.T) {
	inner := mem.New()
	s := newStore(t, inner, Options{Codec: "zstd"})
	body := randBytes(3, 300000)
	put(t, s, store.DataName(1), body)
	if got := storedBytes(t, inner, store.DataName(1)); !bytes.Equal(got, body) {
		t.Fatalf("an incompressible object was not stored as it is (%d stored bytes for %d)", len(got), len(body))
	}
	if got := whole(t, s, store.DataName(1)); !bytes.Equal(got, body) {
		t.Fatal("read back differs")
	}
	// Mixed: the random segments are flagged raw, the text ones shrink.
	body = mixedBody(8*DefaultSegmentSize, DefaultSegmentSize)
	put(t, s, store.DataName(2), body)
	st := storedBytes(t, inner, store.DataName(2))
	ix, err := parseIndex(st)
	if err != nil {
		t.Fatal(err)
	}
	raws := 0
	for i, r := range ix.rawSeg {
		wantRaw := i%3 == 1
		if r != wantRaw {
			t.Errorf("segment %d raw = %v, want %v", i, r, wantRaw)
		}
		if r {
			raws++
		}
	}
	if raws == 0 || raws == ix.segments() {
		t.Fatalf("%d of %d segments raw", raws, ix.segments())
	}
	if got := whole(t, s, store.DataName(2)); !bytes.Equal(got, body) {
		t.Fatal("mixed object read back differs")
	}
	if n, err := s.Size(context.Background(), store.DataName(2)); err != nil || n != int64(len(body)) {
		t.Fatalf("Size = %d, %v; want %d", n, err, len(body))
	}
}

// TestMagicBodyAlwaysFramed: a body that starts like a compressed object
// is framed even with codec "none", so it is read back as it was.
func TestMagicBodyAlwaysFramed(t *testing.T) {
	inner := mem.New()
	s := newStore(t, inner, Options{Codec: "none"})
	body := append([]byte(magic), randBytes(4, 100)...)
	put(t, s, "x", body)
	if got := storedBytes(t, inner, "x"); bytes.Equal(got, body) {
		t.Fatal("a body starting with the magic was stored as it is")
	}
	if got := whole(t, s, "x"); !bytes.Equal(got, body) {
		t.Fatal("read back differs")
	}
	// A fresh store (no cached index) reads it too.
	if got := whole(t, newStore(t, inner, Options{}), "x"); !bytes.Equal(got, body) {
		t.Fatal("read back through a fresh store differs")
	}
}

// TestMixedCodecs: objects written with every codec, and one written
// before compression (no header), read through a store configured with
// another codec.
func TestMixedCodecs(t *testing.T) {
	inner := mem.New()
	bodies := map[string][]byte{}
	for i, c := range []string{"none", "zstd", "lz4", "s2"} {
		s := newStore(t, inner, Options{Codec: c, Level: Levels[i]})
		name := store.DataName(int64(i))
		bodies[name] = textLike(uint64(i), 200000+i)
		put(t, s, name, bodies[name])
	}
	legacy := store.DataName(99)
	bodies[legacy] = textLike(99, 70000)
	put(t, inner, legacy, bodies[legacy])
	for _, c := range []string{"none", "s2"} {
		s := newStore(t, inner, Options{Codec: c})
		for name, want := range bodies {
			if got := whole(t, s, name); !bytes.Equal(got, want) {
				t.Errorf("codec %s store: %s differs", c, name)
			}
			buf := make([]byte, 5000)
			if n, err := s.GetRange(context.Background(), name, 65000, buf); err != nil || !bytes.Equal(buf[:n], want[65000:65000+n]) || n != 5000 {
				t.Errorf("codec %s store: range of %s: %d, %v", c, name, n, err)
			}
		}
	}
}

// TestMarker: without the marker reads go straight through; the first
// compressed object writes it first; a new Open finds it.
func TestMarker(t *testing.T) {
	ctx := context.Background()
	inner := mem.New()
	s, err := Open(ctx, inner, Options{Codec: "zstd"})
	if err != nil {
		t.Fatal(err)
	}
	if s.framed.Load() {
		t.Fatal("a store without marker looks for headers")
	}
	put(t, s, "r", randBytes(1, 1000)) // raw: no marker needed
	if _, err := inner.Size(ctx, MarkerName); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("marker written for a raw object: %v", err)
	}
	body := textLike(2, 100000)
	put(t, s, store.DataName(3), body)
	if _, err := inner.Size(ctx, MarkerName); err != nil {
		t.Fatalf("no marker after a compressed object: %v", err)
	}
	if !s.framed.Load() {
		t.Fatal("store does not look for headers after writing one")
	}
	if got := whole(t, s, store.DataName(3)); !bytes.Equal(got, body) {
		t.Fatal("read back differs")
	}
	s2, err := Open(ctx, inner, Options{Codec: "none"})
	if err != nil {
		t.Fatal(err)
	}
	if got := whole(t, s2, store.DataName(3)); !bytes.Equal(got, body) {
		t.Fatal("read back through a second Open differs")
	}
	var listed []string
	if err := s2.List(ctx, "", func(name string, _ int64) error { listed = append(listed, name); return nil }); err != nil {
		t.Fatal(err)
	}
	if strings.Join(listed, ",") != store.DataName(3)+",r" {
		t.Fatalf("List = %q; the marker must not be listed", listed)
	}
}

// damage rewrites one stored byte of name in inner.
func damage(t *testing.T, inner store.Store, name string, at int) {
	t.Helper()
	b := storedBytes(t, inner, name)
	b[at] ^= 0x40
	put(t, inner, name, b)
}

// TestDamageIsCorrupt: a flipped byte anywhere in a compressed object,
// or a truncated object, is store.ErrCorrupt, never wrong bytes.
func TestDamageIsCorrupt(t *testing.T) {
	body := mixedBody(6*4096+77, 4096)
	for _, c := range []string{"zstd", "lz4", "s2"} {
		t.Run(c, func(t *testing.T) {
			inner := mem.New()
			w := newStore(t, inner, Options{Codec: c, SegmentSize: 4096})
			put(t, w, "obj", body)
			clean := storedBytes(t, inner, "obj")
			ix, err := parseIndex(clean)
			if err != nil {
				t.Fatal(err)
			}
			var spots []int
			for at := 0; at < int(ix.offs[0]); at += 3 {
				spots = append(spots, at) // header and index
			}
			for i := range ix.segments() {
				lo, hi := int(ix.offs[i]), int(ix.offs[i+1])
				spots = append(spots, lo, (lo+hi)/2, hi-1)
			}
			for _, at := range spots {
				put(t, inner, "obj", clean)
				damage(t, inner, "obj", at)
				r := newStore(t, inner, Options{Codec: c})
				buf := make([]byte, len(body))
				n, err := r.GetRange(context.Background(), "obj", 0, buf)
				if err == nil {
					if n == len(body) && bytes.Equal(buf, body) {
						continue // a byte the format does not use (reserved)
					}
					t.Fatalf("byte %d flipped: read %d bytes without error, and they differ", at, n)
				}
				if !errors.Is(err, store.ErrCorrupt) {
					t.Fatalf("byte %d flipped: err = %v, want ErrCorrupt", at, err)
				}
			}
			// Truncated inside the last segment.
			put(t, inner, "obj", clean[:len(clean)-5])
			r := newStore(t, inner, Options{Codec: c})
			if _, err := r.GetRange(context.Background(), "obj", int64(len(body)-10), make([]byte, 10)); !errors.Is(err, store.ErrCorrupt) {
				t.Fatalf("truncated object: err = %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestStaleIndex: a store that cached an object's index reads the object
// correctly after another writer replaced it (the CRC check finds the
// cached index stale and it is refetched).
func TestStaleIndex(t *testing.T) {
	ctx := context.Background()
	const name = "checkpoint/0000000000000010" // not a data name: raw objects are probed
	first := textLike(5, 300000)
	replacements := map[string][]byte{
		"framed, other text":      textLike(6, 300000),
		"framed, shorter":         textLike(7, 70000),
		"raw, same length":        randBytes(8, 300000),
		"framed, other layout":    mixedBody(300000, DefaultSegmentSize),
		"framed, same plain size": append(textLike(5, 299999), 'x'),
	}
	for what, second := range replacements {
		t.Run(what, func(t *testing.T) {
			inner := mem.New()
			a := newStore(t, inner, Options{Codec: "zstd"})
			b := newStore(t, inner, Options{Codec: "s2"})
			put(t, a, name, first)
			buf := make([]byte, 1000)
			if _, err := a.GetRange(ctx, name, 200000, buf); err != nil {
				t.Fatal(err)
			}
			if _, ok := a.idx.GetIfPresent(name); !ok {
				t.Fatal("index not cached after a read")
			}
			put(t, b, name, second) // behind a's back
			for _, off := range []int64{0, 65536, min(200000, int64(len(second))-1000), int64(len(second)) - 1000} {
				n, err := a.GetRange(ctx, name, off, buf)
				if err != nil {
					t.Fatalf("read at %d after the replacement: %v", off, err)
				}
				if !bytes.Equal(buf[:n], second[off:off+int64(n)]) {
					t.Fatalf("read at %d after the replacement returned wrong bytes", off)
				}
			}
			if n, err := a.Size(ctx, name); err != nil || n != int64(len(second)) {
				t.Fatalf("Size after the replacement = %d, %v; want %d", n, err, len(second))
			}
		})
	}
}

// TestSealedBelow: compress, then seal; damage of the sealed bytes is
// caught by the sealing layer, and data round-trips.
func TestSealedBelow(t *testing.T) {
	inner := mem.New()
	sl, err := sealed.New(inner, bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 16))
	if err != nil {
		t.Fatal(err)
	}
	s := newStore(t, sl, Options{Codec: "zstd"})
	body := textLike(9, 4<<20)
	put(t, s, store.DataName(5), body)
	if got := whole(t, s, store.DataName(5)); !bytes.Equal(got, body) {
		t.Fatal("read back differs")
	}
	stored, err := inner.Size(context.Background(), store.DataName(5))
	if err != nil {
		t.Fatal(err)
	}
	if stored*2 > int64(len(body)) {
		t.Fatalf("sealed and compressed: %d stored bytes for %d", stored, len(body))
	}
}

// TestTextRatio is the target of docs/ARCHITECTURE.md §19: text-like
// data is stored at no more than half its size with zstd (and the
// stored size of the other codecs is logged).
func TestTextRatio(t *testing.T) {
	body := textLike(11, 16<<20)
	for _, c := range []struct{ codec, level string }{{"zstd", "fastest"}, {"zstd", "default"}, {"s2", ""}, {"lz4", ""}} {
		inner := mem.New()
		s := newStore(t, inner, Options{Codec: c.codec, Level: c.level})
		for k := range 4 {
			put(t, s, store.DataName(int64(k)), body[k<<22:(k+1)<<22])
		}
		ratio := float64(inner.Bytes()) / float64(len(body))
		t.Logf("%s %s: %.1f%% of the written size", c.codec, c.level, 100*ratio)
		if c.codec == "zstd" && ratio > 0.5 {
			t.Errorf("zstd %s stores text-like data at %.1f%%, target <= 50%%", c.level, 100*ratio)
		}
	}
}

func TestBadOptions(t *testing.T) {
	for _, o := range []Options{{Codec: "gzip"}, {Codec: "zstd", Level: "max"}, {Codec: "zstd", SegmentSize: 3000}, {SegmentSize: 64 << 20}} {
		if _, err := New(mem.New(), o); err == nil {
			t.Errorf("New(%+v) accepted", o)
		}
	}
	_, err := New(mem.New(), Options{Codec: "gzip"})
	if err == nil || !strings.Contains(err.Error(), "zstd") {
		t.Errorf("unknown codec error does not name the allowed ones: %v", err)
	}
}

// pieceRecorder records the first byte of every body its PutV is given.
type pieceRecorder struct {
	store.Store
	firsts []*byte
}

func (r *pieceRecorder) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	if len(body) > 0 && len(body[0]) > 0 {
		r.firsts = append(r.firsts, &body[0][0])
	}
	return store.PutPieces(ctx, r.Store, name, body, ifAbsent)
}

// TestPutVPassesPiecesThrough: with codec "none" (the daemon's default) a
// body in pieces reaches the inner store as those very pieces, not joined;
// a body that must be framed (it starts with the magic, even split across
// pieces) or compressed is, and every one reads back as written.
func TestPutVPassesPiecesThrough(t *testing.T) {
	ctx := context.Background()
	split := func(b []byte, at ...int) [][]byte {
		var out [][]byte
		prev := 0
		for _, a := range at {
			out = append(out, b[prev:a])
			prev = a
		}
		return append(out, b[prev:])
	}
	plain := randBytes(9, 200000)
	magicBody := append([]byte(magic), randBytes(10, 100000)...)
	for _, codec := range []string{"none", "zstd"} {
		rec := &pieceRecorder{Store: mem.New()}
		s := newStore(t, rec, Options{Codec: codec})
		for i, c := range []struct {
			body   []byte
			pieces [][]byte
			asIs   bool // the inner store gets the pieces themselves
		}{
			{plain, split(plain, 100, 65636, 65636, 131172), codec == "none"},
			{magicBody, split(magicBody, 3, 70000), false},
			{nil, nil, true},
		} {
			name := store.DataName(int64(i))
			rec.firsts = nil
			if err := s.PutV(ctx, name, c.pieces, true); err != nil {
				t.Fatalf("%s: PutV %d: %v", codec, i, err)
			}
			passed := len(rec.firsts) == 1 && len(c.pieces) > 0 && rec.firsts[0] == &c.pieces[0][0]
			if len(c.body) > 0 && passed != c.asIs {
				t.Errorf("%s: body %d reached the inner store as its own pieces: %v, want %v", codec, i, passed, c.asIs)
			}
			got := make([]byte, len(c.body)+1)
			n, err := s.GetRange(ctx, name, 0, got)
			if err != nil || n != len(c.body) || !bytes.Equal(got[:n], c.body) {
				t.Errorf("%s: body %d reads back as %d bytes (%v), equal %v", codec, i, n, err, bytes.Equal(got[:n], c.body))
			}
		}
	}
}
