package volume

import (
	"bytes"
	"context"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// model is the reference of what the device must hold: the newest
// acknowledged content of every written block.
type model struct {
	mu     sync.Mutex
	bs     int64
	blocks map[int64][]byte // nil slice: written as zeros (discarded)
}

func newModel(bs int64) *model { return &model{bs: bs, blocks: make(map[int64][]byte)} }

func (m *model) write(off int64, data []byte) {
	for i := int64(0); i < int64(len(data))/m.bs; i++ {
		m.blocks[off/m.bs+i] = append([]byte(nil), data[i*m.bs:(i+1)*m.bs]...)
	}
}

func (m *model) zero(off, length int64) {
	for b := off / m.bs; b < (off+length)/m.bs; b++ {
		m.blocks[b] = nil
	}
}

// expect returns the expected content of n blocks at block.
func (m *model) expect(block, n int64) []byte {
	out := make([]byte, n*m.bs)
	for i := int64(0); i < n; i++ {
		if d := m.blocks[block+i]; d != nil {
			copy(out[i*m.bs:], d)
		}
	}
	return out
}

// runs returns the written blocks grouped into runs of at most max blocks.
func (m *model) runs(max int64) [][2]int64 {
	keys := make([]int64, 0, len(m.blocks))
	for b := range m.blocks {
		keys = append(keys, b)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	var runs [][2]int64
	for _, b := range keys {
		if k := len(runs); k > 0 && runs[k-1][0]+runs[k-1][1] == b && runs[k-1][1] < max {
			runs[k-1][1]++
			continue
		}
		runs = append(runs, [2]int64{b, 1})
	}
	return runs
}

// reader is anything that reads n blocks at block.
type reader func(block, n int64, buf []byte) error

// verify reads every written run and some random unwritten ranges and
// compares them with the model.
func (m *model) verify(t *testing.T, devBlocks int64, read reader, rng *rand.Rand) {
	t.Helper()
	for _, r := range m.runs(256) {
		buf := make([]byte, r[1]*m.bs)
		if err := read(r[0], r[1], buf); err != nil {
			t.Fatalf("read blocks %d+%d: %v", r[0], r[1], err)
		}
		if want := m.expect(r[0], r[1]); !bytes.Equal(buf, want) {
			t.Fatalf("blocks %d+%d differ from the model (first differing byte %d)", r[0], r[1], firstDiff(buf, want))
		}
	}
	for i := 0; i < 50; i++ {
		n := int64(1 + rng.IntN(64))
		b := rng.Int64N(devBlocks - n)
		buf := make([]byte, n*m.bs)
		if err := read(b, n, buf); err != nil {
			t.Fatalf("read blocks %d+%d: %v", b, n, err)
		}
		if want := m.expect(b, n); !bytes.Equal(buf, want) {
			t.Fatalf("blocks %d+%d (mostly unwritten) differ from the model at byte %d", b, n, firstDiff(buf, want))
		}
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

func randomData(rng *rand.Rand, n int64) []byte {
	b := make([]byte, n)
	for i := 0; i+8 <= len(b); i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func testOptions(size, bs int64) Options {
	return Options{
		Size:               size,
		BlockSize:          bs,
		ChunkSize:          4 << 20,
		ConditionalWrites:  true,
		CheckpointInterval: time.Hour,
		CheckpointObjects:  1 << 30,
		MaxInflight:        64,
		MapIdleTimeout:     50 * time.Millisecond,
		Cache:              newTestCache(64<<20, 256<<10),
		Logger:             zerolog.Nop(),
	}
}

// newTestCache is a read cache for tests: on by default, as in production.
func newTestCache(mem, window int64) *cache.Cache {
	c, err := cache.New(cache.Options{MemoryBytes: mem, Window: window, Logger: zerolog.Nop()})
	if err != nil {
		panic(err) // constant arguments: a bug in the test
	}
	return c
}

func newProxy(st store.Store) *objproxy.Proxy {
	return objproxy.New(st, objproxy.Options{Uploaders: 16, Downloaders: 16, Logger: zerolog.Nop()})
}

func open(t *testing.T, st store.Store, o Options) (*Volume, *objproxy.Proxy) {
	t.Helper()
	objs := newProxy(st)
	v, err := Open(context.Background(), objs, o)
	if err != nil {
		objs.Close()
		t.Fatalf("open volume: %v", err)
	}
	return v, objs
}

func (v *Volume) readFn() reader {
	return func(block, n int64, buf []byte) error { return v.Read(context.Background(), block, n, buf) }
}
