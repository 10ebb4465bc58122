package nbd

import (
	"context"
	"fmt"
	"sync"
)

// The Device takes block-aligned requests only; NBD clients may send any
// byte range. A request is cut into at most three spans: a partial head
// block, a run of whole blocks, and a partial tail block. Whole blocks go
// to the Device as they are; partial blocks are read whole, and for writes
// merged and written back whole (read-modify-write).
//
// A read-modify-write must not lose a write that lands on the same block
// between its read and its write. Every write (WRITE, WRITE_ZEROES, TRIM)
// therefore holds a lock over the blocks it changes while it runs: shared
// for block-aligned requests, which do not read what they overwrite, and
// exclusive for requests with a partial block, which cover every block of
// the request. Unaligned writes are thus serialized with every write that
// overlaps them, aligned writes run in parallel with each other, and
// reads take no lock. A write is acknowledged only after its last device
// write returns, so a flush the client sends after that acknowledgement
// covers all of it.

// span is one piece of a request on the device. A whole span covers the
// blocks [dev, dev+n) and request bytes [at, at+n). A partial span covers
// bytes [inner, inner+n) of the block at dev, which are request bytes
// [at, at+n).
type span struct {
	dev, at, n, inner int64
	partial           bool
}

// split cuts the request [off, off+n) into spans for block size bs.
func split(off, n, bs int64) (spans [3]span, count int) {
	end := off + n
	for pos := off; pos < end; {
		blk := pos - pos%bs
		var sp span
		if pos == blk && end-pos >= bs {
			sp = span{dev: pos, at: pos - off, n: (end - pos) / bs * bs}
		} else {
			sp = span{dev: blk, at: pos - off, n: min(blk+bs, end) - pos, inner: pos - blk, partial: true}
		}
		spans[count] = sp
		count++
		pos += sp.n
	}
	return spans, count
}

// aligned reports whether [off, off+n) is made of whole blocks.
func aligned(off, n, bs int64) bool { return off%bs == 0 && n%bs == 0 }

// scratchFor is the memory beyond the payload a request needs: one block
// for its partial blocks (they are handled one after the other).
func scratchFor(off, n, bs int64) int64 {
	if aligned(off, n, bs) {
		return 0
	}
	return bs
}

// Lock stripes: the device is divided into regions of 1<<lockRegionShift
// bytes (at least the largest block size, so a block never straddles two),
// and region r is guarded by stripe r % lockStripes. A 4 KiB write takes
// one stripe, a 32 MiB one 128.
const (
	lockStripes     = 256
	lockRegionShift = 18 // 256 KiB
)

// blockLocks is the lock table of a server.
type blockLocks struct {
	m [lockStripes]sync.RWMutex
}

// held is a set of stripes taken by lock: the runs [a0, a1) and [b0, b1).
type held struct {
	l              *blockLocks
	a0, a1, b0, b1 int
	excl           bool
}

// lock takes the stripes covering the device bytes [lo, hi), hi > lo,
// exclusive or shared, in increasing stripe order so that two requests
// never wait for each other in a cycle.
func (l *blockLocks) lock(lo, hi int64, excl bool) held {
	h := l.span(lo, hi, excl)
	for _, r := range [2][2]int{{h.a0, h.a1}, {h.b0, h.b1}} {
		for i := r[0]; i < r[1]; i++ {
			if excl {
				l.m[i].Lock()
			} else {
				l.m[i].RLock()
			}
		}
	}
	return h
}

// span is the set of stripes covering the device bytes [lo, hi), not yet
// taken.
func (l *blockLocks) span(lo, hi int64, excl bool) held {
	h := held{l: l, excl: excl}
	r0, r1 := lo>>lockRegionShift, (hi-1)>>lockRegionShift
	if r1-r0+1 >= lockStripes {
		h.a0, h.a1 = 0, lockStripes
	} else if s0, s1 := int(r0%lockStripes), int(r1%lockStripes); s0 <= s1 {
		h.a0, h.a1 = s0, s1+1
	} else {
		// The regions wrap around the table: [0, s1] comes first.
		h.a0, h.a1, h.b0, h.b1 = 0, s1+1, s0, lockStripes
	}
	return h
}

// tryLockShared is lock(lo, hi, false) when no stripe is held exclusive;
// it never waits, and on false holds nothing.
func (l *blockLocks) tryLockShared(lo, hi int64) (held, bool) {
	h := l.span(lo, hi, false)
	taken := 0
	for _, r := range [2][2]int{{h.a0, h.a1}, {h.b0, h.b1}} {
		for i := r[0]; i < r[1]; i++ {
			if !l.m[i].TryRLock() {
				h.unlockFirst(taken)
				return held{}, false
			}
			taken++
		}
	}
	return h, true
}

// unlockFirst releases the first n shared stripes of h, in lock order.
func (h held) unlockFirst(n int) {
	for _, r := range [2][2]int{{h.a0, h.a1}, {h.b0, h.b1}} {
		for i := r[0]; i < r[1] && n > 0; i++ {
			h.l.m[i].RUnlock()
			n--
		}
	}
}

func (h held) unlock() {
	for _, r := range [2][2]int{{h.a0, h.a1}, {h.b0, h.b1}} {
		for i := r[0]; i < r[1]; i++ {
			if h.excl {
				h.l.m[i].Unlock()
			} else {
				h.l.m[i].RUnlock()
			}
		}
	}
}

