package chunk

import (
	"fmt"

	"github.com/bs3/bs3/internal/crc32c"
)

// Builder fills one chunk in the BUSE layout: items are written into the
// metadata area in order, the data of each item that carries data is
// appended to the data area. The builder is reused across chunks (Reset),
// so Seal (or the engine's commit) must zero the stale items after the
// last one.
//
// A contiguous builder (NewBuilder) fills one buffer holding both areas,
// as the BUSE kernel module hands a chunk to userspace. A windowed builder
// (NewWindowed) keeps the metadata area in one buffer and the data area in
// windows of a fixed size taken from a source as the data grows: the
// engine uploads them as the pieces of one body and hands them on to its
// read cache, which then holds a chunk just written without copying it
// (docs/ARCHITECTURE.md §18).
//
// A Builder is not safe for concurrent use.
type Builder struct {
	l     Layout
	buf   []byte // contiguous: exactly l.BufferSize() bytes; nil when windowed
	meta  []byte // the metadata area
	md    int64  // metadata area size, where data starts
	slots int    // item slots in the metadata area
	items int
	end   int64 // object offset of the next data byte
	// win is the size of a data window; wins the windows holding the
	// data area so far (contiguous: one window, the whole data area).
	win   int64
	wins  [][]byte
	alloc func() []byte   // windowed: a new window
	shift *crc32c.Shifter // windowed: combines a whole window's checksum
	// dataCRC is the CRC32C of the data area so far, updated as each
	// item's data is copied in (while it is in the CPU's cache).
	dataCRC uint32
}

// crcPiece is how much Add copies before it checksums what it copied.
const crcPiece = 64 << 10

// NewBuilder returns an empty Builder over buf, which must hold at least
// l.BufferSize() bytes (a shorter buffer is a programming error and
// panics). The buffer need not be zeroed.
func NewBuilder(l Layout, buf []byte) *Builder {
	if int64(len(buf)) < l.BufferSize() {
		panic(fmt.Sprintf("chunk.NewBuilder: buffer of %d bytes, layout needs %d", len(buf), l.BufferSize()))
	}
	md := l.MetadataSize()
	buf = buf[:l.BufferSize()]
	return &Builder{l: l, buf: buf, meta: buf[:md], md: md, slots: int(l.MaxItems()), end: md,
		win: l.ChunkSize, wins: [][]byte{buf[md:]}}
}

// NewWindowed returns an empty windowed Builder: meta holds the metadata
// area (at least l.MetadataSize() bytes), and alloc returns a new data
// window of at least window bytes each time the data outgrows the
// windows the builder holds. window must be positive (a programming
// error panics).
func NewWindowed(l Layout, meta []byte, window int64, alloc func() []byte) *Builder {
	md := l.MetadataSize()
	if int64(len(meta)) < md || window <= 0 {
		panic(fmt.Sprintf("chunk.NewWindowed: metadata buffer of %d bytes (layout needs %d), window %d", len(meta), md, window))
	}
	return &Builder{l: l, meta: meta[:md], md: md, slots: int(l.MaxItems()), end: md, win: window, alloc: alloc,
		shift: crc32c.NewShifter(window)}
}

// Reset empties the builder for the next chunk. Old contents stay in the
// buffers until overwritten; Seal hides stale items. A windowed builder
// reuses the windows it still holds.
func (b *Builder) Reset() {
	b.items = 0
	b.end = b.md
	b.dataCRC = 0
}

// Fits reports whether one more item with dataBytes bytes of data (0 for an
// item without data) fits: a free item slot and enough data space.
func (b *Builder) Fits(dataBytes int64) bool {
	return b.items < b.slots && dataBytes >= 0 && b.end+dataBytes <= b.md+b.l.ChunkSize
}

// FitsItems reports whether k more items with dataBytes of data between
// them fit.
func (b *Builder) FitsItems(k int, dataBytes int64) bool {
	return b.items+k <= b.slots && dataBytes >= 0 && b.end+dataBytes <= b.md+b.l.ChunkSize
}

