package store_test

import (
	"context"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
)

func TestDataName(t *testing.T) {
	cases := map[int64]string{
		0:                   "00000000/00000000",
		1:                   "00000001/00000000",
		0xdeadbeef:          "deadbeef/00000000",
		1 << 32:             "00000000/00000001",
		0x12_3456789a:       "3456789a/00000012",
		math.MaxInt64:       "ffffffff/7fffffff",
		0x7fffffff_00000000: "00000000/7fffffff",
	}
	for k, want := range cases {
		if got := store.DataName(k); got != want {
			t.Errorf("DataName(%#x) = %q, want %q", k, got, want)
		}
		got, ok := store.ParseDataName(want)
		if !ok || got != k {
			t.Errorf("ParseDataName(%q) = %#x, %v; want %#x, true", want, got, ok, k)
		}
	}
	// Consecutive keys land under different first-level prefixes.
	if a, b := store.DataName(41)[:8], store.DataName(42)[:8]; a == b {
		t.Errorf("keys 41 and 42 share the prefix %q", a)
	}
}

func TestParseDataNameRejects(t *testing.T) {
	for _, n := range []string{
		"", store.SuperblockName, store.CheckpointName(1),
		"0000000g/00000000", "00000001/0000000", "00000001/000000000",
		"00000001-00000000", "0000000A/00000000", " 0000001/00000000",
		"+0000001/00000000", "00000001/00000000/", "vol/00000001/00000000",
	} {
		if k, ok := store.ParseDataName(n); ok {
			t.Errorf("ParseDataName(%q) = %d, true; want false", n, k)
		}
	}
}

func TestCheckpointNamesSortByWatermark(t *testing.T) {
	w := []int64{0, 2, 10, 255, 1 << 32, 1 << 40}
	var names []string
	for _, x := range w {
		names = append(names, store.CheckpointName(x))
	}
	if !slices.IsSorted(names) {
		t.Errorf("checkpoint names not in watermark order: %q", names)
	}
	for _, n := range names {
		if len(n) <= len(store.CheckpointPrefix) || n[:len(store.CheckpointPrefix)] != store.CheckpointPrefix {
			t.Errorf("checkpoint name %q lacks the prefix %q", n, store.CheckpointPrefix)
		}
	}
}

func TestWithPrefix(t *testing.T) {
	ctx := context.Background()
	m := mem.New()
	if store.WithPrefix(m, "") != store.Store(m) {
		t.Error("WithPrefix with an empty prefix does not return the store itself")
	}
	a, b := store.WithPrefix(m, "a"), store.WithPrefix(m, "a/") // the same volume
	if err := a.Put(ctx, "x", []byte("1"), true); err != nil {
		t.Fatal(err)
	}
	if err := b.Put(ctx, "x", []byte("2"), true); err == nil {
		t.Error(`prefixes "a" and "a/" are not the same place`)
	}
	if _, err := m.Size(ctx, "a/x"); err != nil {
		t.Errorf("object not stored under a/: %v", err)
	}
	// A prefix that is a string prefix of another volume's does not leak:
	// "a" lists only a/..., not ab/....
	ab := store.WithPrefix(m, "ab")
	if err := ab.Put(ctx, "y", nil, false); err != nil {
		t.Fatal(err)
	}
	var got []string
	if err := a.List(ctx, "", func(n string, _ int64) error { got = append(got, n); return nil }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, []string{"x"}) {
		t.Errorf("List under a = %q, want [x]", got)
	}
}

// Probe names carry their kind and time; check --repair relies on both.
func TestProbeName(t *testing.T) {
	at := time.Unix(1700000000, 123)
	for _, kind := range store.ProbeKinds {
		name := store.ProbeName(kind, 42, at)
		if want := kind + "-probe-42-1700000000000000123"; name != want {
			t.Errorf("ProbeName(%s) = %q, want %q", kind, name, want)
		}
		p, got, ok := store.ParseProbeName(name)
		if !p || !ok || !got.Equal(at) {
			t.Errorf("ParseProbeName(%q) = %v %v %v", name, p, got, ok)
		}
	}
	for name, want := range map[string][2]bool{
		"payload-checksum-probe-1-x": {true, false},
		"superblock":                 {false, false},
		store.DataName(7):            {false, false},
		"other-probe-1-2":            {false, false},
	} {
		p, _, ok := store.ParseProbeName(name)
		if p != want[0] || ok != want[1] {
			t.Errorf("ParseProbeName(%q) = probe %v ok %v, want %v %v", name, p, ok, want[0], want[1])
		}
	}
}

// TestBodyCRC32C: a checksum put in a context is found for the very
// slice it was given for, and for no other: not a copy with the same
// bytes, not a part of it (a wrapper that stores other bytes must not
// send it).
func TestBodyCRC32C(t *testing.T) {
	body := []byte("the object's bytes")
	ctx := store.WithBodyCRC32C(context.Background(), body, 0x1234)
	if crc, ok := store.BodyCRC32C(ctx, body); !ok || crc != 0x1234 {
		t.Fatalf("BodyCRC32C(the same slice) = %x, %v", crc, ok)
	}
	for name, other := range map[string][]byte{
		"a copy":   append([]byte(nil), body...),
		"a prefix": body[:len(body)-1],
		"a suffix": body[1:],
		"empty":    nil,
	} {
		if _, ok := store.BodyCRC32C(ctx, other); ok {
			t.Errorf("BodyCRC32C(%s) found the checksum of another slice", name)
		}
	}
	if _, ok := store.BodyCRC32C(context.Background(), body); ok {
		t.Error("BodyCRC32C found a checksum in a context without one")
	}
}
