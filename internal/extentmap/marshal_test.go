package extentmap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/bs3/bs3/internal/crc32c"
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
	// One page written whole: a single run.
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

// reload serializes m and decodes it again, failing t on any error.
func reload(t testing.TB, m *Map) *Map {
	t.Helper()
	data, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	m2, err := UnmarshalBinary(data)
	if err != nil {
		t.Fatalf("decode the serialized map: %v", err)
	}
	return m2
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
		if p := m2.page(2); p.rn == nil || len(p.rn.r) != 1 {
			t.Fatal("page written by one run does not decode as one run")
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
	return binary.LittleEndian.AppendUint32(b, crc32c.Checksum(b))
}

func TestUnmarshalRejectsBadStructure(t *testing.T) {
	enc := func(vs ...uint64) []byte {
		var b []byte
		for _, v := range vs {
			b = binary.AppendUvarint(b, v)
		}
		return b
	}
	empty := enc(version1, 100, 0, 0)
	if _, err := UnmarshalBinary(withCRC(empty)); err != nil {
		t.Fatalf("valid empty map rejected: %v", err)
	}
	// One object (key 3), one page with one entry at block 5 of key 3.
	good := enc(version1, 100, 1, 3, 10, 1, 0, 0, 5, zigzag(3)<<1, zigzag(0), zigzag(9))
	m, err := UnmarshalBinary(withCRC(good))
	if err != nil {
		t.Fatalf("valid map rejected: %v", err)
	}
	if es := lookup(m, 5, 1); len(es) != 1 || es[0] != (Extent{Block: 5, N: 1, Key: 3, Off: 0}) || m.Seq(5) != 9 {
		t.Fatalf("decoded entry = %+v seq %d", es, m.Seq(5))
	}
	wantLive(t, m, 3, 1, 10)
	for name, body := range map[string][]byte{
		"version":         enc(formatVersion+1, 100, 0, 0),
		"huge device":     enc(version1, MaxBlocks+1, 0, 0),
		"object count":    enc(version1, 100, 1000, 0),
		"page count":      enc(version1, 100, 0, 5),
		"page past end":   enc(version1, 100, 1, 3, 10, 1, 1, 0, 5, zigzag(3)<<1, 0, 0),
		"block past end":  enc(version1, 100, 1, 3, 10, 1, 0, 0, 100, zigzag(3)<<1, 0, 0),
		"untracked key":   enc(version1, 100, 1, 3, 10, 1, 0, 0, 5, zigzag(4)<<1, 0, 0),
		"negative key":    enc(version1, 100, 1, 3, 10, 1, 0, 0, 5, zigzag(-3)<<1, 0, 0),
		"offset too big":  enc(version1, 100, 1, 3, 10, 1, 0, 0, 5, zigzag(3)<<1, zigzag(MaxOff+1), 0),
		"too many in pg":  enc(version1, 100, 1, 3, 10, 1, 0, pageLen, 5, zigzag(3)<<1, 0, 0),
		"trailing bytes":  append(enc(version1, 100, 0, 0), 0),
		"truncated entry": enc(version1, 100, 1, 3, 10, 1, 0, 1, 5, zigzag(3)<<1, 0, 0),
		// The stored entry count is count-1: 2^64-1 must not wrap to an
		// empty page.
		"empty page":        enc(version1, 100, 1, 3, 10, 1, 0, math.MaxUint64, 5, zigzag(3)<<1, 0, 0),
		"huge page count":   enc(version1, 100, 1, 3, 10, math.MaxUint64, 0, 0, 5, zigzag(3)<<1, 0, 0),
		"huge object count": enc(version1, 100, math.MaxUint64, 3, 10, 0),
		// After key MaxKey no further key exists; a delta of 2^64-1 would
		// repeat it and 2^64-2 would go back.
		"key repeated":  enc(version1, 100, 2, MaxKey, 1, math.MaxUint64, 2, 0),
		"key descends":  enc(version1, 100, 3, MaxKey, 1, math.MaxUint64-1, 2, 0, 3, 0),
		"key past max":  enc(version1, 100, 2, MaxKey-1, 1, 1, 2, 0),
		"padded varint": append(enc(version1, 100, 0), 0x80, 0x00),
		"total too big": enc(version1, 100, 1, 3, MaxOff+2, 0),
		"second page not after first": enc(version1, 2*pageLen, 1, 3, 10, 2,
			1, 0, 5, zigzag(3)<<1, 0, 0,
			math.MaxUint64, 0, 6, zigzag(3)<<1, 0, 0),
	} {
		if _, err := UnmarshalBinary(withCRC(body)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: err = %v, want ErrCorrupt", name, err)
		}
	}
}

// TestUnmarshalRejectsBadRuns covers the checks of version 3 runs.
func TestUnmarshalRejectsBadRuns(t *testing.T) {
	enc := func(vs ...uint64) []byte {
		var b []byte
		for _, v := range vs {
			b = binary.AppendUvarint(b, v)
		}
		return b
	}
	// Header: device of 100 blocks (or two pages), one object (key 3, 10
	// blocks, data start 0), one page (index 0) with runs.
	head := func(blocks uint64, runs uint64) []uint64 {
		return []uint64{formatVersion, blocks, 1, 3, 10, 0, 1, 0, runs - 1}
	}
	body := func(blocks, runs uint64, vs ...uint64) []byte {
		return enc(append(head(blocks, runs), vs...)...)
	}
	// Blocks 5..9 of key 3 at offsets 0..4, seq 9; blocks 10..11 tombstones.
	good := body(100, 2, 5<<1|1, 3, zigzag(3)<<1, zigzag(0), zigzag(9), 0<<1|1, 0, 1, zigzag(0))
	m, err := UnmarshalBinary(withCRC(good))
	if err != nil {
		t.Fatalf("valid map rejected: %v", err)
	}
	want := []Extent{{Block: 4, N: 1, Key: -1}, {Block: 5, N: 5, Key: 3}, {Block: 10, N: 2, Key: 3, Zero: true}, {Block: 12, N: 1, Key: -1}}
	if es := lookup(m, 4, 9); !slices.Equal(es, want) || m.Seq(9) != 9 || m.Seq(11) != 9 {
		t.Fatalf("decoded = %+v seq %d", es, m.Seq(9))
	}
	wantLive(t, m, 3, 7, 10)
	for name, b := range map[string][]byte{
		"gap past page":        body(2*pageLen, 1, pageLen<<1, zigzag(3)<<1, 0, 0),
		"run past page":        body(2*pageLen, 1, (pageLen-10)<<1|1, 9, zigzag(3)<<1, 0, 0),
		"huge run length":      body(2*pageLen, 1, 1, math.MaxUint64, zigzag(3)<<1, 0, 0),
		"run past device":      body(100, 1, 95<<1|1, 4, zigzag(3)<<1, 0, 0),
		"offsets past max":     body(100, 1, 5<<1|1, 3, zigzag(3)<<1, zigzag(MaxOff-2), 0),
		"negative offset":      body(100, 1, 5<<1, zigzag(3)<<1, zigzag(-1), 0),
		"untracked key":        body(100, 1, 5<<1, zigzag(4)<<1, 0, 0),
		"second gap past page": body(2*pageLen, 2, 5<<1|1, 3, zigzag(3)<<1, 0, 0, (pageLen-10)<<1, zigzag(0)<<1, 0, 0),
		// Runs are maximal: a run that continues the previous one (same
		// key, next offsets, same seqno; or tombstones of one key and
		// seqno) has a second encoding as one run.
		"data not merged": body(100, 2, 5<<1|1, 3, zigzag(3)<<1, 0, zigzag(9), 0, zigzag(0)<<1, 0, 0),
		"zero not merged": body(100, 2, 5<<1, zigzag(3)<<1|1, zigzag(9), 0, zigzag(0)<<1|1, 0),
		"truncated run":   body(100, 2, 5<<1, zigzag(3)<<1, 0, 0),
	} {
		if _, err := UnmarshalBinary(withCRC(b)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: err = %v, want ErrCorrupt", name, err)
		}
	}
	// The same runs one block apart, or with another seqno, are valid.
	for name, b := range map[string][]byte{
		"data apart": body(100, 2, 5<<1|1, 3, zigzag(3)<<1, 0, zigzag(9), 1<<1, zigzag(0)<<1, 0, 0),
		"zero seqs":  body(100, 2, 5<<1, zigzag(3)<<1|1, zigzag(9), 0, zigzag(0)<<1|1, zigzag(1)),
	} {
		if _, err := UnmarshalBinary(withCRC(b)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// encodeV2 serializes m in body version 2 (one entry per written block),
// as bs3 wrote checkpoints before version 3: it checks that those still
// load.
func encodeV2(m *Map) []byte {
	b := m.appendHeader(nil, 2) // the header did not change in version 3
	prevPage := int64(-1)
	for pi := int64(0); pi<<pageShift < m.blocks; pi++ {
		p := m.page(pi)
		if p == nil {
			continue
		}
		b = binary.AppendUvarint(b, uint64(pi-prevPage-1))
		b = binary.AppendUvarint(b, uint64(p.n-1))
		prevPage = pi
		prevIdx, prevKey, prevOff := int64(-1), int64(0), int64(-1)
		var prevSeq uint64
		p.eachRun(func(r runEntry) bool {
			for idx := int(r.idx); idx < r.end(); idx++ {
				key, off := r.key(), r.offAt(idx)
				b = binary.AppendUvarint(b, uint64(int64(idx)-prevIdx-1))
				zero := uint64(0)
				if off == zeroOff {
					zero = 1
				}
				b = binary.AppendUvarint(b, zigzag(key-prevKey)<<1|zero)
				if zero == 0 {
					b = binary.AppendUvarint(b, zigzag(off-prevOff-1))
					prevOff = off
				}
				b = binary.AppendUvarint(b, zigzag(int64(r.seq-prevSeq)))
				prevIdx, prevKey, prevSeq = int64(idx), key, r.seq
			}
			return true
		})
	}
	return binary.LittleEndian.AppendUint32(b, crc32c.Checksum(b))
}

// TestDecodeVersion2 loads version 2 bodies (what existing volumes'
// checkpoints hold) and checks them against the model; they re-encode as
// the version 3 encoding of the same map.
func TestDecodeVersion2(t *testing.T) {
	for seed := uint64(0); seed < 5; seed++ {
		m, md := sampleMap(t, seed)
		v2 := encodeV2(m)
		m2, err := UnmarshalBinary(v2)
		if err != nil {
			t.Fatalf("seed %d: version 2 body rejected: %v", seed, err)
		}
		check(t, m2, md)
		v3, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		re, err := m2.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(re, v3) {
			t.Fatalf("seed %d: decoded version 2 body re-encodes differently from the map", seed)
		}
		if len(v3) >= len(v2) {
			t.Errorf("seed %d: version 3 body %d bytes, version 2 %d", seed, len(v3), len(v2))
		}
	}
}

// field is one varint of a serialized body (between magic and checksum).
type field struct {
	name       string
	start, end int
}

// fields lists the varints of a valid body in order, named by their role.
func fields(t testing.TB, body []byte) []field {
	t.Helper()
	var fs []field
	pos := 0
	next := func(name string) uint64 {
		v, n := binary.Uvarint(body[pos:])
		if n <= 0 {
			t.Fatalf("fields: bad varint for %s at %d", name, pos)
		}
		fs = append(fs, field{name, pos, pos + n})
		pos += n
		return v
	}
	version := next("version")
	next("blocks")
	objs := next("object count")
	for i := uint64(0); i < objs; i++ {
		next("object key delta")
		next("object total")
		if version != version1 {
			next("object data start")
		}
	}
	pages := next("page count")
	for i := uint64(0); i < pages; i++ {
		next("page index delta")
		n := next("page entry count-1") + 1
		for j := uint64(0); j < n; j++ {
			if version != formatVersion {
				next("entry index delta")
				if next("entry key")&1 == 0 {
					next("entry offset")
				}
				next("entry seq")
				continue
			}
			if next("run gap")&1 == 1 {
				next("run length-2")
			}
			if next("run key")&1 == 0 {
				next("run offset")
			}
			next("run seq")
		}
	}
	if pos != len(body) {
		t.Fatalf("fields: %d trailing bytes", len(body)-pos)
	}
	return fs
}

// withField returns body with field f replaced by the varint v.
func withField(body []byte, f field, v uint64) []byte {
	b := append([]byte(nil), body[:f.start]...)
	b = binary.AppendUvarint(b, v)
	return append(b, body[f.end:]...)
}

// unmarshalNoPanic is UnmarshalBinary with a panic turned into a test
// failure that names the input.
func unmarshalNoPanic(t *testing.T, data []byte, what string) (m *Map, err error) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("%s: UnmarshalBinary panicked: %v", what, r)
		}
	}()
	return UnmarshalBinary(data)
}

// TestUnmarshalPageEntryCountOverflow is the case from the integrity issue:
// a checksum-valid map whose page entry count is 2^64-1 must be rejected,
// not crash the daemon, so that recovery can fall back to the previous
// checkpoint.
func TestUnmarshalPageEntryCountOverflow(t *testing.T) {
	m, _ := sampleMap(t, 1)
	data, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	body := data[len(magic) : len(data)-4]
	patched := 0
	for _, f := range fields(t, body) {
		if f.name != "page count" && f.name != "page entry count-1" {
			continue
		}
		bad := withCRC(withField(body, f, math.MaxUint64))
		what := fmt.Sprintf("%s at byte %d = 2^64-1", f.name, f.start)
		if _, err := unmarshalNoPanic(t, bad, what); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("%s: err = %v, want ErrCorrupt", what, err)
		}
		patched++
	}
	if patched < 3 {
		t.Fatalf("sample map has only %d page count fields", patched)
	}
}

