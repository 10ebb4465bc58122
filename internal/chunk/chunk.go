// Package chunk owns the on-object format of a write chunk — the layout the
// BUSE kernel module hands to userspace and that every data object in the
// bucket keeps: a metadata area of 32-byte items, then the data of the
// items in order.
//
// It parses and builds chunks; it never does I/O and never touches the
// extent map.
package chunk

import (
	"encoding/binary"
	"fmt"
)

// ItemSize is the size of one metadata item: {sector, length, seqno, flag},
// four little-endian uint64.
const ItemSize = 32

// SectorSize is the unit of an item's sector and length, whatever the
// device block size (Linux sectors).
const SectorSize = 512

// Request ops stored in an item's flag, as the Linux block layer numbers
// them (REQ_OP_*). Only OpWrite items carry data in the chunk.
const (
	OpWrite       = 1
	OpDiscard     = 3
	OpSecureErase = 5
	OpWriteZeroes = 9
)

// Item is one write recorded in a chunk.
type Item struct {
	Sector uint64 // first 512-byte sector written
	Length uint64 // length in 512-byte sectors
	Seqno  uint64 // orders writes to the same place; larger wins
	Flag   uint64 // request op (OpWrite, OpDiscard, ...)
}

// HasData reports whether the item's bytes follow in the chunk's data area.
// Discard and write-zeroes items carry none and read back as zeros.
func (it Item) HasData() bool {
	switch it.Flag {
	case OpDiscard, OpSecureErase, OpWriteZeroes:
		return false
	}
	return true
}

// Bytes is the item's length in bytes.
func (it Item) Bytes() int64 { return int64(it.Length) * SectorSize }

// Layout describes the fixed geometry of chunks of one volume.
type Layout struct {
	ChunkSize int64 // bytes of data a chunk can hold
	BlockSize int64 // device block size, 512 or 4096
}

// MaxItems is the number of item slots in the metadata area: a chunk holds
// at most one write per block.
func (l Layout) MaxItems() int64 { return l.ChunkSize / l.BlockSize }

// MetadataSize is the byte size of the metadata area; data starts there.
func (l Layout) MetadataSize() int64 { return l.MaxItems() * ItemSize }

// BufferSize is the size of a whole chunk buffer (metadata + data area).
func (l Layout) BufferSize() int64 { return l.MetadataSize() + l.ChunkSize }

// GetItem decodes item i of the metadata area md.
func GetItem(md []byte, i int) Item {
	b := md[i*ItemSize : (i+1)*ItemSize]
	return Item{
		Sector: binary.LittleEndian.Uint64(b[0:]),
		Length: binary.LittleEndian.Uint64(b[8:]),
		Seqno:  binary.LittleEndian.Uint64(b[16:]),
		Flag:   binary.LittleEndian.Uint64(b[24:]),
	}
}

// PutItem encodes it as item i of the metadata area md.
func PutItem(md []byte, i int, it Item) {
	b := md[i*ItemSize : (i+1)*ItemSize]
	binary.LittleEndian.PutUint64(b[0:], it.Sector)
	binary.LittleEndian.PutUint64(b[8:], it.Length)
	binary.LittleEndian.PutUint64(b[16:], it.Seqno)
	binary.LittleEndian.PutUint64(b[24:], it.Flag)
}

// SetSeqno rewrites the seqno of item i in place (used to fold the volume
// generation into every seqno before upload).
func SetSeqno(md []byte, i int, seq uint64) {
	binary.LittleEndian.PutUint64(md[i*ItemSize+16:], seq)
}

// Parsed is a chunk's item list with each item's data offset resolved.
type Parsed struct {
	Items []Item
	// DataOff[i] is the byte offset of item i's data from the start of
	// the object (metadata area included); -1 for items without data.
	DataOff []int64
	// DataStart is where the data area begins in the object: the
	// layout's whole metadata area (MetadataSize) for the BUSE layout,
	// just past the end slot for a compact object (see Compact).
	DataStart int64
	// End is the byte length of the object: metadata area plus data.
	End int64
}

// Rebase moves p to an object whose data area starts at start instead of
// p.DataStart (after Layout.Compact): data offsets and the end shift, the
// items and their data-area offsets stay.
func (p *Parsed) Rebase(start int64) {
	d := start - p.DataStart
	for i, off := range p.DataOff {
		if off >= 0 {
			p.DataOff[i] = off + d
		}
	}
	p.End += d
	p.DataStart = start
}

// EndMagic marks the end slot of a compact object: a slot of length 0
// (so every parser stops there) whose flag is EndMagic and whose sector is
// the number of items before it. Data starts right after it. An object in
// the BUSE layout has zeros there (Commit zeroes the unused slots) or no
// end slot at all (every slot used). The value spells "BS3CEND\0"
// little-endian, far from any request op.
const EndMagic = 0x00444e4543335342

// maxChunkSize bounds a layout's chunk size far above any configuration
// and far enough below 2^63 that metadata area plus data cannot overflow.
const maxChunkSize = 1 << 40