// readAt fills p with the device bytes at off, any alignment.
func (s *Server) readAt(ctx context.Context, p []byte, off int64) error {
	bs := s.blockSize
	if aligned(off, int64(len(p)), bs) {
		return s.dev.ReadAt(ctx, p, off)
	}
	s.partialOps.Add(1)
	spans, k := split(off, int64(len(p)), bs)
	var scratch *[]byte
	defer func() {
		if scratch != nil {
			putBuf(scratch)
		}
	}()
	for _, sp := range spans[:k] {
		if !sp.partial {
			if err := s.dev.ReadAt(ctx, p[sp.at:sp.at+sp.n], sp.dev); err != nil {
				return fmt.Errorf("read %d whole bytes at %d: %w", sp.n, sp.dev, err)
			}
			continue
		}
		if scratch == nil {
			scratch = getBuf(int(bs))
		}
		if err := s.dev.ReadAt(ctx, *scratch, sp.dev); err != nil {
			return fmt.Errorf("read block at %d for a partial read: %w", sp.dev, err)
		}
		copy(p[sp.at:sp.at+sp.n], (*scratch)[sp.inner:])
	}
	return nil
}

// writeAt writes p at off, any alignment.
func (s *Server) writeAt(ctx context.Context, p []byte, off int64, fua bool) error {
	bs, n := s.blockSize, int64(len(p))
	if aligned(off, n, bs) {
		h := s.locks.lock(off, off+n, false)
		defer h.unlock()
		return s.dev.WriteAt(ctx, p, off, fua)
	}
	return s.modify(ctx, off, n, fua, func(sp span, block []byte) error {
		if !sp.partial {
			return s.dev.WriteAt(ctx, p[sp.at:sp.at+sp.n], sp.dev, fua)
		}
		copy(block[sp.inner:sp.inner+sp.n], p[sp.at:])
		return nil
	})
}

// writeWindows is writeAt of an aligned write whose n bytes are in wins,
// windows of s.ww with their checksums, which it hands on whatever
// happens.
func (s *Server) writeWindows(ctx context.Context, wins [][]byte, crcs []uint32, n, off int64, fua bool) error {
	h := s.locks.lock(off, off+n, false)
	defer h.unlock()
	return s.ww.WriteWindows(ctx, wins, crcs, n, off, fua)
}

// zero makes [off, off+n) read as zeros, any alignment. discard lets the
// device punch a hole. A trim discards only the whole blocks it covers and
// leaves partial blocks as they are, which the protocol allows (a trimmed
// range has undefined contents); write-zeroes zeroes partial blocks by
// read-modify-write.
func (s *Server) zero(ctx context.Context, off, n int64, trim, discard, fua bool) error {
	bs := s.blockSize
	if aligned(off, n, bs) {
		h := s.locks.lock(off, off+n, false)
		defer h.unlock()
		return s.dev.Zero(ctx, off, n, discard, fua)
	}
	if trim {
		spans, k := split(off, n, bs)
		for _, sp := range spans[:k] {
			if sp.partial {
				continue
			}
			h := s.locks.lock(sp.dev, sp.dev+sp.n, false)
			err := s.dev.Zero(ctx, sp.dev, sp.n, true, fua)
			h.unlock()
			if err != nil {
				return fmt.Errorf("trim %d whole bytes at %d: %w", sp.n, sp.dev, err)
			}
		}
		return nil
	}
	return s.modify(ctx, off, n, fua, func(sp span, block []byte) error {
		if !sp.partial {
			return s.dev.Zero(ctx, sp.dev, sp.n, discard, fua)
		}
		clear(block[sp.inner : sp.inner+sp.n])
		return nil
	})
}

// modify runs a request with partial blocks under an exclusive lock of
// every block it touches. For a whole span, fn does the device call
// itself (block is nil); for a partial span, the block has been read into
// block, fn changes it, and modify writes it back.
func (s *Server) modify(ctx context.Context, off, n int64, fua bool, fn func(sp span, block []byte) error) error {
	bs := s.blockSize
	s.partialOps.Add(1)
	lo := off - off%bs
	hi := off + n
	if r := hi % bs; r != 0 {
		hi += bs - r
	}
	h := s.locks.lock(lo, hi, true)
	defer h.unlock()
	scratch := getBuf(int(bs))
	defer putBuf(scratch)
	block := *scratch

	spans, k := split(off, n, bs)
	for _, sp := range spans[:k] {
		if !sp.partial {
			if err := fn(sp, nil); err != nil {
				return fmt.Errorf("write %d whole bytes at %d: %w", sp.n, sp.dev, err)
			}
			continue
		}
		if err := s.dev.ReadAt(ctx, block, sp.dev); err != nil {
			return fmt.Errorf("read block at %d for read-modify-write: %w", sp.dev, err)
		}
		if err := fn(sp, block); err != nil {
			return err
		}
		if err := s.dev.WriteAt(ctx, block, sp.dev, fua); err != nil {
			return fmt.Errorf("write back block at %d after merging %d bytes: %w", sp.dev, sp.n, err)
		}
	}
	return nil
}
