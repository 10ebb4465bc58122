// Package kernelemu stands in for the BUSE kernel module in tests: it
// builds chunks from block writes the way the module does and hands them
// to the BUSE write callback. Test-only (docs/ARCHITECTURE.md §2).
package kernelemu

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/bs3/bs3/internal/chunk"
)

// BuseWriter consumes closed chunks, as the BUSE library's BuseWrite
// callback does: writes is the number of items, chunk the whole chunk
// buffer (metadata area, then the data area). The buffer is reused once
// BuseWrite returns.
type BuseWriter interface {
	BuseWrite(writes int64, chunk []byte) error
}

// BuseReader serves reads, as the BUSE library's BuseRead callback does:
// sector and length are in device blocks, chunk receives the data.
type BuseReader interface {
	BuseRead(sector, length int64, chunk []byte) error
}

// ErrClosed is returned by Emulator calls after Close.
var ErrClosed = errors.New("chunk emulator closed")

// Emulator stands in for the BUSE kernel module in tests: it turns
// block-device writes into chunks the way the module does and hands them
// to a BuseWriter, so the engine's BUSE path can be tested without the
// module (which only builds on 5.11–5.18 kernels).
//
// Each queue has its own open chunk and its own fixed set of chunk
// buffers. Writes are split at collision-area boundaries and numbered by
// a shared chunk.Sequencer, then copied into the queue's open chunk; a write
// longer than the room in an empty chunk is split across chunks (every
// part keeps its seqno). A chunk is closed when its data space or item
// slots run out, or at Flush, and handed to BuseWrite in a goroutine; a
// Write blocks while all of its queue's buffers are in flight. A Write
// returns once its data is copied — when the kernel acknowledges it.
//
// All methods are safe for concurrent use; calls on one queue serialize.
type Emulator struct {
	w       BuseWriter
	l       chunk.Layout
	devSize int64
	seq     *chunk.Sequencer
	queues  []*emuQueue
	closed  atomic.Bool

	errMu sync.Mutex
	err   error // first BuseWrite error, reported by every later Flush
}

// emuQueue is one hardware queue of the emulated device.
type emuQueue struct {
	id   int
	mu   sync.Mutex
	open *chunk.Builder      // chunk being filled, nil when none
	free chan *chunk.Builder // builders whose buffers are neither open nor in flight
	bufs int
}

// New returns an emulator writing chunks of layout l for a device
// of devSize bytes with the given collision area, queues and chunk buffers
// per queue (write.shared_buffer_size / chunk_size). It is a test fixture:
// an impossible geometry panics.
func New(w BuseWriter, l chunk.Layout, devSize, collisionArea int64, queues, buffersPerQueue int) *Emulator {
	switch {
	case l.BlockSize != 512 && l.BlockSize != 4096:
		panic(fmt.Sprintf("chunk.New: block size %d, want 512 or 4096", l.BlockSize))
	case l.ChunkSize < l.BlockSize || l.ChunkSize%l.BlockSize != 0:
		panic(fmt.Sprintf("chunk.New: chunk size %d is not a positive multiple of the block size %d", l.ChunkSize, l.BlockSize))
	case devSize <= 0 || devSize%l.BlockSize != 0:
		panic(fmt.Sprintf("chunk.New: device size %d is not a positive multiple of the block size %d", devSize, l.BlockSize))
	case collisionArea%l.BlockSize != 0:
		panic(fmt.Sprintf("chunk.New: collision area %d is not a multiple of the block size %d", collisionArea, l.BlockSize))
	case queues < 1 || buffersPerQueue < 1:
		panic(fmt.Sprintf("chunk.New: %d queues with %d buffers each", queues, buffersPerQueue))
	}
	e := &Emulator{w: w, l: l, devSize: devSize, seq: chunk.NewSequencer(devSize, collisionArea)}
	for i := range queues {
		q := &emuQueue{id: i, free: make(chan *chunk.Builder, buffersPerQueue), bufs: buffersPerQueue}
		for range buffersPerQueue {
			q.free <- chunk.NewBuilder(l, make([]byte, l.BufferSize()))
		}
		e.queues = append(e.queues, q)
	}
	return e
}

// Write copies data, written at byte offset off, into queue's open chunk.
func (e *Emulator) Write(queue int, off int64, data []byte) error {
	q, err := e.check(queue, off, int64(len(data)))
	if err != nil {
		return fmt.Errorf("write %d bytes at %d: %w", len(data), off, err)
	}
	defer q.mu.Unlock()
	e.seq.Split(off, int64(len(data)), func(poff, plen int64, seq uint64) {
		d := data[poff-off : poff-off+plen]
		for len(d) > 0 {
			b := e.openChunk(q)
			n := int64(len(d))
			if !b.Fits(n) {
				if b.Items() > 0 {
					e.closeChunk(q)
					continue
				}
				n = e.l.ChunkSize // longer than a whole chunk: fill this one
			}
			b.Add(chunk.Item{Sector: uint64(poff / chunk.SectorSize), Length: uint64(n / chunk.SectorSize), Seqno: seq, Flag: chunk.OpWrite}, d[:n])
			if b.Full() {
				e.closeChunk(q)
			}
			d = d[n:]
			poff += n
		}
	})
	return nil
}