// Add appends it and copies its data: len(data) must equal it.Bytes() for
// an item with data and be 0 for an item without (discard, write-zeroes).
// It returns the object offset of the copied data, or -1 for an item
// without data.
//
// The caller checks Fits first; an item that does not fit, has a zero
// length (which would end the item list early) or comes with the wrong
// amount of data is a programming error and panics rather than producing
// a chunk that loses or misplaces a write.
func (b *Builder) Add(it Item, data []byte) int64 {
	if it.Length == 0 {
		panic("chunk.Builder.Add: zero-length item would end the item list")
	}
	var need int64
	if it.HasData() {
		need = it.Bytes()
		if int64(len(data)) != need {
			panic(fmt.Sprintf("chunk.Builder.Add: item of %d bytes with %d bytes of data", need, len(data)))
		}
	} else if len(data) != 0 {
		panic(fmt.Sprintf("chunk.Builder.Add: item with op %d carries no data, got %d bytes", it.Flag, len(data)))
	}
	if !b.Fits(need) {
		panic(fmt.Sprintf("chunk.Builder.Add: item %d with %d bytes does not fit (data end %d of %d)", b.items, need, b.end, b.md+b.l.ChunkSize))
	}
	PutItem(b.meta, b.items, it)
	b.items++
	if !it.HasData() {
		return -1
	}
	off := b.end
	b.copyIn(off-b.md, data)
	b.end += need
	return off
}

// copyIn copies data into the data area from data offset d on, taking
// windows from the source as it reaches them, and checksums it. It
// copies and checksums a piece at a time, so that the checksum reads
// bytes still in the CPU's cache: 1 MiB copied, then checksummed, ran at
// 6 GB/s here; in 64 KiB pieces, at 10 GB/s.
func (b *Builder) copyIn(d int64, data []byte) {
	for len(data) > 0 {
		w, in := int(d/b.win), d%b.win
		if w == len(b.wins) {
			b.wins = append(b.wins, b.alloc()[:b.win])
		}
		dst := b.wins[w][in:]
		n := copy(dst, data[:min(len(data), crcPiece)])
		b.dataCRC = crc32c.Update(b.dataCRC, dst[:n])
		data = data[n:]
		d += int64(n)
	}
}

// AddWindows is Add for an item whose data is held in src, windows of
// srcWin bytes (the last may be shorter): the it.Bytes() bytes starting
// at byte at of their concatenation. Where the data area reaches the
// start of a window of its own just as the item's data reaches the start
// of a source window, and the item's data covers that source window to
// its end, a windowed builder takes the source window as its own window
// instead of copying it, and sets src's entry to nil: it is the
// builder's from then on, and the caller must not touch it again (its
// further data goes into the rest of it, and the engine hands it on with
// the chunk). Everything else is copied as Add copies. A frontend that
// reads a write's payload into windows of the builder's size thus puts
// it into the chunk without a copy (docs/ARCHITECTURE.md §18). crcs,
// when not nil, holds the CRC32C of each source window's bytes: a window
// taken whole is not read again for the data checksum.
//
// Misuse panics as with Add; src must hold at+it.Bytes() bytes.
func (b *Builder) AddWindows(it Item, src [][]byte, crcs []uint32, srcWin, at int64) int64 {
	need := it.Bytes()
	if !it.HasData() || it.Length == 0 || !b.Fits(need) || srcWin <= 0 || at < 0 {
		panic(fmt.Sprintf("chunk.Builder.AddWindows: item %+v with %d bytes at %d of %d-byte windows does not fit (data end %d of %d)", it, need, at, srcWin, b.end, b.md+b.l.ChunkSize))
	}
	PutItem(b.meta, b.items, it)
	b.items++
	off := b.end
	d := off - b.md
	adopt := b.buf == nil && srcWin == b.win
	for x, end := at, at+need; x < end; {
		j, sin := int(x/srcWin), x%srcWin
		if j >= len(src) || src[j] == nil || sin >= int64(len(src[j])) {
			panic(fmt.Sprintf("chunk.Builder.AddWindows: no source data at byte %d", x))
		}
		w, in := int(d/b.win), d%b.win
		if sw := src[j]; adopt && in == 0 && sin == 0 && w == len(b.wins) &&
			int64(cap(sw)) >= b.win && x+int64(len(sw)) <= end {
			b.wins = append(b.wins, sw[:b.win])
			switch {
			case crcs == nil:
				b.dataCRC = crc32c.Update(b.dataCRC, sw)
			case int64(len(sw)) == b.win:
				b.dataCRC = b.shift.Combine(b.dataCRC, crcs[j])
			default:
				b.dataCRC = crc32c.Combine(b.dataCRC, crcs[j], int64(len(sw)))
			}
			src[j] = nil
			x += int64(len(sw))
			d += int64(len(sw))
			continue
		}
		// The rest of this source window that the item covers.
		piece := src[j][sin:min(int64(len(src[j])), sin+end-x)]
		b.copyIn(d, piece)
		x += int64(len(piece))
		d += int64(len(piece))
	}
	b.end += need
	return off
}

