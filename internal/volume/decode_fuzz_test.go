package volume

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math"
	"testing"

	"github.com/bs3/bs3/internal/extentmap"
)

// The serialized map's framing: magic, body, CRC32C of magic and body.
const fzMapMagic = "BS3M"

var fzCastagnoli = crc32.MakeTable(crc32.Castagnoli)

// fzAppendCRC appends the CRC32C of b, little-endian, as both the map and
// the checkpoint envelope end.
func fzAppendCRC(b []byte) []byte {
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, fzCastagnoli))
}

// fzFixCRC returns a copy of b with its trailing checksum recomputed, or
// nil if b is too short to have one.
func fzFixCRC(b []byte) []byte {
	if len(b) < 4 {
		return nil
	}
	return fzAppendCRC(append([]byte(nil), b[:len(b)-4]...))
}

// fzFrameMap frames a map body with magic and a valid checksum.
func fzFrameMap(body []byte) []byte {
	return fzAppendCRC(append([]byte(fzMapMagic), body...))
}

// fzVarints encodes a map body by hand, field by field.
func fzVarints(vs ...uint64) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.AppendUvarint(b, v)
	}
	return b
}

// fzIssueBody is the map body of the integrity issue: one object (key 3,
// 10 blocks) and one page whose stored entry count (count-1) is 2^64-1,
// followed by one well-formed entry.
func fzIssueBody() []byte {
	return fzVarints(1, 100, 1, 3, 10, 1, 0, math.MaxUint64, 5, 3<<2, 0, 0)
}

// fzMaps returns serialized maps of several shapes.
func fzMaps(t testing.TB) [][]byte {
	t.Helper()
	var out [][]byte
	add := func(blocks int64, fill func(m *extentmap.Map) error) {
		m, err := extentmap.New(blocks)
		if err != nil {
			t.Fatal(err)
		}
		if err := fill(m); err != nil {
			t.Fatal(err)
		}
		b, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	add(0, func(*extentmap.Map) error { return nil })
	add(100, func(*extentmap.Map) error { return nil })
	add(3*4096+100, func(m *extentmap.Map) error { // sparse pages, tombstones
		_, err1 := m.Update(7, 3, 2, 10, 5)
		_, err2 := m.UpdateZero(4096+9, 2, 5, 7)
		_, err3 := m.Update(3*4096+99, 1, 5, 3, 8)
		return errors.Join(err1, err2, err3, m.AddObject(6, 0))
	})
	add(2*4096, func(m *extentmap.Map) error { // one dense page
		_, err1 := m.Update(4096, 4096, 9, 0, 3)
		_, err2 := m.UpdateZero(4096+100, 50, 10, 4)
		return errors.Join(err1, err2, m.AddObject(9, 4096))
	})
	add(3*4096, func(m *extentmap.Map) error { // runs: sequential 1 MiB items, overwritten in the middle
		var errs []error
		for i := int64(0); i < 12; i++ {
			_, err := m.Update(i*256, 256, i/4, i%4*256, uint64(i+1))
			errs = append(errs, err)
		}
		_, err1 := m.Update(300, 5, 3, 9, 20)
		_, err2 := m.UpdateZero(1000, 100, 3, 21)
		return errors.Join(append(errs, err1, err2)...)
	})
	add(4096, func(m *extentmap.Map) error { // many objects
		var errs []error
		for k := int64(0); k < 300; k++ {
			if k%3 == 0 {
				_, err := m.Update(k, 1, k, k%7, uint64(k))
				errs = append(errs, err)
			}
			errs = append(errs, m.AddObject(k, k%5))
		}
		return errors.Join(errs...)
	})
	return out
}

// fzCheckCheckpoint decodes a checkpoint object and, if the envelope is
// accepted, the map inside it: both must reject bad input with an error,
// never panic, and whatever they accept must be usable.
func fzCheckCheckpoint(t *testing.T, in []byte) {
	t.Helper()
	var (
		h       ckptHeader
		payload []byte
		err     error
	)
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Fatalf("decodeCheckpoint of %d bytes panicked: %v", len(in), r)
			}
		}()
		h, payload, err = decodeCheckpoint(in)
	}()
	if err != nil {
		return
	}
	if int64(len(payload)) != h.mapLen || len(payload) >= len(in) || !bytes.Contains(in, payload) {
		t.Fatalf("decodeCheckpoint: map of %d bytes, header says %d, object has %d", len(payload), h.mapLen, len(in))
	}
	// The envelope round-trips.
	h2, p2, err := decodeCheckpoint(encodeCheckpoint(h, payload))
	if err != nil || h2 != h || !bytes.Equal(p2, payload) {
		t.Fatalf("re-encoded checkpoint decodes to %+v, %v (was %+v)", h2, err, h)
	}
	var m *extentmap.Map
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Fatalf("UnmarshalBinary of a checkpoint with a valid checksum panicked: %v", r)
			}
		}()
		m, err = extentmap.UnmarshalBinary(payload)
	}()
	if err != nil {
		if !errors.Is(err, extentmap.ErrCorrupt) {
			t.Fatalf("map error %v does not wrap extentmap.ErrCorrupt", err)
		}
		return
	}
	// What recovery would do with the map next must work: look blocks
	// up, scan, apply an object, list dead objects, checkpoint again.
	blocks := m.Blocks()
	var last int64 = -1
	m.Objects(func(key, _, _ int64) bool {
		last = key
		return true
	})
	m.Scan(0, blocks, func(extentmap.Extent, uint64) bool { return true })
	n := min(blocks, 3*4096)
	pos := int64(0)
	m.Lookup(0, n, func(e extentmap.Extent) {
		if e.Block != pos || e.N <= 0 {
			t.Fatalf("Lookup(0, %d): extent %+v at %d", n, e, pos)
		}
		pos += e.N
	})
	if pos != n {
		t.Fatalf("Lookup(0, %d) covered %d blocks", n, pos)
	}
	if next := last + 1; next <= extentmap.MaxKey && blocks > 0 {
		if err := m.AddObject(next, 1); err != nil && !errors.Is(err, extentmap.ErrRange) {
			t.Fatalf("add object %d: %v", next, err)
		} else if err == nil {
			if _, err := m.Update(blocks-1, 1, next, 0, math.MaxUint64); err != nil {
				t.Fatalf("apply object %d: %v", next, err)
			}
		}
	}
	m.Dead(math.MaxInt64)
	out, err := m.MarshalBinary()
	if err != nil {
		t.Fatalf("serialize decoded map: %v", err)
	}
	if _, err := extentmap.UnmarshalBinary(out); err != nil {
		t.Fatalf("decoded map re-serializes to something that does not decode: %v", err)
	}
}