// check reports a layout whose geometry Parse cannot work with.
func (l Layout) check() error {
	if l.BlockSize < SectorSize || l.BlockSize%SectorSize != 0 {
		return fmt.Errorf("chunk layout: block size %d is not a positive multiple of %d", l.BlockSize, SectorSize)
	}
	if l.ChunkSize < l.BlockSize || l.ChunkSize > maxChunkSize || l.ChunkSize%l.BlockSize != 0 {
		return fmt.Errorf("chunk layout: chunk size %d is not a multiple of the %d-byte block size in [%d, %d]", l.ChunkSize, l.BlockSize, l.BlockSize, int64(maxChunkSize))
	}
	return nil
}

// Parse reads n items from the metadata area of chunk (n < 0: until the
// first zero-length item) and checks them against the layout and a device
// of devSectors sectors. Items without data do not advance the data offset.
//
// With n >= 0, chunk is a buffer in the BUSE layout (as the kernel module
// or a Builder fills it; slots after the n items may hold stale bytes).
// With n < 0, chunk is the start of a stored object, at least its
// metadata area: the end slot says which layout it has (a compact end
// slot, or zeros / no free slot for the BUSE layout), so the format is
// read from the object, never guessed. Data offsets are computed, not
// read. Whatever the bytes, it returns an error rather than items whose
// data would lie outside the chunk.
func (l Layout) Parse(chunk []byte, n int, devSectors uint64) (Parsed, error) {
	if err := l.check(); err != nil {
		return Parsed{}, err
	}
	md := l.MetadataSize()
	max := int(l.MaxItems())
	if n > max {
		return Parsed{}, fmt.Errorf("chunk claims %d items, at most %d fit", n, max)
	}
	if n >= 0 && int64(len(chunk)) < md {
		return Parsed{}, fmt.Errorf("chunk of %d bytes is shorter than its metadata area (%d bytes)", len(chunk), md)
	}
	limit := n
	if n < 0 {
		limit = max
	}
	p := Parsed{Items: make([]Item, 0, min(limit, 64)), DataOff: make([]int64, 0, min(limit, 64)), DataStart: md}
	blockSectors := uint64(l.BlockSize / SectorSize)
	count := 0
	for ; count < limit; count++ {
		if int64(count+1)*ItemSize > int64(len(chunk)) {
			return Parsed{}, fmt.Errorf("chunk of %d bytes ends inside item slot %d before the end of its item list (truncated object)", len(chunk), count)
		}
		it := GetItem(chunk, count)
		if it.Length == 0 {
			if n < 0 && it.Flag == EndMagic {
				if it.Sector != uint64(count) || it.Seqno != 0 {
					return Parsed{}, fmt.Errorf("compact end slot %d says %d items (seqno field %d): corrupt metadata", count, it.Sector, it.Seqno)
				}
				p.DataStart = int64(count+1) * ItemSize
			}
			break
		}
		if it.Sector%blockSectors != 0 || it.Length%blockSectors != 0 {
			return Parsed{}, fmt.Errorf("item %d (sector %d, %d sectors) is not aligned to the %d-byte block size", count, it.Sector, it.Length, l.BlockSize)
		}
		if it.Sector+it.Length > devSectors || it.Sector+it.Length < it.Sector {
			return Parsed{}, fmt.Errorf("item %d (sector %d, %d sectors) ends past the device (%d sectors)", count, it.Sector, it.Length, devSectors)
		}
		p.Items = append(p.Items, it)
	}
	if p.DataStart == md && int64(len(chunk)) < md {
		return Parsed{}, fmt.Errorf("chunk of %d bytes is shorter than its metadata area (%d bytes)", len(chunk), md)
	}
	off := p.DataStart
	for i, it := range p.Items {
		if !it.HasData() {
			p.DataOff = append(p.DataOff, -1)
			continue
		}
		// Compare in sectors: Bytes() of a corrupt length overflows.
		if room := uint64(p.DataStart+l.ChunkSize-off) / SectorSize; it.Length > room {
			return Parsed{}, fmt.Errorf("item %d (%d sectors at data offset %d) overruns the %d-byte chunk", i, it.Length, off-p.DataStart, l.ChunkSize)
		}
		p.DataOff = append(p.DataOff, off)
		off += it.Bytes()
	}
	p.End = off
	return p, nil
}

// Compact turns buf, a chunk in the BUSE layout whose first n items are
// final and whose data ends at end, into the compact object layout in
// place, and returns the object body and where its data starts: the n
// items move to the end of the metadata area, right before the data,
// followed by the end slot (docs/ARCHITECTURE.md §3). Only the moved
// items are copied (n×32 bytes), never the data. buf's first slots no
// longer hold the item list afterwards; the body is buf[md-(n+1)×32:end].
// With every slot used there is no room for an end slot and nothing to
// save: the body is buf[:end] in the BUSE layout, as Parse reads it.
func (l Layout) Compact(buf []byte, n int, end int64) (body []byte, dataStart int64) {
	md := l.MetadataSize()
	if int64(n) >= l.MaxItems() {
		return buf[:end], md
	}
	start := md - int64(n+1)*ItemSize
	copy(buf[start:md-ItemSize], buf[:int64(n)*ItemSize])
	PutItem(buf[md-ItemSize:md], 0, Item{Sector: uint64(n), Flag: EndMagic})
	return buf[start:end], int64(n+1) * ItemSize
}

// ZeroTail zero-fills the metadata area after the first n items, so that a
// reader of the object finds the end of the list (a zero length).
func (l Layout) ZeroTail(chunk []byte, n int) {
	clear(chunk[int64(n)*ItemSize : l.MetadataSize()])
}
