package gc

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/volume"
)

const (
	kib = 1 << 10
	mib = 1 << 20
)

// model is the reference content of the device: per block, the version
// of its newest acknowledged write (absent or 0: zeros).
type model struct {
	bs int64

	mu       sync.Mutex
	ver      map[int64]uint64
	assigned map[int64]uint64 // newest version handed to a write in flight
	next     uint64
}

func newModel(bs int64) *model {
	return &model{bs: bs, ver: make(map[int64]uint64), assigned: make(map[int64]uint64)}
}

// prepare hands out versions for n blocks at block and returns their data.
func (m *model) prepare(block, n int64) ([]byte, []uint64) {
	m.mu.Lock()
	vers := make([]uint64, n)
	for i := range vers {
		m.next++
		vers[i] = m.next
		m.assigned[block+int64(i)] = m.next
	}
	m.mu.Unlock()
	buf := make([]byte, n*m.bs)
	for i, v := range vers {
		enginetest.BlockVersion(buf[int64(i)*m.bs:int64(i+1)*m.bs], block+int64(i), v)
	}
	return buf, vers
}

// acked records that the write of vers at block was acknowledged.
func (m *model) acked(block int64, vers []uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, v := range vers {
		m.ver[block+int64(i)] = v
	}
}

// write writes fresh versions of n blocks at block through the device
// and records them.
func (m *model) write(tb testing.TB, dev frontend.Device, block, n int64) {
	tb.Helper()
	if err := m.tryWrite(dev, block, n); err != nil {
		tb.Fatal(err)
	}
}

// tryWrite is write for goroutines other than the test's.
func (m *model) tryWrite(dev frontend.Device, block, n int64) error {
	buf, vers := m.prepare(block, n)
	if err := dev.WriteAt(context.Background(), buf, block*m.bs, false); err != nil {
		return fmt.Errorf("write blocks %d+%d: %w", block, n, err)
	}
	m.acked(block, vers)
	return nil
}

// discard discards n blocks at block through the device and records it.
func (m *model) discard(tb testing.TB, dev frontend.Device, block, n int64) {
	tb.Helper()
	if err := m.tryDiscard(dev, block, n); err != nil {
		tb.Fatal(err)
	}
}

func (m *model) tryDiscard(dev frontend.Device, block, n int64) error {
	if err := dev.Zero(context.Background(), block*m.bs, n*m.bs, true, false); err != nil {
		return fmt.Errorf("discard blocks %d+%d: %w", block, n, err)
	}
	m.acked(block, make([]uint64, n))
	return nil
}

// liveBytes is the data the device holds: blocks whose newest write has
// data.
func (m *model) liveBytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var n int64
	for _, v := range m.ver {
		if v != 0 {
			n++
		}
	}
	return n * m.bs
}

// expect returns the expected content of n blocks at block.
func (m *model) expect(block, n int64) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]byte, n*m.bs)
	for i := int64(0); i < n; i++ {
		enginetest.BlockVersion(out[i*m.bs:(i+1)*m.bs], block+i, m.ver[block+i])
	}
	return out
}

// verify reads blocks [0, upTo) in 1 MiB pieces and compares them with
// the model.
func (m *model) verify(tb testing.TB, dev frontend.Device, upTo int64) {
	tb.Helper()
	step := int64(mib) / m.bs
	buf := make([]byte, step*m.bs)
	for b := int64(0); b < upTo; b += step {
		n := min(step, upTo-b)
		p := buf[:n*m.bs]
		if err := dev.ReadAt(context.Background(), p, b*m.bs); err != nil {
			tb.Fatalf("read blocks %d+%d: %v", b, n, err)
		}
		if want := m.expect(b, n); !bytes.Equal(p, want) {
			i := firstDiff(p, want)
			blk := b + int64(i)/m.bs
			got := p[int64(i)/m.bs*m.bs:]
			tb.Fatalf("block %d differs from the model: got block %d version %d, want version %d",
				blk, binary.LittleEndian.Uint64(got), binary.LittleEndian.Uint64(got[8:]), m.version(blk))
		}
	}
}

func (m *model) version(block int64) uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ver[block]
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// workload overwrites blocks [base, base+ws) with random writes of 4–64
// KiB (and one discard in 20) until written bytes have gone through the
// device, flushing now and then so that some chunks close half full.
func workload(tb testing.TB, e *enginetest.Engine, m *model, rng *rand.Rand, base, ws, written int64) {
	tb.Helper()
	bs := m.bs
	maxBlocks := 64 * kib / bs
	for done := int64(0); done < written; {
		n := 1 + rng.Int64N(maxBlocks)
		b := base + rng.Int64N(ws-n+1)
		switch r := rng.IntN(100); {
		case r < 5:
			m.discard(tb, e.Dev, b, n)
		default:
			m.write(tb, e.Dev, b, n)
			done += n * bs
		}
		if rng.IntN(200) == 0 {
			if err := e.Dev.Flush(context.Background()); err != nil {
				tb.Fatalf("flush: %v", err)
			}
		}
	}
	drain(tb, e)
}