// TestUnmarshalPatchedFields replaces every field of real encodings, one
// at a time and under a valid checksum, by huge and boundary values: the
// decoder must reject or return a usable map, never panic.
func TestUnmarshalPatchedFields(t *testing.T) {
	values := []uint64{0, 1, 2, pageLen - 1, pageLen, pageLen + 1, MaxOff + 1, MaxOff + 2,
		math.MaxUint32, MaxKey, MaxKey + 1, MaxBlocks, math.MaxInt64, 1 << 63, math.MaxUint64 - 1, math.MaxUint64}
	for _, sm := range seedMaps(t) {
		data, err := sm.m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		body := data[len(magic) : len(data)-4]
		// The first few fields of each kind and the last field: enough to
		// reach every branch without patching thousands of entries.
		seen := map[string]int{}
		fs := fields(t, body)
		for i, f := range fs {
			if seen[f.name]++; seen[f.name] > 3 && i != len(fs)-1 {
				continue
			}
			for _, v := range values {
				what := fmt.Sprintf("%s: %s at byte %d = %d", sm.name, f.name, f.start, v)
				m, err := unmarshalNoPanic(t, withCRC(withField(body, f, v)), what)
				if err != nil {
					if !errors.Is(err, ErrCorrupt) {
						t.Fatalf("%s: error %v does not wrap ErrCorrupt", what, err)
					}
					continue
				}
				// Only a seqno may be that large: every other field is a
				// count, index, key or offset with a small range.
				if v >= 1<<63 && f.name != "entry seq" && f.name != "run seq" {
					t.Fatalf("%s: accepted", what)
				}
				exerciseDecoded(t, m, v)
			}
		}
	}
}

