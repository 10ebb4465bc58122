// Package storetest is the conformance suite every store.Store
// implementation must pass (mem, dir, s3 on a real MinIO, and wrappers).
//
// It owns the definition of "behaves like a store" in executable form: the
// semantics documented on store.Store are asserted here once, so that the
// volume, GC and recovery code can rely on them whatever the backend. It
// must never depend on a particular implementation.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store"
)

// Run runs the suite. newStore must return an empty store for each call;
// every subtest gets its own.
func Run(t *testing.T, newStore func(t *testing.T) store.Store) {
	t.Helper()
	RunWith(t, newStore, Options{})
}

// Options adjust the suite to a store's documented deviations.
type Options struct {
	// StoredListSizes: List reports sizes as stored, which differ from
	// the bodies' (the compressing wrapper, docs/ARCHITECTURE.md §19.4);
	// listed names are still checked, and Size must still be exact.
	StoredListSizes bool
}

// RunWith runs the suite with options.
func RunWith(t *testing.T, newStore func(t *testing.T) store.Store, o Options) {
	t.Helper()
	tests := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"PutGetWhole", testPutGetWhole},
		{"GetRanges", testGetRanges},
		{"GetRangesVectored", testGetRangesV},
		{"PutVectored", testPutV},
		{"Size", testSize},
		{"Missing", testMissing},
		{"Overwrite", func(t *testing.T, s store.Store) { testOverwrite(t, s, o) }},
		{"PutIfAbsent", testPutIfAbsent},
		{"PutIfAbsentRace", testPutIfAbsentRace},
		{"EmptyObject", testEmptyObject},
		{"LargeObject", testLargeObject},
		{"ListOrderAndPrefix", func(t *testing.T, s store.Store) { testList(t, s, o) }},
		{"ListStopsOnError", testListStops},
		{"Delete", testDelete},
		{"BuffersNotRetained", testBuffersNotRetained},
		{"ConcurrentPuts", testConcurrentPuts},
		{"CanceledContext", testCanceled},
		{"WithPrefix", func(t *testing.T, s store.Store) { testWithPrefix(t, s, o) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, newStore(t))
		})
	}
}

func ctxT(t *testing.T) context.Context {
	// A generous bound so a hung backend fails the test instead of the
	// whole binary; it is not a timing assertion.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func mustPut(t *testing.T, s store.Store, name string, body []byte) {
	t.Helper()
	if err := s.Put(ctxT(t), name, body, false); err != nil {
		t.Fatalf("Put(%q, %d bytes): %v", name, len(body), err)
	}
}

// mustRead reads the whole object through GetRange with a buffer larger
// than the object, and checks the short read.
func mustRead(t *testing.T, s store.Store, name string, size int) []byte {
	t.Helper()
	buf := make([]byte, size+100)
	n, err := s.GetRange(ctxT(t), name, 0, buf)
	if err != nil {
		t.Fatalf("GetRange(%q, 0, %d): %v", name, len(buf), err)
	}
	if n != size {
		t.Fatalf("GetRange(%q, 0, %d) read %d bytes, want %d", name, len(buf), n, size)
	}
	return buf[:n]
}

type entry struct {
	Name string
	Size int64
}

func list(t *testing.T, s store.Store, prefix string) []entry {
	t.Helper()
	var got []entry
	err := s.List(ctxT(t), prefix, func(name string, size int64) error {
		got = append(got, entry{name, size})
		return nil
	})
	if err != nil {
		t.Fatalf("List(%q): %v", prefix, err)
	}
	return got
}

// sameList compares listings, sizes too unless they are stored sizes.
func (o Options) sameList(got, want []entry) bool {
	if o.StoredListSizes {
		return slices.Equal(names(got), names(want))
	}
	return slices.Equal(got, want)
}

func names(es []entry) []string {
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = e.Name
	}
	return out
}

