package chunk_test

import (
	"bytes"
	"math"
	"testing"

	"github.com/bs3/bs3/internal/chunk"
)

// parseNoPanic is Parse with a panic turned into a test failure.
func parseNoPanic(t *testing.T, l chunk.Layout, buf []byte, n int, devSectors uint64) (p chunk.Parsed, err error) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("Parse(layout %+v, %d bytes, n %d, dev %d) panicked: %v", l, len(buf), n, devSectors, r)
		}
	}()
	return l.Parse(buf, n, devSectors)
}

// checkParsed verifies what Parse promises about a list it accepted: every
// item is aligned, inside the device, and data items tile the data area
// from its start, in order, without passing its end.
func checkParsed(t *testing.T, l chunk.Layout, buf []byte, n int, devSectors uint64, p chunk.Parsed) {
	t.Helper()
	md := l.MetadataSize()
	if len(p.Items) != len(p.DataOff) || int64(len(p.Items)) > l.MaxItems() || (n >= 0 && len(p.Items) > n) {
		t.Fatalf("parsed %d items, %d offsets (n %d, %d slots)", len(p.Items), len(p.DataOff), n, l.MaxItems())
	}
	spb := uint64(l.BlockSize / chunk.SectorSize)
	off := p.DataStart
	if p.DataStart != md {
		// Only a stored object's end slot can say so.
		end := chunk.GetItem(buf, len(p.Items))
		if n >= 0 || end.Length != 0 || end.Flag != chunk.EndMagic || end.Sector != uint64(len(p.Items)) || p.DataStart != int64(len(p.Items)+1)*chunk.ItemSize {
			t.Fatalf("data start %d (metadata area %d) with end slot %+v, n %d", p.DataStart, md, end, n)
		}
	}
	for i, it := range p.Items {
		if it != chunk.GetItem(buf, i) {
			t.Fatalf("item %d parsed as %+v, stored %+v", i, it, chunk.GetItem(buf, i))
		}
		if it.Length == 0 || it.Sector%spb != 0 || it.Length%spb != 0 || it.Sector > devSectors || it.Length > devSectors-it.Sector {
			t.Fatalf("item %d %+v accepted on a device of %d sectors", i, it, devSectors)
		}
		if !it.HasData() {
			if p.DataOff[i] != -1 {
				t.Fatalf("data-less item %d at offset %d", i, p.DataOff[i])
			}
			continue
		}
		if p.DataOff[i] != off || it.Length > uint64(p.DataStart+l.ChunkSize-off)/chunk.SectorSize {
			t.Fatalf("item %d (%d sectors) at offset %d, expected %d, chunk ends at %d", i, it.Length, p.DataOff[i], off, p.DataStart+l.ChunkSize)
		}
		off += it.Bytes()
	}
	if p.End != off {
		t.Fatalf("end %d, items end at %d", p.End, off)
	}
}

func TestParseRejectsOverflowingLength(t *testing.T) {
	l := chunk.Layout{ChunkSize: 64 << 10, BlockSize: 4096}
	// Lengths whose byte size wraps int64 to 0 or to a negative number:
	// they used to be accepted with data offsets outside the chunk.
	for _, length := range []uint64{1 << 55, 1<<55 + 8, 1 << 54, 1<<54 + 8, math.MaxUint64 &^ 7} {
		buf := make([]byte, l.MetadataSize())
		chunk.PutItem(buf, 0, chunk.Item{Sector: 0, Length: length, Seqno: 1, Flag: chunk.OpWrite})
		chunk.PutItem(buf, 1, chunk.Item{Sector: 0, Length: 8, Seqno: 1, Flag: chunk.OpWrite})
		if p, err := parseNoPanic(t, l, buf, -1, math.MaxUint64); err == nil {
			t.Errorf("length %d accepted: offsets %v, end %d", length, p.DataOff, p.End)
		}
	}
	// A discard may be that long: it carries no data.
	buf := make([]byte, l.MetadataSize())
	chunk.PutItem(buf, 0, chunk.Item{Sector: 0, Length: 1 << 55, Seqno: 1, Flag: chunk.OpDiscard})
	if _, err := parseNoPanic(t, l, buf, -1, math.MaxUint64); err != nil {
		t.Errorf("long discard rejected: %v", err)
	}
}

