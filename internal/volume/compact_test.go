package volume

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
)

// directReadFn reads blocks the way a reader of compact objects must: the
// map gives key and block offset, DataStartIn where the object's data
// area starts; the bytes come straight from the store.
func (v *Volume) directReadFn(st store.Store) reader {
	return func(block, n int64, buf []byte) error {
		bs := v.BlockSize()
		var exts []extentmap.Extent
		starts := make(map[int64]int64)
		err := v.maps.Do(context.Background(), mapproxy.High, func(m *extentmap.Map) {
			m.Lookup(block, n, func(e extentmap.Extent) {
				exts = append(exts, e)
				if e.Key >= 0 && !e.Zero {
					starts[e.Key] = v.DataStartIn(m, e.Key)
				}
			})
		})
		if err != nil {
			return err
		}
		for _, e := range exts {
			dst := buf[(e.Block-block)*bs : (e.Block-block+e.N)*bs]
			if e.Key < 0 || e.Zero {
				clear(dst)
				continue
			}
			got, err := st.GetRange(context.Background(), store.DataName(e.Key), starts[e.Key]+e.Off*bs, dst)
			if err != nil {
				return fmt.Errorf("key %d: %w", e.Key, err)
			}
			if got != len(dst) {
				return fmt.Errorf("key %d: short read %d of %d bytes", e.Key, got, len(dst))
			}
		}
		return nil
	}
}

// objectLayouts parses the head of every data object below wm and counts
// those in the compact and in the BUSE layout.
func objectLayouts(t *testing.T, st store.Store, l chunk.Layout, devSectors uint64, wm int64) (compact, full int) {
	t.Helper()
	for k := int64(0); k < wm; k++ {
		size, err := st.Size(context.Background(), store.DataName(k))
		if err != nil || size == 0 {
			continue // placeholder or collected
		}
		head := make([]byte, min(size, l.MetadataSize()))
		if _, err := st.GetRange(context.Background(), store.DataName(k), 0, head); err != nil {
			t.Fatal(err)
		}
		if IsClaimRecord(head) {
			continue
		}
		p, err := l.Parse(head, -1, devSectors)
		if err != nil {
			t.Fatalf("key %d: %v", k, err)
		}
		if p.End != size {
			t.Fatalf("key %d: object is %d bytes, its items end at %d", k, size, p.End)
		}
		if p.DataStart == l.MetadataSize() {
			full++
		} else {
			compact++
			if p.DataStart != int64(len(p.Items)+1)*chunk.ItemSize {
				t.Fatalf("key %d: %d items, data at %d", k, len(p.Items), p.DataStart)
			}
		}
	}
	return compact, full
}

func superblockFormat(t *testing.T, st store.Store, o Options) int {
	t.Helper()
	objs := newProxy(st)
	defer objs.Close()
	sb, _, err := readSuperblock(context.Background(), objs, o)
	if err != nil {
		t.Fatal(err)
	}
	return sb.Format
}

// A volume written in the BUSE layout, then with compact objects: every
// block reads back through crash recovery, a checkpoint (a map body of
// version 2 or later, with data starts) and a replay without checkpoint, objects of both layouts
// side by side; the superblock moves to format 2 before the first
// compact object.
func TestCompactObjectsMixedWithBUSELayout(t *testing.T) {
	st := mem.New()
	o := testOptions(256*mib, 4096)
	rng := rand.New(rand.NewPCG(11, 3))
	m := newModel(4096)
	l := chunk.Layout{ChunkSize: o.ChunkSize, BlockSize: o.BlockSize}
	sectors := uint64(o.Size / chunk.SectorSize)

	v, objs := open(t, st, o)
	workload(t, v, m, rng, 80, 256*1024)
	wm1 := v.Watermark()
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	objs.Close()
	if f := superblockFormat(t, st, o); f != FormatBUSELayout {
		t.Fatalf("superblock format %d without compact objects, want %d", f, FormatBUSELayout)
	}
	if c, f := objectLayouts(t, st, l, sectors, wm1); c != 0 || f == 0 {
		t.Fatalf("without CompactChunks: %d compact, %d BUSE-layout objects", c, f)
	}

	o.CompactChunks = true
	v, objs = open(t, st, o)
	if f := superblockFormat(t, st, o); f != FormatVersion {
		t.Fatalf("superblock format %d after an attach with CompactChunks, want %d", f, FormatVersion)
	}
	m.verify(t, v.Size()/4096, v.directReadFn(st), rng)
	workload(t, v, m, rng, 80, 256*1024)
	wm2 := v.Watermark()
	m.verify(t, v.Size()/4096, v.directReadFn(st), rng)
	objs.Close() // crash: no close, no checkpoint

	if c, f := objectLayouts(t, st, l, sectors, wm2); c == 0 || f == 0 {
		t.Fatalf("mixed volume: %d compact, %d BUSE-layout objects", c, f)
	}

	// Roll-forward over both layouts.
	v, objs = open(t, st, o)
	m.verify(t, v.Size()/4096, v.directReadFn(st), rng)
	if err := v.Checkpoint(context.Background()); err != nil {
		t.Fatal(err)
	}
	objs.Close()

	// The checkpoint carries the data starts.
	v, objs = open(t, st, o)
	m.verify(t, v.Size()/4096, v.directReadFn(st), rng)
	objs.Close()

	// And so does a replay from key 0.
	o.SkipCheckpoint = true
	v, objs = open(t, st, o)
	defer objs.Close()
	m.verify(t, v.Size()/4096, v.directReadFn(st), rng)
}

// A chunk of one small write is stored with one item slot and the end
// slot, not the whole metadata area.
func TestCompactObjectSize(t *testing.T) {
	for _, bs := range []int64{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			st := mem.New()
			o := testOptions(64*mib, bs)
			o.CompactChunks = true
			v, objs := open(t, st, o)
			defer objs.Close()
			defer v.Close(context.Background())
			l := v.Layout()
			rng := rand.New(rand.NewPCG(uint64(bs), 1))
			buf := make([]byte, l.BufferSize())
			b := chunk.NewBuilder(l, buf)
			data := randomData(rng, 2*bs)
			b.Add(chunk.Item{Sector: uint64(10 * bs / chunk.SectorSize), Length: uint64(2 * bs / chunk.SectorSize), Seqno: 1, Flag: chunk.OpWrite}, data)
			b.Add(chunk.Item{Sector: uint64(40 * bs / chunk.SectorSize), Length: uint64(bs / chunk.SectorSize), Seqno: 1, Flag: chunk.OpDiscard}, nil)
			key := v.NextKey()
			if err := v.Commit(context.Background(), key, buf, b.Items()); err != nil {
				t.Fatal(err)
			}
			size, err := st.Size(context.Background(), store.DataName(key))
			if err != nil {
				t.Fatal(err)
			}
			if want := 3*int64(chunk.ItemSize) + 2*bs; size != want {
				t.Fatalf("object of 2 items and %d data bytes is %d bytes, want %d (metadata area %d)", 2*bs, size, want, l.MetadataSize())
			}
			got := make([]byte, 2*bs)
			if err := v.directReadFn(st)(10, 2, got); err != nil {
				t.Fatal(err)
			}
			if firstDiff(got, data) >= 0 {
				t.Fatal("data read back through the map differs")
			}
		})
	}
}