func testPutGetWhole(t *testing.T, s store.Store) {
	body := randBytes(1, 1000)
	mustPut(t, s, "obj", body)

	buf := make([]byte, 1000)
	n, err := s.GetRange(ctxT(t), "obj", 0, buf)
	if err != nil || n != 1000 {
		t.Fatalf("GetRange exact size = %d, %v; want 1000, nil", n, err)
	}
	if !bytes.Equal(buf, body) {
		t.Fatal("GetRange returned different bytes than were put")
	}
	if got := mustRead(t, s, "obj", 1000); !bytes.Equal(got, body) {
		t.Fatal("GetRange with a larger buffer returned different bytes")
	}
}

func testGetRanges(t *testing.T, s store.Store) {
	const size = 10000
	body := randBytes(2, size)
	mustPut(t, s, "ranges", body)
	cases := []struct {
		off    int64
		length int
		want   int // bytes expected
	}{
		{0, 1, 1},
		{1, 1, 1},
		{4096, 4096, 4096},
		{size - 1, 1, 1},
		{1234, 5678, 5678},
		{size - 10, 100, 10}, // crosses the end: short read
		{0, size + 1, size},  // whole object plus one
		{size, 10, 0},        // at the end
		{size + 5000, 10, 0}, // past the end
	}
	for _, c := range cases {
		buf := bytes.Repeat([]byte{0xEE}, c.length)
		n, err := s.GetRange(ctxT(t), "ranges", c.off, buf)
		if err != nil {
			t.Errorf("GetRange(off %d, len %d): %v", c.off, c.length, err)
			continue
		}
		if n != c.want {
			t.Errorf("GetRange(off %d, len %d) = %d bytes, want %d", c.off, c.length, n, c.want)
			continue
		}
		if c.want > 0 && !bytes.Equal(buf[:n], body[c.off:c.off+int64(n)]) {
			t.Errorf("GetRange(off %d, len %d): wrong bytes", c.off, c.length)
		}
		// Bytes beyond n belong to the caller and must be left alone.
		for i := n; i < len(buf); i++ {
			if buf[i] != 0xEE {
				t.Errorf("GetRange(off %d, len %d) wrote buf[%d] beyond the %d bytes it returned", c.off, c.length, i, n)
				break
			}
		}
	}
}

// testGetRangesV: a store that reads into several buffers fills them as
// GetRange fills their concatenation, also through a prefix, for ranges
// split at every kind of place (empty buffers, the object's end inside a
// buffer or between two). Stores without it skip.
func testGetRangesV(t *testing.T, s store.Store) {
	if _, ok := s.(store.VectorReader); !ok {
		t.Skip("the store does not implement store.VectorReader")
	}
	const size = 10000
	body := randBytes(3, size)
	mustPut(t, s, "vranges", body)
	mustPut(t, store.WithPrefix(s, "p"), "vranges", body)
	splits := [][]int{
		{1},
		{4096, 4096, 1808},       // exactly the object
		{4096, 4096, 4096},       // the end inside the last buffer
		{5000, 5000, 100},        // the end between two buffers
		{0, 3000, 0, 7000, 50},   // empty buffers among them
		{1, 2, 3, 4, 5, 6, 7},    // small pieces
		{size + 100},             // one buffer past the end
		{3000, 3000, 3000, 3000}, // past the end
	}
	for _, off := range []int64{0, 1, 4096, size - 10, size, size + 7} {
		for _, sp := range splits {
			var bufs [][]byte
			total := 0
			for _, n := range sp {
				bufs = append(bufs, bytes.Repeat([]byte{0xEE}, n))
				total += n
			}
			want := int(max(0, min(int64(total), size-off)))
			for _, st := range []store.Store{s, store.WithPrefix(s, "p")} {
				v, ok := st.(store.VectorReader)
				if !ok {
					t.Fatalf("WithPrefix over a VectorReader is not one")
				}
				n, err := v.GetRangeV(ctxT(t), "vranges", off, bufs)
				if err != nil || n != want {
					t.Errorf("GetRangeV(off %d, split %v) = %d, %v; want %d bytes", off, sp, n, err, want)
					continue
				}
				var got []byte
				for _, b := range bufs {
					got = append(got, b...)
				}
				if !bytes.Equal(got[:n], body[min(off, size):min(off, size)+int64(n)]) {
					t.Errorf("GetRangeV(off %d, split %v): wrong bytes", off, sp)
				}
				for i := n; i < len(got); i++ {
					if got[i] != 0xEE {
						t.Errorf("GetRangeV(off %d, split %v) wrote byte %d beyond the %d it returned", off, sp, i, n)
						break
					}
				}
				for _, b := range bufs { // again, for the next store
					for i := range b {
						b[i] = 0xEE
					}
				}
			}
		}
	}
	v := s.(store.VectorReader)
	if _, err := v.GetRangeV(ctxT(t), "no-such-object", 0, [][]byte{make([]byte, 10)}); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetRangeV of a missing object: %v, want ErrNotFound", err)
	}
}