func TestMarshalRefusesEmptyPage(t *testing.T) {
	m := mustNew(t, 100)
	mustUpdate(t, m, 5, 1, 3, 0, 1, 1)
	if _, err := m.MarshalBinary(); err != nil {
		t.Fatal(err)
	}
	// A page without entries cannot be expressed (the count is stored
	// minus one); the encoder must refuse rather than write a checkpoint
	// that never loads.
	m.page(0).n = 0
	if _, err := m.MarshalBinary(); err == nil {
		t.Fatal("page without entries encoded")
	}
}

func TestAddObjectTotalBound(t *testing.T) {
	m := mustNew(t, 100)
	if err := m.AddObject(1, MaxOff+2); !errors.Is(err, ErrRange) {
		t.Fatalf("total MaxOff+2: err = %v, want ErrRange", err)
	}
	if err := m.AddObject(1, MaxOff+1); err != nil {
		t.Fatal(err)
	}
	wantLive(t, reload(t, m), 1, 0, MaxOff+1) // the largest total round-trips
}

// seedMap is a map of one shape for seeding and patching.
type seedMap struct {
	name string
	m    *Map
}

// seedMaps returns small maps of the shapes the decoder must handle: empty,
// sparse and dense pages, tombstones, many objects across counter chunks,
// keys at the top of the range, the last partial page of the device.
func seedMaps(t testing.TB) []seedMap {
	t.Helper()
	var out []seedMap
	add := func(name string, blocks int64, fill func(m *Map)) {
		m := mustNew(t, blocks)
		fill(m)
		out = append(out, seedMap{name, m})
	}
	add("no blocks", 0, func(*Map) {})
	add("empty", 100, func(*Map) {})
	add("sparse", 3*pageLen+100, func(m *Map) {
		mustUpdate(t, m, 7, 3, 2, 10, 5, 3)
		mustUpdate(t, m, pageLen+1, 1, 4, 0, 6, 1)
		mustZero(t, m, pageLen+9, 2, 5, 7, 2)
		mustUpdate(t, m, 3*pageLen+99, 1, 5, 3, 8, 1) // last block
	})
	add("dense", 2*pageLen, func(m *Map) {
		mustUpdate(t, m, pageLen, pageLen, 9, 0, 3, pageLen)
		mustZero(t, m, pageLen+100, 50, 10, 4, 50)
		if err := m.AddObject(9, pageLen); err != nil {
			t.Fatal(err)
		}
	})
	add("many objects", pageLen, func(m *Map) {
		for k := int64(0); k < 300; k++ {
			if k%3 == 0 {
				mustUpdate(t, m, k, 1, k, k%7, uint64(k), 1)
			}
			if err := m.AddObject(k, k%5); err != nil {
				t.Fatal(err)
			}
		}
		// A key in another mid-level table.
		mustUpdate(t, m, 400, 2, 1<<objShift<<midShift+3, 0, 1000, 2)
	})
	add("runs", 3*pageLen+100, func(m *Map) {
		// Sequential 1 MiB items (256 blocks) across a page boundary, a
		// write and a discard in the middle of a run, and a GC copy with
		// the original seqno.
		for i := int64(0); i < 6; i++ {
			mustUpdate(t, m, pageLen-512+i*256, 256, 20+i/4, i%4*256, uint64(10+i), 256)
		}
		mustUpdate(t, m, pageLen+10, 3, 30, 7, 20, 3)
		mustZero(t, m, pageLen+300, 40, 31, 21, 40)
		mustUpdate(t, m, 3*pageLen+50, 50, 32, MaxOff-49, 22, 50)
		if err := m.AddObject(20, 1024); err != nil {
			t.Fatal(err)
		}
	})
	add("top keys", 600, func(m *Map) {
		mustUpdate(t, m, 10, 2, MaxKey, MaxOff-1, math.MaxUint64, 2)
		mustZero(t, m, 20, 1, MaxKey-1, 1, 1)
		if err := m.AddObject(MaxKey-2, 0); err != nil {
			t.Fatal(err)
		}
	})
	for seed := uint64(0); seed < 2; seed++ {
		add(fmt.Sprintf("random %d", seed), 3*pageLen+100, func(m *Map) {
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
					t.Fatal(err)
				}
			}
			if err := m.AddObject(40, 0); err != nil {
				t.Fatal(err)
			}
		})
	}
	return out
}