// Discard records a discard of length bytes at off (an item without data).
func (e *Emulator) Discard(queue int, off, length int64) error {
	return e.dataless(queue, off, length, chunk.OpDiscard)
}

// WriteZeroes records a write-zeroes of length bytes at off (an item
// without data).
func (e *Emulator) WriteZeroes(queue int, off, length int64) error {
	return e.dataless(queue, off, length, chunk.OpWriteZeroes)
}

func (e *Emulator) dataless(queue int, off, length int64, flag uint64) error {
	q, err := e.check(queue, off, length)
	if err != nil {
		return fmt.Errorf("op %d on %d bytes at %d: %w", flag, length, off, err)
	}
	defer q.mu.Unlock()
	e.seq.Split(off, length, func(poff, plen int64, seq uint64) {
		b := e.openChunk(q)
		if !b.Fits(0) {
			e.closeChunk(q)
			b = e.openChunk(q)
		}
		b.Add(chunk.Item{Sector: uint64(poff / chunk.SectorSize), Length: uint64(plen / chunk.SectorSize), Seqno: seq, Flag: flag}, nil)
		if b.Full() {
			e.closeChunk(q)
		}
	})
	return nil
}

// check validates a request and returns its queue locked.
func (e *Emulator) check(queue int, off, length int64) (*emuQueue, error) {
	if queue < 0 || queue >= len(e.queues) {
		return nil, fmt.Errorf("queue %d of %d", queue, len(e.queues))
	}
	if off < 0 || length < 0 || off+length > e.devSize || off%e.l.BlockSize != 0 || length%e.l.BlockSize != 0 {
		return nil, fmt.Errorf("outside the %d-byte device or not aligned to %d-byte blocks", e.devSize, e.l.BlockSize)
	}
	q := e.queues[queue]
	q.mu.Lock()
	// Checked under the queue lock: Close sets the flag before it takes
	// the queue locks, so no write slips in after the final flush.
	if e.closed.Load() {
		q.mu.Unlock()
		return nil, ErrClosed
	}
	return q, nil
}

// openChunk returns q's open chunk, taking a free buffer (and waiting for
// one, as the kernel does when the shared buffer is full) if there is
// none. The caller holds q.mu.
func (e *Emulator) openChunk(q *emuQueue) *chunk.Builder {
	if q.open == nil {
		q.open = <-q.free
	}
	return q.open
}

// closeChunk seals q's open chunk and hands it to BuseWrite in a
// goroutine; the buffer returns to q.free when BuseWrite is done. The
// caller holds q.mu.
func (e *Emulator) closeChunk(q *emuQueue) {
	b := q.open
	q.open = nil
	if b == nil {
		return
	}
	if b.Items() == 0 {
		q.free <- b
		return
	}
	n := b.Items()
	b.Seal()
	go func() {
		if err := e.w.BuseWrite(int64(n), b.Buffer()); err != nil {
			e.errMu.Lock()
			if e.err == nil {
				e.err = fmt.Errorf("chunk of %d writes from queue %d: %w", n, q.id, err)
			}
			e.errMu.Unlock()
		}
		b.Reset()
		q.free <- b
	}()
}

// Flush closes every open chunk and waits until every chunk closed so far
// has been through BuseWrite (a durable flush). It returns the first
// BuseWrite error seen since the emulator was created: a failed chunk is
// lost data, so every later Flush reports it too.
func (e *Emulator) Flush() error {
	if e.closed.Load() {
		return ErrClosed
	}
	return e.flush()
}

func (e *Emulator) flush() error {
	for _, q := range e.queues {
		q.mu.Lock()
		e.closeChunk(q)
		// Every buffer back in free means nothing of this queue is in
		// flight; the queue lock keeps new chunks out meanwhile.
		held := make([]*chunk.Builder, 0, q.bufs)
		for range q.bufs {
			held = append(held, <-q.free)
		}
		for _, b := range held {
			q.free <- b
		}
		q.mu.Unlock()
	}
	e.errMu.Lock()
	defer e.errMu.Unlock()
	return e.err
}

// Close flushes and stops the emulator; later calls return
// ErrClosed, a second Close returns nil.
func (e *Emulator) Close() error {
	if e.closed.Swap(true) {
		return nil
	}
	return e.flush()
}