// testPutV: a store that takes a body in pieces stores their
// concatenation, also through a prefix and conditionally, for pieces
// split at every kind of place (empty pieces, one byte, one piece).
// PutPieces joins them for a store without it, which must store the
// same. A conditional PutV of a taken name is refused like Put's.
func testPutV(t *testing.T, s store.Store) {
	const size = 10000
	body := randBytes(11, size)
	splits := [][]int{
		{size},
		{4096, 4096, 1808},
		{0, 3000, 0, 7000, 0},
		{1, 2, 3, 4, 5, 6, 7, size - 28},
		{size - 1, 1},
	}
	_, vectored := s.(store.VectorWriter)
	for i, sp := range splits {
		var pieces [][]byte
		off := 0
		for _, n := range sp {
			pieces = append(pieces, body[off:off+n])
			off += n
		}
		for j, st := range []store.Store{s, store.WithPrefix(s, "p")} {
			if _, ok := st.(store.VectorWriter); vectored && !ok {
				t.Fatal("WithPrefix over a VectorWriter is not one")
			}
			name := fmt.Sprintf("vput-%d", i)
			if err := store.PutPieces(ctxT(t), st, name, pieces, j == 0); err != nil {
				t.Fatalf("PutV (split %v): %v", sp, err)
			}
			if got := mustRead(t, st, name, size); !bytes.Equal(got, body) {
				t.Fatalf("PutV (split %v): the object is not the pieces' concatenation", sp)
			}
			if j == 0 {
				if err := store.PutPieces(ctxT(t), st, name, [][]byte{{1}, {2}}, true); !errors.Is(err, store.ErrExists) {
					t.Fatalf("conditional PutV of an existing name: err = %v, want ErrExists", err)
				}
			}
		}
	}
	if got := mustRead(t, s, "vput-0", size); !bytes.Equal(got, body) {
		t.Fatal("a refused conditional PutV changed the object")
	}
}

func testSize(t *testing.T, s store.Store) {
	for i, n := range []int{1, 511, 4096, 100000} {
		name := fmt.Sprintf("size-%d", i)
		mustPut(t, s, name, randBytes(uint64(10+i), n))
		got, err := s.Size(ctxT(t), name)
		if err != nil || got != int64(n) {
			t.Errorf("Size(%q) = %d, %v; want %d, nil", name, got, err, n)
		}
	}
}