// exerciseDecoded checks that a map that decoded is consistent and usable:
// counters match the pages, live counts match the entries, lookups cover
// what they are asked, updates, GC queries and a round trip work.
func exerciseDecoded(t *testing.T, m *Map, seed uint64) {
	t.Helper()
	checkInternals(t, m)
	live := map[int64]int64{}
	var written int64
	var extents []Extent
	m.Scan(0, m.Blocks(), func(e Extent, _ uint64) bool {
		live[e.Key] += e.N
		written += e.N
		if len(extents) < 32 {
			extents = append(extents, e)
		}
		return true
	})
	if written != m.WrittenBlocks() {
		t.Fatalf("scan finds %d written blocks, map counts %d", written, m.WrittenBlocks())
	}
	var keys []int64
	m.Objects(func(key, l, total int64) bool {
		if l != live[key] || total < 0 || total > MaxOff+1 {
			t.Fatalf("key %d: live %d total %d, entries %d", key, l, total, live[key])
		}
		keys = append(keys, key)
		return true
	})
	if int64(len(keys)) != m.TrackedObjects() {
		t.Fatalf("Objects lists %d keys, TrackedObjects %d", len(keys), m.TrackedObjects())
	}
	for k := range live {
		if _, _, ok := m.Live(k); !ok {
			t.Fatalf("entries reference untracked key %d", k)
		}
	}
	rng := rand.New(rand.NewPCG(seed, uint64(m.Blocks())))
	lookupCovers := func(block, n int64) {
		pos := block
		m.Lookup(block, n, func(e Extent) {
			if e.Block != pos || e.N <= 0 {
				t.Fatalf("Lookup(%d, %d): extent %+v at %d", block, n, e, pos)
			}
			pos += e.N
		})
		if pos != block+n {
			t.Fatalf("Lookup(%d, %d) covered up to %d", block, n, pos)
		}
	}
	for _, e := range extents {
		lookupCovers(e.Block-1, e.N+2)
		m.Seq(e.Block)
	}
	if m.Blocks() == 0 {
		return
	}
	for i := 0; i < 8; i++ {
		block := rng.Int64N(m.Blocks())
		n := 1 + rng.Int64N(min(m.Blocks()-block, 2*pageLen))
		lookupCovers(block, n)
		key := int64(0)
		switch {
		case len(keys) > 0 && i%3 == 0:
			key = keys[rng.IntN(len(keys))]
		case len(keys) > 0 && i%3 == 1:
			key = min(keys[len(keys)-1]+1, MaxKey)
		}
		var err error
		if i%4 == 3 {
			_, err = m.UpdateZero(block, n, key, rng.Uint64())
		} else {
			_, err = m.Update(block, n, key, rng.Int64N(MaxOff+2-n), rng.Uint64())
		}
		// A key far from the tracked ones may be refused; nothing else.
		if err != nil && !errors.Is(err, ErrRange) {
			t.Fatalf("update after decode: %v", err)
		}
	}
	checkInternals(t, m)
	for _, k := range m.Dead(math.MaxInt64) {
		if err := m.Forget(k); err != nil {
			t.Fatalf("forget dead key %d: %v", k, err)
		}
	}
	if m.Blocks()+pageLen <= MaxBlocks {
		if err := m.Grow(m.Blocks() + pageLen); err != nil {
			t.Fatal(err)
		}
	}
	_ = m.HeapBytes()
	out, err := m.MarshalBinary()
	if err != nil {
		t.Fatalf("encode after decode and updates: %v", err)
	}
	m2, err := UnmarshalBinary(out)
	if err != nil {
		t.Fatalf("re-encoded map does not decode: %v", err)
	}
	checkInternals(t, m2)
}

