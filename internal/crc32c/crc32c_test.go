package crc32c

import (
	"hash/crc32"
	"math/rand/v2"
	"testing"
)

// TestCombine: the combined checksum of two pieces is the checksum of
// their concatenation, for pieces of every small length and random
// larger ones, empty pieces included.
func TestCombine(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	std := crc32.MakeTable(crc32.Castagnoli)
	check := func(a, b []byte) {
		t.Helper()
		whole := crc32.Checksum(append(append([]byte(nil), a...), b...), std)
		if got := Combine(Checksum(a), Checksum(b), int64(len(b))); got != whole {
			t.Fatalf("Combine of %d and %d bytes = %08x, want %08x", len(a), len(b), got, whole)
		}
	}
	for na := 0; na < 40; na++ {
		for nb := 0; nb < 40; nb++ {
			check(buf[:na], buf[na:na+nb])
		}
	}
	for range 200 {
		na, nb := rng.IntN(len(buf)/2), rng.IntN(len(buf)/2)
		check(buf[:na], buf[na:na+nb])
	}
	if Update(Checksum(buf[:1000]), buf[1000:5000]) != Checksum(buf[:5000]) {
		t.Fatal("Update does not continue a checksum")
	}
}

func BenchmarkCombine(b *testing.B) {
	for i := 0; b.Loop(); i++ {
		Combine(uint32(i), uint32(i*3), 4<<20)
	}
}

// TestShifter: a Shifter gives Combine's result for its length, checked
// against the checksum of the concatenation.
func TestShifter(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	buf := make([]byte, 3<<13)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	for _, n := range []int{0, 1, 7, 512, 4096, 8192} {
		s := NewShifter(int64(n))
		if s.Len() != int64(n) {
			t.Fatalf("Len %d, want %d", s.Len(), n)
		}
		for range 100 {
			na := rng.IntN(len(buf) - n)
			a, b := buf[:na], buf[na:na+n]
			if got, want := s.Combine(Checksum(a), Checksum(b)), Checksum(buf[:na+n]); got != want {
				t.Fatalf("Shifter(%d).Combine after %d bytes = %08x, want %08x", n, na, got, want)
			}
		}
	}
}

func BenchmarkShifterCombine(b *testing.B) {
	s := NewShifter(4096)
	for i := 0; b.Loop(); i++ {
		s.Combine(uint32(i), uint32(i*3))
	}
}