func testMissing(t *testing.T, s store.Store) {
	mustPut(t, s, "present", []byte("x"))
	if _, err := s.GetRange(ctxT(t), "absent", 0, make([]byte, 10)); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetRange of a missing object: err = %v, want ErrNotFound", err)
	}
	if _, err := s.GetRange(ctxT(t), "absent", 100, make([]byte, 10)); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetRange past the end of a missing object: err = %v, want ErrNotFound", err)
	}
	if _, err := s.Size(ctxT(t), "absent"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Size of a missing object: err = %v, want ErrNotFound", err)
	}
	// A name that is only a prefix of an existing one is still missing.
	if _, err := s.Size(ctxT(t), "pres"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Size of a name that is a prefix of another: err = %v, want ErrNotFound", err)
	}
	// Data-like names with a '/' whose "directory" exists.
	mustPut(t, s, store.DataName(7), []byte("seven"))
	if _, err := s.Size(ctxT(t), store.DataName(7+1<<32)); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Size of a missing data name next to an existing one: err = %v, want ErrNotFound", err)
	}
}

func testOverwrite(t *testing.T, s store.Store, o Options) {
	mustPut(t, s, "ow", randBytes(3, 5000))
	second := randBytes(4, 300)
	mustPut(t, s, "ow", second)
	if got := mustRead(t, s, "ow", 300); !bytes.Equal(got, second) {
		t.Fatal("after overwrite, content is not the second body")
	}
	if n, err := s.Size(ctxT(t), "ow"); err != nil || n != 300 {
		t.Fatalf("Size after overwrite = %d, %v; want 300", n, err)
	}
	if got := list(t, s, ""); !o.sameList(got, []entry{{"ow", 300}}) {
		t.Fatalf("List after overwrite = %v, want one entry of 300 bytes", got)
	}
}

func testPutIfAbsent(t *testing.T, s store.Store) {
	first := randBytes(5, 2000)
	if err := s.Put(ctxT(t), "cond", first, true); err != nil {
		t.Fatalf("conditional Put of a new name: %v", err)
	}
	err := s.Put(ctxT(t), "cond", randBytes(6, 3000), true)
	if !errors.Is(err, store.ErrExists) {
		t.Fatalf("conditional Put of an existing name: err = %v, want ErrExists", err)
	}
	if got := mustRead(t, s, "cond", 2000); !bytes.Equal(got, first) {
		t.Fatal("a refused conditional Put changed the object")
	}
	// A plain Put still replaces it.
	third := randBytes(7, 10)
	mustPut(t, s, "cond", third)
	if got := mustRead(t, s, "cond", 10); !bytes.Equal(got, third) {
		t.Fatal("plain Put after a conditional one did not replace the object")
	}
	// After a delete the name is free again.
	if err := s.Delete(ctxT(t), "cond"); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctxT(t), "cond", first, true); err != nil {
		t.Fatalf("conditional Put of a deleted name: %v", err)
	}
	// Data names with a '/' behave the same.
	if err := s.Put(ctxT(t), store.DataName(42), first, true); err != nil {
		t.Fatalf("conditional Put of a new data name: %v", err)
	}
	if err := s.Put(ctxT(t), store.DataName(42), third, true); !errors.Is(err, store.ErrExists) {
		t.Fatalf("conditional Put of an existing data name: err = %v, want ErrExists", err)
	}
}

// testPutIfAbsentRace: of several concurrent conditional Puts of one name,
// exactly one wins and its body is what is stored. This is what makes two
// writers on one volume detectable.
func testPutIfAbsentRace(t *testing.T, s store.Store) {
	const n = 8
	bodies := make([][]byte, n)
	errs := make([]error, n)
	for i := range bodies {
		bodies[i] = randBytes(uint64(100+i), 4096)
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			errs[i] = s.Put(ctxT(t), "race", bodies[i], true)
		})
	}
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if winner >= 0 {
				t.Fatalf("conditional Puts %d and %d both succeeded", winner, i)
			}
			winner = i
		case errors.Is(err, store.ErrExists), errors.Is(err, store.ErrConflict):
		default:
			t.Errorf("conditional Put %d: unexpected error %v", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no conditional Put succeeded")
	}
	if got := mustRead(t, s, "race", 4096); !bytes.Equal(got, bodies[winner]) {
		t.Fatal("stored object is not the body of the Put that succeeded")
	}
}

