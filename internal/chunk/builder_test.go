package chunk_test

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/crc32c"
)

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestBuilderLayoutWithDatalessItems(t *testing.T) {
	// 64 KiB chunk of 4 KiB blocks: 16 item slots, a 512-byte metadata area.
	l := chunk.Layout{ChunkSize: 64 << 10, BlockSize: 4096}
	buf := bytes.Repeat([]byte{0xee}, 512+64<<10) // stale garbage everywhere
	b := chunk.NewBuilder(l, buf)

	a := pattern(8192, 1)
	c := pattern(4096, 50)
	items := []struct {
		it      chunk.Item
		data    []byte
		wantOff int64
	}{
		{chunk.Item{Sector: 16, Length: 16, Seqno: 3, Flag: chunk.OpWrite}, a, 512},
		{chunk.Item{Sector: 64, Length: 8, Seqno: 1, Flag: chunk.OpDiscard}, nil, -1},
		{chunk.Item{Sector: 0, Length: 80, Seqno: 9, Flag: chunk.OpWriteZeroes}, nil, -1},
		{chunk.Item{Sector: 8, Length: 8, Seqno: 4, Flag: chunk.OpWrite}, c, 512 + 8192},
	}
	for i, x := range items {
		if got := b.Add(x.it, x.data); got != x.wantOff {
			t.Fatalf("item %d: data offset %d, want %d", i, got, x.wantOff)
		}
	}
	if b.Items() != 4 || b.Len() != 512+8192+4096 {
		t.Fatalf("builder has %d items, length %d; want 4 and %d", b.Items(), b.Len(), 512+8192+4096)
	}
	body := b.Seal()
	if int64(len(body)) != 512+8192+4096 || &body[0] != &buf[0] {
		t.Fatalf("Seal returned %d bytes (not a prefix of the buffer?)", len(body))
	}

	// The object body alone, and the whole buffer, parse to the same list:
	// the stale 0xee items after the fourth are gone.
	for _, src := range [][]byte{body, buf} {
		p, err := l.Parse(src, -1, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if len(p.Items) != 4 {
			t.Fatalf("parsed %d items, want 4", len(p.Items))
		}
		for i, x := range items {
			if p.Items[i] != x.it || p.DataOff[i] != x.wantOff {
				t.Errorf("item %d parsed as %+v at %d, want %+v at %d", i, p.Items[i], p.DataOff[i], x.it, x.wantOff)
			}
			if x.data != nil && !bytes.Equal(src[p.DataOff[i]:p.DataOff[i]+int64(len(x.data))], x.data) {
				t.Errorf("item %d: data differs", i)
			}
		}
		if p.End != b.Len() {
			t.Errorf("parsed end %d, builder length %d", p.End, b.Len())
		}
	}

	// Reset reuses the buffer: a shorter list must not show the old items.
	b.Reset()
	if b.Items() != 0 || b.Len() != 512 {
		t.Fatalf("after Reset: %d items, length %d", b.Items(), b.Len())
	}
	d := pattern(4096, 99)
	if off := b.Add(chunk.Item{Sector: 120, Length: 8, Seqno: 2, Flag: chunk.OpWrite}, d); off != 512 {
		t.Fatalf("first data after Reset at %d, want 512", off)
	}
	body = b.Seal()
	p, err := l.Parse(body, -1, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Items) != 1 || p.Items[0].Sector != 120 || !bytes.Equal(body[512:], d) {
		t.Fatalf("after Reset parsed %+v", p.Items)
	}
}

func TestBuilderFits(t *testing.T) {
	l := chunk.Layout{ChunkSize: 16 << 10, BlockSize: 4096} // 4 slots, 16 KiB of data
	b := chunk.NewBuilder(l, make([]byte, 128+16<<10))
	if !b.Fits(16<<10) || b.Fits(16<<10+4096) {
		t.Fatal("empty builder: a whole chunk must fit, more must not")
	}
	b.Add(chunk.Item{Sector: 0, Length: 8, Seqno: 1, Flag: chunk.OpWrite}, make([]byte, 4096))
	if !b.Fits(12<<10) || b.Fits(16<<10) {
		t.Fatal("after 4 KiB: 12 KiB must fit, 16 KiB must not")
	}
	if b.Full() {
		t.Fatal("Full with room left")
	}
	// Data-less items use slots only.
	b.Add(chunk.Item{Sector: 8, Length: 800, Seqno: 1, Flag: chunk.OpDiscard}, nil)
	b.Add(chunk.Item{Sector: 8, Length: 8, Seqno: 2, Flag: chunk.OpWriteZeroes}, nil)
	if !b.Fits(12 << 10) {
		t.Fatal("one slot and 12 KiB left: 12 KiB must fit")
	}
	b.Add(chunk.Item{Sector: 16, Length: 8, Seqno: 1, Flag: chunk.OpWrite}, make([]byte, 4096))
	if b.Fits(0) || !b.Full() {
		t.Fatal("all four slots used: nothing may fit")
	}
	if b.Len() != 128+8192 {
		t.Fatalf("length %d, want %d", b.Len(), 128+8192)
	}
}

func TestBuilderAddMisusePanics(t *testing.T) {
	l := chunk.Layout{ChunkSize: 8192, BlockSize: 4096}
	for name, add := range map[string]func(b *chunk.Builder){
		"zero length":      func(b *chunk.Builder) { b.Add(chunk.Item{Flag: chunk.OpWrite}, nil) },
		"short data":       func(b *chunk.Builder) { b.Add(chunk.Item{Length: 8, Flag: chunk.OpWrite}, make([]byte, 512)) },
		"data on discard":  func(b *chunk.Builder) { b.Add(chunk.Item{Length: 8, Flag: chunk.OpDiscard}, make([]byte, 4096)) },
		"does not fit":     func(b *chunk.Builder) { b.Add(chunk.Item{Length: 24, Flag: chunk.OpWrite}, make([]byte, 12288)) },
		"short new buffer": func(*chunk.Builder) { chunk.NewBuilder(l, make([]byte, 8192)) },
	} {
		t.Run(name, func(t *testing.T) {
			b := chunk.NewBuilder(l, make([]byte, l.BufferSize()))
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			add(b)
		})
	}
}

// TestBuilderDataCRC: the checksum the builder keeps is that of its data
// area, through items with and without data and across Reset.
func TestBuilderDataCRC(t *testing.T) {
	l := chunk.Layout{ChunkSize: 64 << 10, BlockSize: 4096}
	b := chunk.NewBuilder(l, bytes.Repeat([]byte{0xee}, 512+64<<10))
	for round := range 2 {
		b.Reset()
		if b.DataCRC() != crc32c.Checksum(nil) {
			t.Fatalf("round %d: an empty builder's checksum is %08x", round, b.DataCRC())
		}
		b.Add(chunk.Item{Sector: 16, Length: 16, Seqno: 3, Flag: chunk.OpWrite}, pattern(8192, byte(round)))
		b.Add(chunk.Item{Sector: 64, Length: 8, Seqno: 1, Flag: chunk.OpDiscard}, nil)
		b.Add(chunk.Item{Sector: 8, Length: 8, Seqno: 4, Flag: chunk.OpWrite}, pattern(4096, 50))
		if got, want := b.DataCRC(), crc32c.Checksum(b.Buffer()[l.MetadataSize():b.Len()]); got != want {
			t.Fatalf("round %d: DataCRC %08x, data area's %08x", round, got, want)
		}
	}
}

// TestWindowedBuilderMatchesContiguous: a windowed builder fed the same
// items as a contiguous one holds the same metadata, the same data area
// (in windows taken from its source only as the data grows, the last cut
// at the data's end) and the same data checksum, and reads back any
// range across window boundaries. After DropWindows it never writes into
// the windows it gave up.
func TestWindowedBuilderMatchesContiguous(t *testing.T) {
	l := chunk.Layout{ChunkSize: 256 << 10, BlockSize: 4096} // 64 slots, 2 KiB metadata
	const win = 16 << 10
	var allocated [][]byte
	alloc := func() []byte {
		w := bytes.Repeat([]byte{0xcc}, win)
		allocated = append(allocated, w)
		return w
	}
	wb := chunk.NewWindowed(l, make([]byte, l.MetadataSize()), win, alloc)
	cb := chunk.NewBuilder(l, make([]byte, l.BufferSize()))
	if !wb.Windowed() || cb.Windowed() {
		t.Fatal("Windowed() is wrong")
	}
	sizes := []int{4096, 20480, 12288, 0, 65536, 4096}
	for i, n := range sizes {
		it := chunk.Item{Sector: uint64(i * 128), Length: uint64(max(n, 4096) / 512), Seqno: uint64(i + 1), Flag: chunk.OpWrite}
		var data []byte
		if n == 0 {
			it.Flag = chunk.OpDiscard
		} else {
			data = pattern(n, byte(i*17))
		}
		wo, co := wb.Add(it, data), cb.Add(it, data)
		if wo != co {
			t.Fatalf("item %d: windowed data offset %d, contiguous %d", i, wo, co)
		}
		dataLen := wb.Len() - l.MetadataSize()
		if want := int((dataLen + win - 1) / win); len(allocated) != want {
			t.Fatalf("after item %d: %d windows taken for %d bytes of data, want %d", i, len(allocated), dataLen, want)
		}
	}
	if wb.DataCRC() != cb.DataCRC() || wb.Len() != cb.Len() || wb.Items() != cb.Items() {
		t.Fatalf("windowed: crc %08x len %d items %d; contiguous: %08x %d %d", wb.DataCRC(), wb.Len(), wb.Items(), cb.DataCRC(), cb.Len(), cb.Items())
	}
	body := cb.Seal()
	md := l.MetadataSize()
	l.ZeroTail(wb.Metadata(), wb.Items())
	if !bytes.Equal(wb.Metadata(), body[:md]) {
		t.Fatal("the windowed builder's metadata differs")
	}
	var joined []byte
	for i, p := range wb.Data() {
		if &p[0] != &allocated[i][0] {
			t.Fatalf("Data() piece %d is not window %d", i, i)
		}
		joined = append(joined, p...)
	}
	if !bytes.Equal(joined, body[md:]) {
		t.Fatalf("the windows hold %d bytes unlike the contiguous data area (%d bytes)", len(joined), len(body)-int(md))
	}
	if crc32c.Checksum(joined) != wb.DataCRC() {
		t.Fatal("DataCRC is not the checksum of the data")
	}
	for _, r := range [][2]int64{{0, 4096}, {12288, 8192}, {win - 1, 2}, {3, 90000}} {
		got := make([]byte, r[1])
		wb.ReadData(md+r[0], got)
		if !bytes.Equal(got, body[md+r[0]:md+r[0]+r[1]]) {
			t.Fatalf("ReadData(%d, %d bytes) reads wrong bytes", r[0], r[1])
		}
	}

	// Dropped windows belong to someone else: a new chunk takes new ones.
	given := allocated
	allocated = nil
	wb.DropWindows()
	wb.Reset()
	snap := make([][]byte, len(given))
	for i, w := range given {
		snap[i] = bytes.Clone(w)
	}
	wb.Add(chunk.Item{Sector: 0, Length: 64, Flag: chunk.OpWrite}, pattern(32768, 9))
	if len(allocated) != 2 {
		t.Fatalf("the next chunk took %d new windows for 32 KiB, want 2", len(allocated))
	}
	for i, w := range given {
		if !bytes.Equal(w, snap[i]) {
			t.Fatalf("window %d was written after it was dropped", i)
		}
	}
	if wb.Data() == nil || len(wb.Data()) != 2 {
		t.Fatalf("Data() after the reuse: %d pieces, want 2", len(wb.Data()))
	}
	// A builder with no data has no pieces.
	wb.DropWindows()
	wb.Reset()
	if d := wb.Data(); d != nil {
		t.Fatalf("an empty builder's Data() = %d pieces", len(d))
	}
}

// TestAddWindowsAdoptsAlignedWindows: items added from source windows
// build the same chunk as Add (metadata, data, checksum) in every
// alignment, and a windowed builder takes exactly the source windows
// that start a window of its data area and that the item covers to their
// end, as they are (same memory, its entry in src set to nil), copying
// the rest; the data checksum combined from the source windows' own is
// the data's. A contiguous builder, or source windows of another size,
// copy everything.
func TestAddWindowsAdoptsAlignedWindows(t *testing.T) {
	l := chunk.Layout{ChunkSize: 256 << 10, BlockSize: 4096}
	const win = 16 << 10
	mkWins := func(data []byte, size int) [][]byte {
		var src [][]byte
		for len(data) > 0 {
			w := make([]byte, size)
			n := copy(w, data)
			src, data = append(src, w[:n]), data[n:]
		}
		return src
	}
	type add struct {
		size int // bytes of the write
		cuts []int
	}
	// Each case: writes, each added as items cut at the given payload
	// offsets (collision areas, chunk ends), and the source windows
	// expected to be adopted, by write and window.
	for _, tc := range []struct {
		name   string
		writes []add
		adopt  [][]int
	}{
		{"aligned whole windows", []add{{64 << 10, nil}}, [][]int{{0, 1, 2, 3}}},
		{"partial last window", []add{{40 << 10, nil}, {8 << 10, nil}}, [][]int{{0, 1, 2}, nil}},
		{"after an unaligned write", []add{{4 << 10, nil}, {64 << 10, nil}}, [][]int{{0}, nil}},
		{"realigned", []add{{12 << 10, nil}, {4 << 10, nil}, {32 << 10, nil}}, [][]int{{0}, nil, {0, 1}}},
		// The data area and the payload realign once the copy reaches
		// the next window.
		{"cut inside a window", []add{{64 << 10, []int{20 << 10}}}, [][]int{{0, 2, 3}}},
		{"cut at a window", []add{{64 << 10, []int{32 << 10}}}, [][]int{{0, 1, 2, 3}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wb := chunk.NewWindowed(l, make([]byte, l.MetadataSize()), win, func() []byte { return make([]byte, win) })
			cb := chunk.NewBuilder(l, make([]byte, l.BufferSize()))
			other := chunk.NewWindowed(l, make([]byte, l.MetadataSize()), win, func() []byte { return make([]byte, win) })
			ref := chunk.NewBuilder(l, make([]byte, l.BufferSize()))
			sector := uint64(0)
			for wi, w := range tc.writes {
				data := pattern(w.size, byte(wi*29+1))
				src, csrc, osrc := mkWins(data, win), mkWins(data, win), mkWins(data, win/2)
				orig := append([][]byte(nil), src...)
				crcs := make([]uint32, len(src))
				for j, w := range src {
					crcs[j] = crc32c.Checksum(w)
				}
				bounds := append(append([]int{0}, w.cuts...), w.size)
				for k := 0; k+1 < len(bounds); k++ {
					at, n := bounds[k], bounds[k+1]-bounds[k]
					it := chunk.Item{Sector: sector, Length: uint64(n / 512), Seqno: uint64(wi + 1), Flag: chunk.OpWrite}
					sector += uint64(n / 512)
					wo := wb.AddWindows(it, src, crcs, win, int64(at)) // checksums combined
					co := cb.AddWindows(it, csrc, nil, win, int64(at))
					oo := other.AddWindows(it, osrc, nil, win/2, int64(at)) // another size: copied
					ro := ref.Add(it, data[at:at+n])
					if wo != ro || co != ro || oo != ro {
						t.Fatalf("write %d item %d: data offsets %d %d %d, Add gives %d", wi, k, wo, co, oo, ro)
					}
				}
				var adopted []int
				for j := range src {
					if src[j] == nil {
						adopted = append(adopted, j)
					} else if &src[j][0] != &orig[j][0] {
						t.Fatalf("write %d: window %d replaced, not adopted", wi, j)
					}
				}
				if fmt.Sprint(adopted) != fmt.Sprint(tc.adopt[wi]) && !(len(adopted) == 0 && len(tc.adopt[wi]) == 0) {
					t.Fatalf("write %d: adopted windows %v, want %v", wi, adopted, tc.adopt[wi])
				}
				for j := range csrc {
					if csrc[j] == nil {
						t.Fatalf("write %d: a contiguous builder took window %d", wi, j)
					}
				}
				// The adopted windows are the builder's windows, same memory.
				for _, j := range adopted {
					found := false
					for _, p := range wb.Data() {
						found = found || &p[0] == &orig[j][0]
					}
					if !found {
						t.Fatalf("write %d: adopted window %d is not among the builder's windows", wi, j)
					}
				}
			}
			body := ref.Seal()
			md := l.MetadataSize()
			for name, b := range map[string]*chunk.Builder{"windowed": wb, "other size": other} {
				if b.DataCRC() != ref.DataCRC() || b.Len() != ref.Len() {
					t.Fatalf("%s: crc %08x len %d, Add gives %08x %d", name, b.DataCRC(), b.Len(), ref.DataCRC(), ref.Len())
				}
				if got := bytes.Join(b.Data(), nil); !bytes.Equal(got, body[md:]) {
					t.Fatalf("%s: data area differs from Add's", name)
				}
				l.ZeroTail(b.Metadata(), b.Items())
				if !bytes.Equal(b.Metadata(), body[:md]) {
					t.Fatalf("%s: metadata differs from Add's", name)
				}
			}
			if got := cb.Seal(); !bytes.Equal(got, body) {
				t.Fatal("contiguous: chunk differs from Add's")
			}
		})
	}
}