// fill writes blocks [0, n) sequentially in 1 MiB writes.
func fill(tb testing.TB, e *enginetest.Engine, m *model, n int64) {
	tb.Helper()
	step := int64(mib) / m.bs
	for b := int64(0); b < n; b += step {
		m.write(tb, e.Dev, b, min(step, n-b))
	}
	drain(tb, e)
}

func drain(tb testing.TB, e *enginetest.Engine) {
	tb.Helper()
	if err := e.Dev.Drain(context.Background()); err != nil {
		tb.Fatalf("drain: %v", err)
	}
}

// bucket is what a listing shows of the data objects: key → size.
type bucket map[int64]int64

func listData(tb testing.TB, st store.Store) bucket {
	tb.Helper()
	b := make(bucket)
	err := st.List(context.Background(), "", func(name string, size int64) error {
		if k, ok := store.ParseDataName(name); ok {
			b[k] = size
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("list bucket: %v", err)
	}
	return b
}

func (b bucket) bytes() int64 {
	var n int64
	for _, s := range b {
		n += s
	}
	return n
}

func (b bucket) keys() []int64 {
	ks := make([]int64, 0, len(b))
	for k := range b {
		ks = append(ks, k)
	}
	sort.Slice(ks, func(i, j int) bool { return ks[i] < ks[j] })
	return ks
}

// objState is what the map says of one object.
type objState struct {
	live, total int64
	tracked     bool
}

// mapState returns the map's accounting of keys, with the watermark and
// delete floor read on the map goroutine.
func mapState(tb testing.TB, v Volume, keys []int64) (map[int64]objState, int64, int64) {
	tb.Helper()
	out := make(map[int64]objState, len(keys))
	var wm, floor int64
	err := v.MapDo(context.Background(), mapproxy.High, func(m *extentmap.Map) {
		wm, floor = v.Watermark(), v.DeleteFloor()
		for _, k := range keys {
			l, t, ok := m.Live(k)
			out[k] = objState{l, t, ok}
		}
	})
	if err != nil {
		tb.Fatalf("query map: %v", err)
	}
	return out, wm, floor
}

// checkBucket runs a dead pass, then asserts the invariants dead GC
// keeps: no object past the watermark; every key from the floor to the
// watermark present (data or placeholder), so a roll-forward from the
// oldest checkpoint is contiguous; no object with data that the map does
// not reference except the newest; placeholders only at or above the floor
// the pass saw (a periodic checkpoint may raise it meanwhile).
func checkBucket(tb testing.TB, c *Collector, st store.Store) bucket {
	tb.Helper()
	v := c.v
	passFloor := v.DeleteFloor()
	if _, err := c.CollectDead(context.Background()); err != nil {
		tb.Fatalf("dead pass: %v", err)
	}
	b := listData(tb, st)
	state, wm, floor := mapState(tb, v, b.keys())
	for k := floor; k < wm; k++ {
		if _, ok := b[k]; !ok {
			tb.Errorf("key %d between the delete floor %d and the watermark %d is missing: roll-forward would stop there", k, floor, wm)
		}
	}
	for _, k := range b.keys() {
		s, size := state[k], b[k]
		// A claim record stands for its attach's window like a
		// placeholder, and is kept until it falls below the floor.
		claim := false
		if size > 0 && size < v.Layout().MetadataSize() {
			head := make([]byte, volume.ClaimMagicLen)
			n, err := st.GetRange(context.Background(), store.DataName(k), 0, head)
			claim = err == nil && volume.IsClaimRecord(head[:n])
		}
		switch {
		case k >= wm:
			tb.Errorf("object of key %d at or past the watermark %d", k, wm)
		case (size == 0 || claim) && k < passFloor:
			tb.Errorf("placeholder or claim record of key %d below the delete floor %d was not deleted", k, passFloor)
		case claim:
		case size > 0 && s.live == 0 && k != wm-1:
			tb.Errorf("object of key %d (%d bytes, map: %+v) holds no live block but was not reclaimed", k, size, s)
		}
	}
	return b
}

// testLogger logs warnings and errors of the collector into the test log.
func testLogger(tb testing.TB) zerolog.Logger {
	return zerolog.New(zerolog.NewTestWriter(tb)).Level(zerolog.WarnLevel)
}

func describe(s Stats) string {
	return fmt.Sprintf("examined %d compacted %d reclaimed %d placeholders %d in use %d read %d written %d freed %d in %v",
		s.Examined, s.Compacted, s.Reclaimed, s.Placeholders, s.InUse, s.BytesRead, s.BytesWritten, s.BytesFreed, s.Duration)
}

// The volume is what the collector runs on.
var _ Volume = (*volume.Volume)(nil)