func testEmptyObject(t *testing.T, s store.Store) {
	// A placeholder keeping the key sequence contiguous is an empty object.
	name := store.DataName(5)
	if err := s.Put(ctxT(t), name, nil, true); err != nil {
		t.Fatalf("Put of an empty object: %v", err)
	}
	if n, err := s.Size(ctxT(t), name); err != nil || n != 0 {
		t.Fatalf("Size of an empty object = %d, %v; want 0, nil", n, err)
	}
	for _, off := range []int64{0, 1, 4096} {
		n, err := s.GetRange(ctxT(t), name, off, make([]byte, 10))
		if err != nil || n != 0 {
			t.Errorf("GetRange(off %d) of an empty object = %d, %v; want 0, nil", off, n, err)
		}
	}
	if got := list(t, s, ""); !slices.Equal(got, []entry{{name, 0}}) {
		t.Errorf("List = %v, want the empty object with size 0", got)
	}
	if err := s.Put(ctxT(t), name, []byte{}, true); !errors.Is(err, store.ErrExists) {
		t.Errorf("conditional Put over an empty object: err = %v, want ErrExists", err)
	}
	// Replacing a full object by a placeholder.
	full := store.DataName(6)
	mustPut(t, s, full, randBytes(8, 1000))
	mustPut(t, s, full, []byte{})
	if n, err := s.Size(ctxT(t), full); err != nil || n != 0 {
		t.Errorf("Size after replacing by a placeholder = %d, %v; want 0", n, err)
	}
}

func testLargeObject(t *testing.T, s store.Store) {
	const size = 8 << 20
	body := randBytes(9, size)
	mustPut(t, s, "large", body)
	if n, err := s.Size(ctxT(t), "large"); err != nil || n != size {
		t.Fatalf("Size = %d, %v; want %d", n, err, size)
	}
	if got := mustRead(t, s, "large", size); !bytes.Equal(got, body) {
		t.Fatal("8 MiB object read back differs")
	}
	// An unaligned range from the middle.
	buf := make([]byte, 1<<20+3)
	off := int64(3<<20 + 517)
	n, err := s.GetRange(ctxT(t), "large", off, buf)
	if err != nil || n != len(buf) {
		t.Fatalf("GetRange middle = %d, %v", n, err)
	}
	if !bytes.Equal(buf, body[off:off+int64(n)]) {
		t.Fatal("middle range differs")
	}
}

func testList(t *testing.T, s store.Store, o Options) {
	put := []string{
		"b", "a0", "a/c", "a-c", "a/b", "ab/x",
		store.SuperblockName,
		store.CheckpointName(0x20), store.CheckpointName(0x3),
		store.DataName(1), store.DataName(2), store.DataName(1 << 32), store.DataName(0x10),
	}
	// Insert in a shuffled order so that insertion order cannot pass for
	// lexical order.
	r := rand.New(rand.NewPCG(11, 12))
	r.Shuffle(len(put), func(i, j int) { put[i], put[j] = put[j], put[i] })
	sizes := map[string]int64{}
	for i, n := range put {
		sizes[n] = int64(i * 3)
		mustPut(t, s, n, randBytes(uint64(i), i*3))
	}

	want := []string{
		"00000000/00000001", // key 1<<32: low half first
		"00000001/00000000",
		"00000002/00000000",
		"00000010/00000000",
		"a-c", // '-' < '/' < '0'
		"a/b",
		"a/c",
		"a0",
		"ab/x",
		"b",
		"checkpoint/0000000000000003",
		"checkpoint/0000000000000020",
		"superblock",
	}
	got := list(t, s, "")
	if !slices.Equal(names(got), want) {
		t.Fatalf("List(\"\") =\n%q\nwant\n%q", names(got), want)
	}
	for _, e := range got {
		if e.Size != sizes[e.Name] && !o.StoredListSizes {
			t.Errorf("List size of %q = %d, want %d", e.Name, e.Size, sizes[e.Name])
		}
	}

	prefixes := map[string][]string{
		"a":           {"a-c", "a/b", "a/c", "a0", "ab/x"},
		"a/":          {"a/b", "a/c"},
		"a/b":         {"a/b"},
		"ab":          {"ab/x"},
		"checkpoint/": {"checkpoint/0000000000000003", "checkpoint/0000000000000020"},
		"00000001/":   {"00000001/00000000"},
		"00000000/":   {"00000000/00000001"},
		"0000000":     {"00000000/00000001", "00000001/00000000", "00000002/00000000"},
		"superblock":  {"superblock"},
		"zz":          nil,
		"a/b/":        nil,
		"c":           {"checkpoint/0000000000000003", "checkpoint/0000000000000020"},
	}
	for p, w := range prefixes {
		if g := names(list(t, s, p)); !slices.Equal(g, w) {
			t.Errorf("List(%q) = %q, want %q", p, g, w)
		}
	}
}