func TestParseRejectsBadLayout(t *testing.T) {
	buf := make([]byte, 1<<16)
	chunk.PutItem(buf, 0, chunk.Item{Sector: 0, Length: 8, Seqno: 1, Flag: chunk.OpWrite})
	for _, l := range []chunk.Layout{
		{ChunkSize: 4096, BlockSize: 0},
		{ChunkSize: 4096, BlockSize: 256},
		{ChunkSize: 4096, BlockSize: 1000},
		{ChunkSize: 0, BlockSize: 512},
		{ChunkSize: -4096, BlockSize: 512},
		{ChunkSize: 6144, BlockSize: 4096},
		{ChunkSize: math.MaxInt64 &^ 4095, BlockSize: 4096},
	} {
		if _, err := parseNoPanic(t, l, buf, -1, 1<<20); err == nil {
			t.Errorf("layout %+v accepted", l)
		}
	}
}

func FuzzParse(f *testing.F) {
	l := chunk.Layout{ChunkSize: 16 << 10, BlockSize: 4096}
	b := chunk.NewBuilder(l, make([]byte, l.BufferSize()))
	b.Add(chunk.Item{Sector: 8, Length: 8, Seqno: 1, Flag: chunk.OpWrite}, make([]byte, 4096))
	b.Add(chunk.Item{Sector: 0, Length: 800, Seqno: 2, Flag: chunk.OpDiscard}, nil)
	b.Add(chunk.Item{Sector: 64, Length: 16, Seqno: 3, Flag: chunk.OpWriteZeroes}, nil)
	b.Add(chunk.Item{Sector: 16, Length: 16, Seqno: 4, Flag: chunk.OpWrite}, make([]byte, 8192))
	valid := append([]byte(nil), b.Seal()[:l.MetadataSize()]...)
	b2 := chunk.NewBuilder(l, make([]byte, l.BufferSize()))
	b2.Add(chunk.Item{Sector: 8, Length: 8, Seqno: 1, Flag: chunk.OpWrite}, make([]byte, 4096))
	b2.Add(chunk.Item{Sector: 0, Length: 800, Seqno: 2, Flag: chunk.OpDiscard}, nil)
	compact, _ := l.Compact(b2.Buffer(), b2.Items(), b2.Len())
	compact = append([]byte(nil), compact...)
	huge := make([]byte, l.MetadataSize())
	chunk.PutItem(huge, 0, chunk.Item{Length: 1<<54 + 8, Flag: chunk.OpWrite})
	chunk.PutItem(huge, 1, chunk.Item{Length: 8, Flag: chunk.OpWrite})
	// Arguments: metadata bytes, item count, device sectors, then the
	// layout as given (raw) and as a selector of a valid small layout.
	f.Add(valid, -1, uint64(1<<20), int64(16<<10), int64(4096), uint8(3), true)
	f.Add(valid, 4, uint64(1<<20), int64(16<<10), int64(4096), uint8(3), true)
	f.Add(valid, 5, uint64(100), int64(16<<10), int64(4096), uint8(3), true)
	f.Add(valid, -1, uint64(1<<20), int64(16<<10), int64(512), uint8(31), false)
	f.Add(huge, -1, uint64(math.MaxUint64), int64(16<<10), int64(4096), uint8(3), true)
	f.Add(compact, -1, uint64(1<<20), int64(16<<10), int64(4096), uint8(3), true)
	f.Add(huge, 2, uint64(math.MaxUint64), int64(0), int64(0), uint8(0), true)
	f.Fuzz(func(t *testing.T, md []byte, n int, devSectors uint64, rawChunk, rawBlock int64, chunkBlocks uint8, big bool) {
		// Any layout: rejected or parsed, never a panic.
		raw := chunk.Layout{ChunkSize: rawChunk, BlockSize: rawBlock}
		if p, err := parseNoPanic(t, raw, md, n, devSectors); err == nil {
			checkParsed(t, raw, md, n, devSectors, p)
		}
		// A valid layout of 1..64 blocks, the bytes padded or cut to its
		// metadata area, so that the item checks are reached.
		l := chunk.Layout{BlockSize: 512}
		if big {
			l.BlockSize = 4096
		}
		l.ChunkSize = l.BlockSize * (1 + int64(chunkBlocks%64))
		buf := make([]byte, l.MetadataSize())
		copy(buf, md)
		p, err := parseNoPanic(t, l, buf, n, devSectors)
		if err != nil {
			return
		}
		checkParsed(t, l, buf, n, devSectors, p)
		// The metadata area alone and the whole buffer parse alike.
		whole := append(buf, make([]byte, l.ChunkSize)...)
		q, err := parseNoPanic(t, l, whole, n, devSectors)
		if err != nil || len(q.Items) != len(p.Items) || q.End != p.End {
			t.Fatalf("whole buffer parses differently: %v", err)
		}
		// Rebuilding the accepted list gives the same metadata.
		nb := chunk.NewBuilder(l, make([]byte, l.BufferSize()))
		for i, it := range p.Items {
			var data []byte
			if p.DataOff[i] >= 0 {
				data = make([]byte, it.Bytes())
			}
			nb.Add(it, data)
		}
		rebuilt := nb.Seal()
		if int64(len(rebuilt))-l.MetadataSize() != p.End-p.DataStart || !bytes.Equal(rebuilt[:len(p.Items)*chunk.ItemSize], buf[:len(p.Items)*chunk.ItemSize]) {
			t.Fatalf("rebuilt chunk differs: %d bytes, end %d", len(rebuilt), p.End)
		}
	})
}