// fixCRC returns a copy of a serialized map with its checksum recomputed,
// or nil if it is too short to have one.
func fixCRC(data []byte) []byte {
	if len(data) < len(magic)+4 {
		return nil
	}
	b := append([]byte(nil), data[:len(data)-4]...)
	return binary.LittleEndian.AppendUint32(b, crc32c.Checksum(b))
}

func FuzzUnmarshal(f *testing.F) {
	// Seeds are mostly bodies (between magic and checksum), which the
	// harness frames with a valid checksum: mutations then reach the
	// decoder's structure checks instead of dying at the checksum. Small
	// seeds: the fuzzer mutates large inputs slowly.
	for i, sm := range seedMaps(f) {
		data, err := sm.m.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data[len(magic) : len(data)-4])
		if i == 2 {
			f.Add(data)
		}
		if v2 := encodeV2(sm.m); i%2 == 0 {
			f.Add(v2[len(magic) : len(v2)-4])
		}
	}
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, data []byte) {
		// As given (mostly stopped by the magic or the checksum), with the
		// checksum of a whole serialized map recomputed, and as a body
		// framed with magic and checksum.
		for _, in := range [][]byte{data, fixCRC(data), withCRC(data)} {
			if in == nil {
				continue
			}
			m, err := UnmarshalBinary(in)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("error %v does not wrap ErrCorrupt", err)
				}
				continue
			}
			// Whatever decodes must be canonical: it re-encodes to the
			// same bytes, which the format's strictly ascending keys,
			// pages and indices make unique.
			out, err := m.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			// A version 1 or 2 body re-encodes as the current version;
			// that one must be canonical.
			if version, _ := binary.Uvarint(in[len(magic):]); version != formatVersion {
				in = out
				m2, err := UnmarshalBinary(out)
				if err != nil {
					t.Fatalf("re-encoded version %d body does not decode: %v", version, err)
				}
				if out, err = m2.MarshalBinary(); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(out[len(magic):len(out)-4], in[len(magic):len(in)-4]) {
				t.Fatalf("decoded map re-encodes differently")
			}
			exerciseDecoded(t, m, uint64(len(data)))
		}
	})
}