func testListStops(t *testing.T, s store.Store) {
	for i := range 5 {
		mustPut(t, s, fmt.Sprintf("stop-%d", i), []byte{byte(i)})
	}
	stop := errors.New("enough")
	calls := 0
	err := s.List(ctxT(t), "", func(name string, size int64) error {
		calls++
		if calls == 2 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) {
		t.Fatalf("List returned %v, want the callback's error", err)
	}
	if calls != 2 {
		t.Fatalf("callback called %d times after returning an error at call 2", calls)
	}
}

func testDelete(t *testing.T, s store.Store) {
	mustPut(t, s, "keep", []byte("k"))
	mustPut(t, s, "gone", []byte("g"))
	mustPut(t, s, store.DataName(3), []byte("d"))
	if err := s.Delete(ctxT(t), "gone"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if err := s.Delete(ctxT(t), store.DataName(3)); err != nil {
		t.Fatalf("Delete of a data name: %v", err)
	}
	if _, err := s.Size(ctxT(t), "gone"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Size after Delete: err = %v, want ErrNotFound", err)
	}
	if _, err := s.GetRange(ctxT(t), store.DataName(3), 0, make([]byte, 1)); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetRange after Delete: err = %v, want ErrNotFound", err)
	}
	if got := names(list(t, s, "")); !slices.Equal(got, []string{"keep"}) {
		t.Errorf("List after Delete = %q, want [keep]", got)
	}
	// Idempotent: deleting again, or a name that never existed, is fine.
	for _, n := range []string{"gone", "never", store.DataName(3), store.DataName(99)} {
		if err := s.Delete(ctxT(t), n); err != nil {
			t.Errorf("Delete of missing %q: %v", n, err)
		}
	}
	// The name can be used again.
	mustPut(t, s, store.DataName(3), []byte("again"))
	if got := mustRead(t, s, store.DataName(3), 5); string(got) != "again" {
		t.Errorf("re-Put after Delete read %q", got)
	}
}

func testBuffersNotRetained(t *testing.T, s store.Store) {
	body := []byte("original content")
	mustPut(t, s, "nr", body)
	copy(body, "XXXXXXXX")
	if got := mustRead(t, s, "nr", 16); string(got) != "original content" {
		t.Fatalf("store retained the Put body: read %q after the caller modified it", got)
	}
	buf := make([]byte, 16)
	if _, err := s.GetRange(ctxT(t), "nr", 0, buf); err != nil {
		t.Fatal(err)
	}
	copy(buf, "YYYYYYYY")
	if got := mustRead(t, s, "nr", 16); string(got) != "original content" {
		t.Fatalf("a read buffer aliases the stored object: read %q", got)
	}
}

func testConcurrentPuts(t *testing.T, s store.Store) {
	const workers, each = 8, 6
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				k := int64(w*each + i)
				if err := s.Put(ctxT(t), store.DataName(k), randBytes(uint64(k), 1000+int(k)), i%2 == 0); err != nil {
					errs <- fmt.Errorf("put key %d: %w", k, err)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	got := list(t, s, "")
	if len(got) != workers*each {
		t.Fatalf("List returned %d objects, want %d", len(got), workers*each)
	}
	for k := int64(0); k < workers*each; k++ {
		want := randBytes(uint64(k), 1000+int(k))
		if g := mustRead(t, s, store.DataName(k), len(want)); !bytes.Equal(g, want) {
			t.Errorf("key %d: content differs", k)
		}
	}
}

func testCanceled(t *testing.T, s store.Store) {
	mustPut(t, s, "c", []byte("c"))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Put(ctx, "c2", []byte("x"), false); !errors.Is(err, context.Canceled) {
		t.Errorf("Put with a canceled context: err = %v, want context.Canceled", err)
	}
	if _, err := s.GetRange(ctx, "c", 0, make([]byte, 1)); !errors.Is(err, context.Canceled) {
		t.Errorf("GetRange with a canceled context: err = %v, want context.Canceled", err)
	}
	if _, err := s.Size(ctx, "c"); !errors.Is(err, context.Canceled) {
		t.Errorf("Size with a canceled context: err = %v, want context.Canceled", err)
	}
	if _, err := s.Size(ctxT(t), "c2"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a Put with a canceled context stored the object (Size err = %v)", err)
	}
}

func testWithPrefix(t *testing.T, s store.Store, o Options) {
	v1 := store.WithPrefix(s, "vol1")
	v2 := store.WithPrefix(s, "vol2/")
	mustPut(t, v1, store.SuperblockName, []byte("one"))
	mustPut(t, v2, store.SuperblockName, []byte("two!"))
	mustPut(t, v1, store.DataName(0), []byte("d1"))
	mustPut(t, v2, store.DataName(1), []byte("d2"))

	if got := mustRead(t, v1, store.SuperblockName, 3); string(got) != "one" {
		t.Errorf("vol1 superblock = %q", got)
	}
	if got := mustRead(t, v2, store.SuperblockName, 4); string(got) != "two!" {
		t.Errorf("vol2 superblock = %q", got)
	}
	if _, err := v1.Size(ctxT(t), store.DataName(1)); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("vol1 sees vol2's object: err = %v", err)
	}
	if err := v2.Put(ctxT(t), store.DataName(1), []byte("x"), true); !errors.Is(err, store.ErrExists) {
		t.Errorf("conditional Put through a prefix: err = %v, want ErrExists", err)
	}
	if err := v1.Put(ctxT(t), store.DataName(1), []byte("x"), true); err != nil {
		t.Errorf("conditional Put of a name taken only under the other prefix: %v", err)
	}

	if got := list(t, v1, ""); !o.sameList(got, []entry{{"00000000/00000000", 2}, {"00000001/00000000", 1}, {"superblock", 3}}) {
		t.Errorf("vol1 List = %v", got)
	}
	if got := list(t, v2, "0"); !o.sameList(got, []entry{{"00000001/00000000", 2}}) {
		t.Errorf("vol2 List(\"0\") = %v", got)
	}
	// The underlying store sees the prefixed names.
	if got := names(list(t, s, "")); !slices.Equal(got, []string{
		"vol1/00000000/00000000", "vol1/00000001/00000000", "vol1/superblock",
		"vol2/00000001/00000000", "vol2/superblock",
	}) {
		t.Errorf("underlying List = %q", got)
	}

	if err := v1.Delete(ctxT(t), store.SuperblockName); err != nil {
		t.Fatal(err)
	}
	if _, err := v2.Size(ctxT(t), store.SuperblockName); err != nil {
		t.Errorf("deleting vol1's superblock affected vol2: %v", err)
	}
	if _, err := v1.Size(ctxT(t), store.SuperblockName); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("vol1 superblock after Delete: err = %v", err)
	}
}