// ReadData copies len(dst) bytes of the data added, starting at object
// offset off (as Add returned it), into dst.
func (b *Builder) ReadData(off int64, dst []byte) {
	d := off - b.md
	for len(dst) > 0 {
		n := copy(dst, b.wins[d/b.win][d%b.win:])
		dst = dst[n:]
		d += int64(n)
	}
}

// Metadata is the metadata area.
func (b *Builder) Metadata() []byte { return b.meta }

// Windowed reports whether the data area is in windows (NewWindowed).
func (b *Builder) Windowed() bool { return b.buf == nil }

// Data is the data area added so far in pieces: the windows, the last
// one cut at the end of the data (none when no data was added).
func (b *Builder) Data() [][]byte {
	n := b.end - b.md
	if n == 0 {
		return nil
	}
	k := int((n + b.win - 1) / b.win)
	out := make([][]byte, k)
	copy(out, b.wins[:k])
	out[k-1] = out[k-1][:n-int64(k-1)*b.win]
	return out
}

// DropWindows makes a windowed builder forget the windows holding its
// data, which now belong to someone else (the engine took them); it
// takes new ones from its source from now on. The builder must be Reset
// before it is used again.
func (b *Builder) DropWindows() {
	if b.buf == nil {
		clear(b.wins) // the list's memory is reused, the windows are not
		b.wins = b.wins[:0]
	}
}

// DataCRC is the CRC32C of the data area so far: buf[MetadataSize():Len()].
func (b *Builder) DataCRC() uint32 { return b.dataCRC }

// Items is the number of items added since the last Reset.
func (b *Builder) Items() int { return b.items }

// Len is the object's byte length so far: the whole metadata area plus
// the data added.
func (b *Builder) Len() int64 { return b.end }

// Full reports whether no further item with data can be added: the item
// slots or the data space are used up.
func (b *Builder) Full() bool {
	return b.items >= b.slots || b.end+b.l.BlockSize > b.md+b.l.ChunkSize
}

// Seal zero-fills the metadata area after the last item, so a reader finds
// the end of the list, and returns the object body: buf[:Len()]. The
// whole buffer (Buffer) is then a valid chunk too.
// Seal applies to a contiguous builder only (a windowed one panics).
func (b *Builder) Seal() []byte {
	if b.buf == nil {
		panic("chunk.Builder.Seal: a windowed builder has no contiguous body")
	}
	b.l.ZeroTail(b.buf, b.items)
	return b.buf[:b.end]
}

// Buffer is a contiguous builder's whole chunk buffer (metadata area and
// the full data area), as the BUSE kernel module hands a chunk to
// userspace; nil for a windowed builder.
func (b *Builder) Buffer() []byte { return b.buf }