// TestCheckpointPageCountOverflow is the case from the integrity issue: a
// checkpoint whose checksums (envelope and map) are valid but whose map
// has a page entry count of 2^64-1 must be reported as unusable, so that
// recovery falls back to the previous checkpoint, instead of panicking.
func TestCheckpointPageCountOverflow(t *testing.T) {
	obj := encodeCheckpoint(ckptHeader{generation: 1, blockSize: 4096, watermark: 4}, fzFrameMap(fzIssueBody()))
	_, payload, err := decodeCheckpoint(obj)
	if err != nil {
		t.Fatalf("envelope with a valid checksum rejected: %v", err)
	}
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("UnmarshalBinary panicked: %v", r)
		}
	}()
	if _, err := extentmap.UnmarshalBinary(payload); !errors.Is(err, extentmap.ErrCorrupt) {
		t.Fatalf("err = %v, want extentmap.ErrCorrupt", err)
	}
}

func FuzzDecodeCheckpoint(f *testing.F) {
	h := ckptHeader{generation: 3, blockSize: 4096, watermark: 301}
	for _, mb := range fzMaps(f) {
		f.Add(encodeCheckpoint(h, mb))
	}
	// Corrupt maps under valid checksums.
	f.Add(encodeCheckpoint(h, fzFrameMap(fzIssueBody())))
	f.Add(encodeCheckpoint(h, fzFrameMap(fzVarints(1, 100, 2, extentmap.MaxKey, 1, math.MaxUint64, 2, 0))))
	f.Add(encodeCheckpoint(h, nil))
	f.Add([]byte(ckptMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		// As given (mostly stopped by the checksum); with the envelope's
		// checksum recomputed, which reaches its magic, version and length
		// checks; re-enveloped with the map's own checksum recomputed,
		// which reaches the map's structure; and the input taken as a map
		// body inside valid framing.
		fzCheckCheckpoint(t, data)
		if fixed := fzFixCRC(data); fixed != nil {
			fzCheckCheckpoint(t, fixed)
			if h, payload, err := decodeCheckpoint(fixed); err == nil && len(payload) >= len(fzMapMagic)+4 {
				fzCheckCheckpoint(t, encodeCheckpoint(h, fzFixCRC(payload)))
			}
		}
		fzCheckCheckpoint(t, encodeCheckpoint(h, fzFrameMap(data)))
	})
}
