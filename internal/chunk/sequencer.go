package chunk

import (
	"fmt"
	"sync/atomic"
)

// Sequencer numbers writes the way the BUSE kernel module does: the device
// is cut into collision areas (write.collision_chunk_size), a write is
// split at their boundaries, and each piece gets ++counter[area]. The
// counters are shared by all queues, so two writes to the same area are
// ordered by their seqno whatever chunk or queue they end up in; writes to
// different areas need no common order and do not contend on one counter.
//
// Counters start at 0, so the first seqno of every area is 1. A Sequencer
// is safe for concurrent use.
type Sequencer struct {
	area     int64
	devSize  int64
	counters []atomic.Uint64
}

// NewSequencer returns a Sequencer for a device of devSize bytes cut into
// areas of areaSize bytes (the last one may be shorter). areaSize <= 0
// makes the whole device one area.
func NewSequencer(devSize, areaSize int64) *Sequencer {
	devSize = max(devSize, 0)
	if areaSize <= 0 || areaSize > devSize {
		areaSize = max(devSize, 1)
	}
	n := (devSize + areaSize - 1) / areaSize
	return &Sequencer{area: areaSize, devSize: devSize, counters: make([]atomic.Uint64, max(n, 1))}
}

// AreaSize is the width of a collision area in bytes.
func (s *Sequencer) AreaSize() int64 { return s.area }

// Split calls fn for each piece of the byte range [off, off+length) that
// lies in one collision area, in order, with the piece's seqno. The range
// must lie within the device (frontends validate requests first); a range
// outside it is a programming error and panics.
func (s *Sequencer) Split(off, length int64, fn func(off, length int64, seq uint64)) {
	if off < 0 || length < 0 || off+length > s.devSize || off+length < off {
		panic(fmt.Sprintf("chunk.Sequencer.Split: range [%d, +%d) outside the %d-byte device", off, length, s.devSize))
	}
	for length > 0 {
		a := off / s.area
		n := min((a+1)*s.area-off, length)
		fn(off, n, s.counters[a].Add(1))
		off += n
		length -= n
	}
}
