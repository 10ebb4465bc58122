package extentmap

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"testing"
)

// sampleMap builds a map with sparse and dense pages, tombstones, a
// placeholder object and a forgotten one.
func sampleMap(t testing.TB, seed uint64) (*Map, *model) {
	t.Helper()
	const blocks = 5*pageLen + 100
	m, err := New(blocks)
	if err != nil {
		t.Fatal(err)
	}
	md := newModel(blocks)
	rng := rand.New(rand.NewPCG(seed, 99))
	var nextKey int64
	randomOps(t, rng, m, md, 300, &nextKey)
	// One page written whole: dense.
	if _, err := m.Update(2*pageLen, pageLen, nextKey, 0, 1000); err != nil {
		t.Fatal(err)
	}
	md.update(2*pageLen, pageLen, nextKey, 0, false, 1000)
	if err := m.AddObject(nextKey+1, 0); err != nil {
		t.Fatal(err)
	}
	md.total[nextKey+1] = 0
	return m, md
}

func TestMarshalRoundTrip(t *testing.T) {
	for seed := uint64(0); seed < 5; seed++ {
		m, md := sampleMap(t, seed)
		data, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		m2, err := UnmarshalBinary(data)
		if err != nil {
			t.Fatal(err)
		}
		check(t, m2, md)
		if m2.page(2).d == nil {
			t.Fatal("full page decoded sparse")
		}
		// Serialization is deterministic: the decoded map encodes the same.
		data2, err := m2.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if string(data) != string(data2) {
			t.Fatal("re-encoding the decoded map differs")
		}
	}
}

func TestMarshalCompact(t *testing.T) {
	// An empty 1 TiB map serializes to a few bytes.
	m := mustNew(t, 1<<40/4096)
	data, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if len(data) > 32 {
		t.Fatalf("empty map serializes to %d bytes", len(data))
	}
	// A sequential run from one object costs well under the 16 bytes of an
	// in-memory entry.
	if _, err := m.Update(0, 16*pageLen, 1, 0, 7); err == nil {
		t.Fatal("offsets past MaxOff accepted")
	}
	for i := int64(0); i < 8; i++ {
		if _, err := m.Update(i*pageLen, pageLen, i, 0, uint64(i+1)); err != nil {
			t.Fatal(err)
		}
	}
	data, err = m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if per := float64(len(data)) / float64(8*pageLen); per > 5 {
		t.Fatalf("sequential map serializes to %.1f bytes per block", per)
	}
}

func TestUnmarshalRejectsCorruption(t *testing.T) {
	m, _ := sampleMap(t, 1)
	data, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	for n := 0; n < len(data); n++ {
		if _, err := UnmarshalBinary(data[:n]); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated to %d of %d bytes: err = %v, want ErrCorrupt", n, len(data), err)
		}
	}
	rng := rand.New(rand.NewPCG(5, 5))
	for i := 0; i < 2000; i++ {
		bad := append([]byte(nil), data...)
		bad[rng.IntN(len(bad))] ^= byte(1 + rng.IntN(255))
		if _, err := UnmarshalBinary(bad); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("flipped byte: err = %v, want ErrCorrupt", err)
		}
	}
}

