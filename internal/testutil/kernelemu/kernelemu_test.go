package kernelemu

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/testutil"
)

// recorder is a BuseWriter that checks and keeps a copy of every chunk.
type recorder struct {
	t          *testing.T
	l          chunk.Layout
	devSectors uint64

	gate   chan struct{}        // if set, each BuseWrite waits for a token
	notify chan chunk.Parsed    // if set, receives every chunk's items
	fail   func(call int) error // if set, the result of each BuseWrite

	mu          sync.Mutex
	calls       int
	inflight    int
	maxInflight int
	chunks      []recorded
}

type recorded struct {
	p    chunk.Parsed
	body []byte // metadata area and data
}

func newRecorder(t *testing.T, l chunk.Layout, devSize int64) *recorder {
	return &recorder{t: t, l: l, devSectors: uint64(devSize / chunk.SectorSize)}
}

func (r *recorder) BuseWrite(writes int64, buf []byte) error {
	r.mu.Lock()
	call := r.calls
	r.calls++
	r.inflight++
	r.maxInflight = max(r.maxInflight, r.inflight)
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.inflight--
		r.mu.Unlock()
	}()
	if r.gate != nil {
		<-r.gate
	}

	if int64(len(buf)) != r.l.BufferSize() {
		r.t.Errorf("BuseWrite got a %d-byte buffer, want the whole %d-byte chunk buffer", len(buf), r.l.BufferSize())
		return nil
	}
	p, err := r.l.Parse(buf, int(writes), r.devSectors)
	if err != nil {
		r.t.Errorf("chunk does not parse: %v", err)
		return nil
	}
	if int64(len(p.Items)) != writes {
		r.t.Errorf("BuseWrite says %d writes, chunk has %d items", writes, len(p.Items))
	}
	// The list must also end by itself (buffers are reused: stale items
	// from an earlier chunk must be zeroed).
	if q, err := r.l.Parse(buf, -1, r.devSectors); err != nil || !slices.Equal(q.Items, p.Items) {
		r.t.Errorf("zero-terminated parse differs: %d items, %v", len(q.Items), err)
	}
	body := bytes.Clone(buf[:p.End])
	r.mu.Lock()
	r.chunks = append(r.chunks, recorded{p, body})
	r.mu.Unlock()
	if r.notify != nil {
		r.notify <- p
	}
	if r.fail != nil {
		return r.fail(call)
	}
	return nil
}

func (r *recorder) all() []recorded {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.chunks)
}

// reconstruct rebuilds the device from chunks, applying items by seqno
// per block, as the extent map does; two items on one block with the same
// seqno mean the numbering is broken.
func reconstruct(t *testing.T, l chunk.Layout, devSize int64, chunks []recorded) (data []byte, seqs []uint64) {
	t.Helper()
	bs := l.BlockSize
	data = make([]byte, devSize)
	seqs = make([]uint64, devSize/bs)
	for _, c := range chunks {
		for i, it := range c.p.Items {
			first := int64(it.Sector) * chunk.SectorSize / bs
			for k := range it.Bytes() / bs {
				blk := first + k
				switch {
				case it.Seqno == seqs[blk]:
					t.Fatalf("block %d written twice with seqno %d", blk, it.Seqno)
				case it.Seqno < seqs[blk]:
					continue
				}
				seqs[blk] = it.Seqno
				dst := data[blk*bs : (blk+1)*bs]
				if c.p.DataOff[i] < 0 {
					clear(dst)
				} else {
					src := c.p.DataOff[i] + k*bs
					copy(dst, c.body[src:src+bs])
				}
			}
		}
	}
	return data, seqs
}

func receive(t *testing.T, ch chan chunk.Parsed, what string) chunk.Parsed {
	t.Helper()
	select {
	case p := <-ch:
		return p
	case <-time.After(20 * time.Second):
		t.Fatalf("no chunk: %s", what)
		return chunk.Parsed{}
	}
}

func noChunk(t *testing.T, ch chan chunk.Parsed, what string) {
	t.Helper()
	select {
	case p := <-ch:
		t.Fatalf("unexpected chunk of %d items: %s", len(p.Items), what)
	default:
	}
}

