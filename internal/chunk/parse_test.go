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
	off := md
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
		if p.DataOff[i] != off || it.Length > uint64(md+l.ChunkSize-off)/chunk.SectorSize {
			t.Fatalf("item %d (%d sectors) at offset %d, expected %d, chunk ends at %d", i, it.Length, p.DataOff[i], off, md+l.ChunkSize)
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
		if int64(len(rebuilt)) != p.End || !bytes.Equal(rebuilt[:len(p.Items)*chunk.ItemSize], buf[:len(p.Items)*chunk.ItemSize]) {
			t.Fatalf("rebuilt chunk differs: %d bytes, end %d", len(rebuilt), p.End)
		}
	})
}