// patchValue derives a field's replacement from the old value and a fuzz
// argument whose low 3 bits pick a mode and whose rest k is small: the
// fuzzer steps integers by at most 100, so boundary values such as 2^64-1
// must be one step away rather than 2^64 steps.
func patchValue(old, v uint64) uint64 {
	k := v >> 3
	switch v & 7 {
	case 0:
		return k
	case 1:
		return old + k
	case 2:
		return old - k // wraps below zero on purpose
	case 3:
		return math.MaxUint64 - k
	case 4:
		return 1<<(k%64) + k>>6
	case 5:
		return 1<<(k%64) - 1 - k>>6
	case 6:
		return math.MaxInt64 - k
	default:
		return old ^ 1<<(k%64)
	}
}

// FuzzUnmarshalFields mutates the structure rather than the bytes: it
// takes an encoding of one of the seed maps and replaces up to two of its
// fields by values derived with patchValue, then frames the result with a
// valid checksum. Byte mutation rarely turns a count into the ten-byte
// varint of 2^64-1.
func FuzzUnmarshalFields(f *testing.F) {
	type shape struct {
		name  string
		body  []byte
		kinds [][]field // fields grouped by name, so every kind is as easy to pick
	}
	var shapes []shape
	for i, sm := range seedMaps(f) {
		data, err := sm.m.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		body := data[len(magic) : len(data)-4]
		if i%3 == 2 {
			// Some shapes are version 2 bodies, which still decode.
			v2 := encodeV2(sm.m)
			body, sm.name = v2[len(magic):len(v2)-4], sm.name+" (version 2)"
		}
		byName := map[string]int{}
		var kinds [][]field
		for _, fd := range fields(f, body) {
			i, ok := byName[fd.name]
			if !ok {
				i = len(kinds)
				byName[fd.name] = i
				kinds = append(kinds, nil)
			}
			kinds[i] = append(kinds[i], fd)
		}
		shapes = append(shapes, shape{sm.name, body, kinds})
	}
	f.Add(uint8(2), uint16(0), uint64(formatVersion<<3), uint16(0), uint64(formatVersion<<3))
	f.Add(uint8(3), uint16(3), uint64(1), uint16(5), uint64(2))
	f.Add(uint8(4), uint16(4), uint64(7), uint16(900), uint64(3))
	f.Fuzz(func(t *testing.T, si uint8, k1 uint16, v1 uint64, k2 uint16, v2 uint64) {
		s := shapes[int(si)%len(shapes)]
		pick := func(k uint16) field {
			fs := s.kinds[int(k)%len(s.kinds)]
			return fs[int(k)/len(s.kinds)%len(fs)]
		}
		f1, f2 := pick(k1), pick(k2)
		if f2.start < f1.start {
			f1, f2, v1, v2 = f2, f1, v2, v1
		}
		old := func(fd field) uint64 {
			v, _ := binary.Uvarint(s.body[fd.start:])
			return v
		}
		// Patch the later field first so that the earlier one's offsets
		// stay valid.
		body := s.body
		if f2 != f1 {
			body = withField(body, f2, patchValue(old(f2), v2))
		}
		body = withField(body, f1, patchValue(old(f1), v1))
		what := fmt.Sprintf("%s: %s at %d, %s at %d", s.name, f1.name, f1.start, f2.name, f2.start)
		in := withCRC(body)
		m, err := unmarshalNoPanic(t, in, what)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("%s: error %v does not wrap ErrCorrupt", what, err)
			}
			return
		}
		out, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		// A version 1 or 2 body (a seed, or a patched version) re-encodes
		// as the current version: compare that one's decoding.
		if version, _ := binary.Uvarint(body); version != formatVersion {
			m2, err := UnmarshalBinary(out)
			if err != nil {
				t.Fatalf("%s: re-encoded version %d body does not decode: %v", what, version, err)
			}
			if out2, err := m2.MarshalBinary(); err != nil || !bytes.Equal(out2, out) {
				t.Fatalf("%s: re-encoded version %d body is not stable (%v)", what, version, err)
			}
		} else if !bytes.Equal(out, in) {
			t.Fatalf("%s: decoded map re-encodes differently", what)
		}
		exerciseDecoded(t, m, v1^v2)
	})
}