func TestEmulatorMatchesModel(t *testing.T) {
	for _, tc := range []struct {
		name        string
		l           chunk.Layout
		dev, area   int64
		queues, buf int
	}{
		{"4k blocks", chunk.Layout{ChunkSize: 64 << 10, BlockSize: 4096}, 1 << 20, 128 << 10, 3, 2},
		{"512 blocks", chunk.Layout{ChunkSize: 16 << 10, BlockSize: 512}, 512 << 10, 8 << 10, 2, 1},
		{"area wider than chunk", chunk.Layout{ChunkSize: 32 << 10, BlockSize: 4096}, 1 << 20, 256 << 10, 1, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder(t, tc.l, tc.dev)
			e := New(rec, tc.l, tc.dev, tc.area, tc.queues, tc.buf)
			model := make([]byte, tc.dev)
			rnd := rand.New(rand.NewPCG(7, uint64(tc.dev)))
			bs := tc.l.BlockSize
			blocks := tc.dev / bs
			for i := range 600 {
				off := rnd.Int64N(blocks) * bs
				n := min(rnd.Int64N(3*tc.l.ChunkSize/bs)+1, blocks-off/bs) * bs
				q := rnd.IntN(tc.queues)
				var err error
				switch k := rnd.IntN(10); {
				case k < 7:
					// Words unique to this op and position: misplaced data
					// cannot match by accident.
					d := make([]byte, n)
					for j := 0; j < len(d); j += 8 {
						binary.LittleEndian.PutUint64(d[j:], uint64(i+1)<<32|uint64(j))
					}
					err = e.Write(q, off, d)
					copy(model[off:], d)
				case k < 9:
					err = e.Discard(q, off, n)
					clear(model[off : off+n])
				default:
					err = e.WriteZeroes(q, off, n)
					clear(model[off : off+n])
				}
				if err != nil {
					t.Fatalf("op %d: %v", i, err)
				}
				if i%150 == 149 {
					// Flush is durable: everything written so far has been
					// through BuseWrite when it returns.
					if err := e.Flush(); err != nil {
						t.Fatal(err)
					}
					got, _ := reconstruct(t, tc.l, tc.dev, rec.all())
					if !bytes.Equal(got, model) {
						t.Fatalf("after op %d: device rebuilt from chunks differs from the model at byte %d", i, firstDiff(got, model))
					}
				}
			}
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			if len(rec.all()) < 10 {
				t.Fatalf("only %d chunks: the test does not exercise chunk boundaries", len(rec.all()))
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

func TestEmulatorClosesWhenSlotsRunOut(t *testing.T) {
	l := chunk.Layout{ChunkSize: 32 << 10, BlockSize: 4096} // 8 slots
	const dev = 1 << 20
	rec := newRecorder(t, l, dev)
	rec.notify = make(chan chunk.Parsed, 64)
	e := New(rec, l, dev, 0, 1, 2)

	// Four one-block writes and four discards: the slots are gone with
	// only half the data space used.
	for i := range 4 {
		if err := e.Write(0, int64(i)*8192, pattern(4096, byte(i))); err != nil {
			t.Fatal(err)
		}
		noChunk(t, rec.notify, "slots left")
		if err := e.Discard(0, int64(i)*8192+4096, 4096); err != nil {
			t.Fatal(err)
		}
	}
	p := receive(t, rec.notify, "8 items fill the 8 slots")
	if len(p.Items) != 8 || p.End != 8*32+4*4096 {
		t.Fatalf("chunk of %d items ending at %d, want 8 items ending at %d", len(p.Items), p.End, 8*32+4*4096)
	}

	// Many tiny writes: 100 one-block writes make 12 full chunks of 8
	// without a flush, the last 4 items come with Flush.
	for i := range 100 {
		if err := e.Write(0, int64(i)*4096, pattern(4096, byte(i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 12 {
		if p := receive(t, rec.notify, "full chunk of tiny writes"); len(p.Items) != 8 {
			t.Fatalf("chunk %d has %d items, want 8", i, len(p.Items))
		}
	}
	noChunk(t, rec.notify, "4 writes left in the open chunk")
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if p := receive(t, rec.notify, "flush"); len(p.Items) != 4 {
		t.Fatalf("flushed chunk has %d items, want 4", len(p.Items))
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	noChunk(t, rec.notify, "a flush with nothing open sends no chunk")
}

func TestEmulatorClosesWhenDataRunsOut(t *testing.T) {
	l := chunk.Layout{ChunkSize: 64 << 10, BlockSize: 4096}
	const dev = 4 << 20
	rec := newRecorder(t, l, dev)
	rec.notify = make(chan chunk.Parsed, 64)
	e := New(rec, l, dev, 1<<20, 1, 2)

	if err := e.Write(0, 0, pattern(60<<10, 1)); err != nil {
		t.Fatal(err)
	}
	noChunk(t, rec.notify, "4 KiB left")
	if err := e.Write(0, 1<<20, pattern(8<<10, 2)); err != nil {
		t.Fatal(err)
	}
	// 8 KiB did not fit into the 4 KiB left: the first chunk is closed
	// with its one write, and the new write opens the next chunk.
	p := receive(t, rec.notify, "data space used up")
	if len(p.Items) != 1 || p.Items[0].Bytes() != 60<<10 {
		t.Fatalf("first chunk: %+v", p.Items)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	p = receive(t, rec.notify, "flush")
	if len(p.Items) != 1 || p.Items[0].Sector != (1<<20)/512 || p.DataOff[0] != 512 {
		t.Fatalf("second chunk: %+v at %v", p.Items, p.DataOff)
	}

	// 200 KiB within one collision area: three full chunks close at once,
	// the last 8 KiB waits for Flush; all parts keep the write's seqno and
	// cover the range contiguously.
	if err := e.Write(0, 2<<20, pattern(200<<10, 3)); err != nil {
		t.Fatal(err)
	}
	var parts []chunk.Item
	for range 3 {
		p := receive(t, rec.notify, "full chunk of a long write")
		if len(p.Items) != 1 || p.Items[0].Bytes() != 64<<10 {
			t.Fatalf("part of a long write: %+v", p.Items)
		}
		parts = append(parts, p.Items[0])
	}
	noChunk(t, rec.notify, "8 KiB left in the open chunk")
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	parts = append(parts, receive(t, rec.notify, "flush").Items...)
	slices.SortFunc(parts, func(a, b chunk.Item) int { return int(a.Sector) - int(b.Sector) })
	next := uint64(2<<20) / 512
	for _, it := range parts {
		if it.Sector != next || it.Seqno != parts[0].Seqno {
			t.Fatalf("parts of the long write: %+v", parts)
		}
		next += it.Length
	}
	if next != (2<<20+200<<10)/512 {
		t.Fatalf("parts end at sector %d", next)
	}
	got, _ := reconstruct(t, l, dev, rec.all())
	if !bytes.Equal(got[2<<20:2<<20+200<<10], pattern(200<<10, 3)) {
		t.Fatal("long write reads back wrong")
	}
}

func TestEmulatorBoundsBuffersInFlight(t *testing.T) {
	l := chunk.Layout{ChunkSize: 16 << 10, BlockSize: 4096}
	const dev = 1 << 20
	rec := newRecorder(t, l, dev)
	rec.gate = make(chan struct{})
	e := New(rec, l, dev, 0, 2, 2)

	var mu sync.Mutex
	completed := 0
	done := make(chan error, 1)
	go func() {
		for i := range 5 {
			if err := e.Write(0, int64(i)*16<<10, pattern(16<<10, byte(i))); err != nil {
				done <- err
				return
			}
			mu.Lock()
			completed++
			mu.Unlock()
		}
		done <- nil
	}()
	inflight := func() int { rec.mu.Lock(); defer rec.mu.Unlock(); return rec.inflight }
	testutil.WaitFor(t, "both buffers of queue 0 in flight", func() bool { return inflight() == 2 })
	// The third write needs a buffer; none comes back while BuseWrite
	// is held, so it cannot have completed.
	mu.Lock()
	c := completed
	mu.Unlock()
	if c > 2 {
		t.Fatalf("%d writes completed with both buffers in flight", c)
	}
	// Queue 1 has its own buffers.
	if err := e.Write(1, 512<<10, pattern(4096, 9)); err != nil {
		t.Fatal(err)
	}
	close(rec.gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	maxInflight := rec.maxInflight
	rec.mu.Unlock()
	if maxInflight > 2+1 {
		t.Fatalf("%d chunks in flight at once, at most 2 per queue (+1 from queue 1)", maxInflight)
	}
	if len(rec.all()) != 6 {
		t.Fatalf("%d chunks, want 6", len(rec.all()))
	}
}

func TestEmulatorReportsWriteErrors(t *testing.T) {
	l := chunk.Layout{ChunkSize: 16 << 10, BlockSize: 4096}
	errStore := errors.New("upload failed")
	rec := newRecorder(t, l, 1<<20)
	rec.fail = func(call int) error {
		if call == 1 {
			return errStore
		}
		return nil
	}
	e := New(rec, l, 1<<20, 0, 1, 1)
	for i := range 3 {
		if err := e.Write(0, int64(i)*16<<10, pattern(16<<10, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Flush(); !errors.Is(err, errStore) {
		t.Fatalf("flush after a failed chunk: %v", err)
	}
	if err := e.Write(0, 0, pattern(4096, 1)); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); !errors.Is(err, errStore) {
		t.Fatalf("the failure must stick: close returned %v", err)
	}
}

func TestEmulatorRejects(t *testing.T) {
	l := chunk.Layout{ChunkSize: 16 << 10, BlockSize: 4096}
	rec := newRecorder(t, l, 1<<20)
	e := New(rec, l, 1<<20, 0, 2, 1)
	for name, err := range map[string]error{
		"queue":          e.Write(2, 0, make([]byte, 4096)),
		"negative queue": e.Discard(-1, 0, 4096),
		"unaligned off":  e.Write(0, 512, make([]byte, 4096)),
		"unaligned len":  e.WriteZeroes(0, 0, 1000),
		"past the end":   e.Write(0, 1<<20-4096, make([]byte, 8192)),
		"negative off":   e.Discard(0, -4096, 4096),
	} {
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if len(rec.all()) != 0 {
		t.Fatal("a rejected request produced a chunk")
	}
	if err := e.Write(0, 0, make([]byte, 4096)); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after close: %v", err)
	}
	if err := e.Flush(); !errors.Is(err, ErrClosed) {
		t.Fatalf("flush after close: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

// stamp fills a block with a pattern naming the queue, the op and the
// block, so the rebuilt device shows which write won.
func stamp(q, op int, blk int64, bs int64) []byte {
	b := make([]byte, bs)
	for i := int64(0); i < bs; i += 16 {
		binary.LittleEndian.PutUint32(b[i:], uint32(q))
		binary.LittleEndian.PutUint32(b[i+4:], uint32(op))
		binary.LittleEndian.PutUint64(b[i+8:], uint64(blk))
	}
	return b
}

// TestEmulatorConcurrentQueues runs 8 queues at once over overlapping
// ranges. Every block must end up with the last op some queue made to it
// (within a queue the seqnos follow the op order), and every collision
// area must have handed out each seqno 1..n once.
func TestEmulatorConcurrentQueues(t *testing.T) {
	const queues = 8
	l := chunk.Layout{ChunkSize: 64 << 10, BlockSize: 4096}
	const dev, area = 2 << 20, 256 << 10
	bs := l.BlockSize
	rec := newRecorder(t, l, dev)
	e := New(rec, l, dev, area, queues, 2)

	type last struct {
		op   int // -1: never touched by this queue
		zero bool
	}
	lasts := make([][]last, queues)
	pieces := make([][]int, queues) // per queue, pieces per area
	var wg sync.WaitGroup
	for q := range queues {
		lasts[q] = make([]last, dev/bs)
		for i := range lasts[q] {
			lasts[q][i].op = -1
		}
		pieces[q] = make([]int, dev/area)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(uint64(q), 99))
			for op := range 100 {
				first := rnd.Int64N(dev / bs)
				n := min(rnd.Int64N(24)+1, dev/bs-first)
				off := first * bs
				var err error
				zero := false
				switch k := rnd.IntN(10); {
				case k < 8:
					d := make([]byte, 0, n*bs)
					for b := first; b < first+n; b++ {
						d = append(d, stamp(q, op, b, bs)...)
					}
					err = e.Write(q, off, d)
				case k < 9:
					err = e.Discard(q, off, n*bs)
					zero = true
				default:
					err = e.WriteZeroes(q, off, n*bs)
					zero = true
				}
				if err != nil {
					t.Errorf("queue %d op %d: %v", q, op, err)
					return
				}
				for b := first; b < first+n; b++ {
					lasts[q][b] = last{op, zero}
				}
				for a := off / area; a <= (off+n*bs-1)/area; a++ {
					pieces[q][a]++
				}
			}
		}()
	}
	wg.Wait()
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}

	chunks := rec.all()
	got, _ := reconstruct(t, l, dev, chunks)
	zeros := make([]byte, bs)
	for b := range dev / bs {
		have := got[b*bs : (b+1)*bs]
		var allowed [][]byte
		for q := range queues {
			switch x := lasts[q][b]; {
			case x.op < 0:
			case x.zero:
				allowed = append(allowed, zeros)
			default:
				allowed = append(allowed, stamp(q, x.op, b, bs))
			}
		}
		if len(allowed) == 0 {
			allowed = append(allowed, zeros)
		}
		if !slices.ContainsFunc(allowed, func(a []byte) bool { return bytes.Equal(a, have) }) {
			t.Fatalf("block %d holds %x..., which is no queue's last op to it", b, have[:16])
		}
	}

	seqs := make(map[int64]map[uint64]bool)
	for _, c := range chunks {
		for _, it := range c.p.Items {
			a := int64(it.Sector) * chunk.SectorSize / area
			if seqs[a] == nil {
				seqs[a] = make(map[uint64]bool)
			}
			seqs[a][it.Seqno] = true
		}
	}
	for a := range dev / area {
		want := 0
		for q := range queues {
			want += pieces[q][a]
		}
		for s := 1; s <= want; s++ {
			if !seqs[int64(a)][uint64(s)] {
				t.Fatalf("area %d: seqno %d missing (want 1..%d)", a, s, want)
			}
		}
		if len(seqs[int64(a)]) != want {
			t.Fatalf("area %d: %d distinct seqnos, want %d", a, len(seqs[int64(a)]), want)
		}
	}
	t.Logf("%d chunks from %d queues", len(chunks), queues)
}

// pattern returns n bytes derived from seed.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}