// withCRC returns body framed with magic and a valid checksum, so that
// structural corruption reaches the decoder instead of the checksum test.
func withCRC(body []byte) []byte {
	b := append([]byte(magic), body...)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

func TestUnmarshalRejectsBadStructure(t *testing.T) {
	enc := func(vs ...uint64) []byte {
		var b []byte
		for _, v := range vs {
			b = binary.AppendUvarint(b, v)
		}
		return b
	}
	empty := enc(formatVersion, 100, 0, 0)
	if _, err := UnmarshalBinary(withCRC(empty)); err != nil {
		t.Fatalf("valid empty map rejected: %v", err)
	}
	// One object (key 3), one page with one entry at block 5 of key 3.
	good := enc(formatVersion, 100, 1, 3, 10, 1, 0, 0, 5, zigzag(3)<<1, zigzag(0), zigzag(9))
	m, err := UnmarshalBinary(withCRC(good))
	if err != nil {
		t.Fatalf("valid map rejected: %v", err)
	}
	if es := lookup(m, 5, 1); len(es) != 1 || es[0] != (Extent{Block: 5, N: 1, Key: 3, Off: 0}) || m.Seq(5) != 9 {
		t.Fatalf("decoded entry = %+v seq %d", es, m.Seq(5))
	}
	wantLive(t, m, 3, 1, 10)
	for name, body := range map[string][]byte{
		"version":         enc(2, 100, 0, 0),
		"huge device":     enc(formatVersion, MaxBlocks+1, 0, 0),
		"object count":    enc(formatVersion, 100, 1000, 0),
		"page count":      enc(formatVersion, 100, 0, 5),
		"page past end":   enc(formatVersion, 100, 1, 3, 10, 1, 1, 0, 5, zigzag(3)<<1, 0, 0),
		"block past end":  enc(formatVersion, 100, 1, 3, 10, 1, 0, 0, 100, zigzag(3)<<1, 0, 0),
		"untracked key":   enc(formatVersion, 100, 1, 3, 10, 1, 0, 0, 5, zigzag(4)<<1, 0, 0),
		"negative key":    enc(formatVersion, 100, 1, 3, 10, 1, 0, 0, 5, zigzag(-3)<<1, 0, 0),
		"offset too big":  enc(formatVersion, 100, 1, 3, 10, 1, 0, 0, 5, zigzag(3)<<1, zigzag(MaxOff+1), 0),
		"too many in pg":  enc(formatVersion, 100, 1, 3, 10, 1, 0, pageLen, 5, zigzag(3)<<1, 0, 0),
		"trailing bytes":  append(enc(formatVersion, 100, 0, 0), 0),
		"truncated entry": enc(formatVersion, 100, 1, 3, 10, 1, 0, 1, 5, zigzag(3)<<1, 0, 0),
	} {
		if _, err := UnmarshalBinary(withCRC(body)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: err = %v, want ErrCorrupt", name, err)
		}
	}
}

func FuzzUnmarshal(f *testing.F) {
	// Small seeds: the fuzzer mutates large inputs slowly.
	for seed := uint64(0); seed < 3; seed++ {
		m := mustNew(f, 3*pageLen+100)
		rng := rand.New(rand.NewPCG(seed, 1))
		for i := int64(0); i < 30; i++ {
			block, n := rng.Int64N(m.Blocks()-8), 1+rng.Int64N(8)
			var err error
			if i%7 == 3 {
				_, err = m.UpdateZero(block, n, i, uint64(i))
			} else {
				_, err = m.Update(block, n, i, rng.Int64N(100), uint64(i))
			}
			if err != nil {
				f.Fatal(err)
			}
		}
		if err := m.AddObject(40, 0); err != nil {
			f.Fatal(err)
		}
		data, err := m.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, data []byte) {
		// Both as given (mostly stopped by the checksum) and with a valid
		// checksum, so that the decoder itself is exercised.
		for _, in := range [][]byte{data, withCRC(data)} {
			m, err := UnmarshalBinary(in)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("error %v does not wrap ErrCorrupt", err)
				}
				continue
			}
			// Whatever decodes must be self-consistent: it re-encodes to
			// something that decodes to the same encoding.
			out, err := m.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			m2, err := UnmarshalBinary(out)
			if err != nil {
				t.Fatalf("re-encoded map does not decode: %v", err)
			}
			out2, _ := m2.MarshalBinary()
			if string(out) != string(out2) {
				t.Fatal("encoding is not stable")
			}
			var live = map[int64]int64{}
			m.Scan(0, m.Blocks(), func(e Extent, _ uint64) bool {
				live[e.Key] += e.N
				return true
			})
			m.Objects(func(key, l, _ int64) bool {
				if live[key] != l {
					t.Fatalf("key %d: live %d, entries %d", key, l, live[key])
				}
				return true
			})
		}
	})
}