// A chunk in the BUSE layout turned compact parses back to the same items
// and data; the layout is read from the end slot, and damaged or cut
// compact metadata is refused.
func TestCompactRoundTrip(t *testing.T) {
	for _, l := range []chunk.Layout{{ChunkSize: 64 << 10, BlockSize: 4096}, {ChunkSize: 64 << 10, BlockSize: 512}} {
		slots := int(l.MaxItems())
		for _, items := range []int{1, 2, slots / 2, slots - 1, slots} {
			b := chunk.NewBuilder(l, make([]byte, l.BufferSize()))
			var want []chunk.Item
			var data []byte
			for i := 0; i < items; i++ {
				it := chunk.Item{Sector: uint64(i) * uint64(l.BlockSize/chunk.SectorSize), Length: uint64(l.BlockSize / chunk.SectorSize), Seqno: uint64(i + 1), Flag: chunk.OpWrite}
				var d []byte
				if i%3 == 2 {
					it.Flag = chunk.OpDiscard
				} else {
					d = bytes.Repeat([]byte{byte(i + 1)}, int(l.BlockSize))
					data = append(data, d...)
				}
				b.Add(it, d)
				want = append(want, it)
			}
			b.Seal()
			body, start := l.Compact(b.Buffer(), b.Items(), b.Len())
			if items == slots {
				if start != l.MetadataSize() || int64(len(body)) != b.Len() {
					t.Fatalf("%+v, %d items (all slots): data start %d, body %d bytes; want the BUSE layout", l, items, start, len(body))
				}
			} else if start != int64(items+1)*chunk.ItemSize || int64(len(body)) != start+int64(len(data)) {
				t.Fatalf("%+v, %d items: data start %d, body %d bytes, want %d and %d", l, items, start, len(body), (items+1)*chunk.ItemSize, start+int64(len(data)))
			}
			p, err := parseNoPanic(t, l, body, -1, 1<<30)
			if err != nil {
				t.Fatalf("%+v, %d items: %v", l, items, err)
			}
			if p.DataStart != start || p.End != int64(len(body)) || len(p.Items) != items {
				t.Fatalf("%+v, %d items: parsed start %d end %d items %d, want %d %d %d", l, items, p.DataStart, p.End, len(p.Items), start, len(body), items)
			}
			var got []byte
			for i, it := range p.Items {
				if it != want[i] {
					t.Fatalf("item %d parsed as %+v, wrote %+v", i, it, want[i])
				}
				if p.DataOff[i] >= 0 {
					got = append(got, body[p.DataOff[i]:p.DataOff[i]+it.Bytes()]...)
				}
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("%+v, %d items: data differs after Compact", l, items)
			}
			if items == slots {
				continue
			}
			// Cut inside the item list: refused, never read as fewer items.
			if _, err := parseNoPanic(t, l, body[:start-1], -1, 1<<30); err == nil {
				t.Fatalf("%+v, %d items: metadata cut at %d bytes accepted", l, items, start-1)
			}
			// An end slot that counts differently: refused.
			bad := append([]byte(nil), body...)
			end := chunk.GetItem(bad, items)
			end.Sector++
			chunk.PutItem(bad, items, end)
			if _, err := parseNoPanic(t, l, bad, -1, 1<<30); err == nil {
				t.Fatalf("%+v, %d items: end slot claiming %d items accepted", l, items, end.Sector)
			}
			// In memory (n given) a buffer is always the BUSE layout.
			if q, err := parseNoPanic(t, l, b.Buffer(), items, 1<<30); err != nil || q.DataStart != l.MetadataSize() {
				t.Fatalf("%+v, %d items: buffer parse: start %d, %v", l, items, q.DataStart, err)
			}
		}
	}
}