// Data starts of compact objects survive a checkpoint; a version 1 body,
// which has none, gives every object the layout's whole metadata area (0).
func TestDataStartRoundTrip(t *testing.T) {
	m, err := New(1000)
	if err != nil {
		t.Fatal(err)
	}
	starts := map[int64]int64{3: 0, 4: 64, 700: MaxDataStart, 701: 96}
	for k, s := range starts {
		if err := m.AddObject(k, 5); err != nil {
			t.Fatal(err)
		}
		if err := m.SetDataStart(k, s); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.SetDataStart(5, 64); err == nil {
		t.Fatal("data start of an untracked key accepted")
	}
	if err := m.SetDataStart(3, MaxDataStart+1); !errors.Is(err, ErrRange) {
		t.Fatalf("data start past MaxDataStart: err = %v, want ErrRange", err)
	}
	if _, err := m.Update(10, 2, 4, 1, 7); err != nil {
		t.Fatal(err)
	}
	raw, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	got, err := UnmarshalBinary(raw)
	if err != nil {
		t.Fatal(err)
	}
	for k, s := range starts {
		if d := got.DataStart(k); d != s {
			t.Errorf("key %d: data start %d after a round trip, want %d", k, d, s)
		}
	}
	// A key tracked again starts from the default.
	if err := got.Forget(700); err != nil {
		t.Fatal(err)
	}
	if err := got.AddObject(700, 1); err != nil {
		t.Fatal(err)
	}
	if d := got.DataStart(700); d != 0 {
		t.Errorf("re-tracked key 700 kept data start %d", d)
	}

	enc := func(vs ...uint64) []byte {
		var b []byte
		for _, v := range vs {
			b = binary.AppendUvarint(b, v)
		}
		return b
	}
	v1, err := UnmarshalBinary(withCRC(enc(version1, 100, 2, 3, 10, 0, 1, 0)))
	if err != nil {
		t.Fatalf("version 1 body rejected: %v", err)
	}
	if _, total, ok := v1.Live(4); !ok || total != 1 || v1.DataStart(4) != 0 || v1.DataStart(3) != 0 {
		t.Fatalf("version 1 body: key 4 total %d tracked %v, data starts %d %d", total, ok, v1.DataStart(3), v1.DataStart(4))
	}
	if _, err := UnmarshalBinary(withCRC(enc(formatVersion, 100, 1, 3, 10, MaxDataStart+1, 0))); err == nil {
		t.Fatal("data start past MaxDataStart decoded")
	}
}
