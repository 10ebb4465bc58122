package chunker

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/volume"
)

const mib = 1 << 20

type rig struct {
	st   store.Store
	objs *objproxy.Proxy
	vol  *volume.Volume
	c    *Chunker
}

func volOptions() volume.Options {
	return volume.Options{
		Size: 64 * mib, BlockSize: 4096, ChunkSize: 1 * mib, ConditionalWrites: true,
		CheckpointInterval: time.Hour, CheckpointObjects: 1 << 30, MaxInflight: 16,
		MapIdleTimeout: 50 * time.Millisecond, Logger: zerolog.Nop(),
	}
}

func newRig(t testing.TB, st store.Store, durable bool) *rig {
	t.Helper()
	objs := objproxy.New(st, objproxy.Options{Uploaders: 8, Downloaders: 8, Logger: zerolog.Nop()})
	v, err := volume.Open(context.Background(), objs, volOptions())
	if err != nil {
		t.Fatal(err)
	}
	c := New(v, Options{Durable: durable, Buffers: 8, CollisionArea: mib, MaxAge: 100 * time.Millisecond, Logger: zerolog.Nop()})
	r := &rig{st: st, objs: objs, vol: v, c: c}
	t.Cleanup(func() {
		c.Close()
		v.Close(context.Background())
		objs.Close()
	})
	return r
}

func dataObjects(t *testing.T, st store.Store) int {
	t.Helper()
	n := 0
	err := st.List(context.Background(), "", func(name string, _ int64) error {
		if _, ok := store.ParseDataName(name); ok {
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func block(version uint64, n int) []byte {
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], version)
	}
	return b
}

// Reads never return data older than an acknowledged write, while the
// chunks holding those writes are still uploading (slow store) and after.
func TestReadAfterWriteWhileUploading(t *testing.T) {
	f := faulty.New(mem.New())
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Delay: 30 * time.Millisecond})
	r := newRig(t, f, false)
	ctx := context.Background()
	const writers, blocks, rounds = 4, 16, 40
	var wg sync.WaitGroup
	errc := make(chan error, writers*2)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for v := uint64(1); v <= rounds; v++ {
				for b := 0; b < blocks; b++ {
					off := int64(w*blocks+b) * 4096
					if err := r.c.WriteAt(ctx, block(v, 4096), off, false); err != nil {
						errc <- err
						return
					}
					if err := r.c.ReadAt(ctx, buf, off); err != nil {
						errc <- err
						return
					}
					if got := binary.LittleEndian.Uint64(buf); got < v {
						errc <- errors.New("read returned a version older than the acknowledged write")
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if err := r.c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, writers*blocks*4096)
	if err := r.c.ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	want := block(rounds, len(buf))
	if !bytes.Equal(buf, want) {
		t.Fatal("final contents are not the last round")
	}
}

// With durable = true, a completed flush means every earlier write is in
// the store: a new attach (without a clean stop) sees it.
func TestDurableFlushReachesStore(t *testing.T) {
	base := mem.New()
	f := faulty.New(base)
	f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Delay: 20 * time.Millisecond})
	r := newRig(t, f, true)
	ctx := context.Background()
	data := block(42, 3*4096)
	if err := r.c.WriteAt(ctx, data, 8192, false); err != nil {
		t.Fatal(err)
	}
	if err := r.c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// A second instance on the same objects, as after a crash.
	objs := objproxy.New(base, objproxy.Options{Uploaders: 2, Downloaders: 2, Logger: zerolog.Nop()})
	defer objs.Close()
	o := volOptions()
	o.ConditionalWrites = false
	v2, err := volume.Open(ctx, objs, o)
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close(ctx)
	got := make([]byte, len(data))
	if err := v2.Read(ctx, 2, 3, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("data covered by a durable flush is not in the store")
	}
}

// A FUA write returns only once its chunk is stored.
func TestFUAWriteIsStored(t *testing.T) {
	st := mem.New()
	r := newRig(t, st, false)
	before := dataObjects(t, st)
	if err := r.c.WriteAt(context.Background(), block(7, 4096), 0, true); err != nil {
		t.Fatal(err)
	}
	if got := dataObjects(t, st); got != before+1 {
		t.Fatalf("data objects after a FUA write = %d, want %d", got, before+1)
	}
}

// Discards read back as zeros, survive a new attach, and a discard of
// space that holds nothing writes nothing.
func TestDiscardAndWriteZeroes(t *testing.T) {
	st := mem.New()
	r := newRig(t, st, true)
	ctx := context.Background()
	if err := r.c.WriteAt(ctx, block(5, 16*4096), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.c.Zero(ctx, 4096, 2*4096, true, false); err != nil {
		t.Fatal(err)
	}
	if err := r.c.Zero(ctx, 8*4096, 4096, false, false); err != nil {
		t.Fatal(err)
	}
	check := func(read func([]byte) error) {
		t.Helper()
		buf := make([]byte, 16*4096)
		if err := read(buf); err != nil {
			t.Fatal(err)
		}
		want := block(5, 16*4096)
		clear(want[4096 : 3*4096])
		clear(want[8*4096 : 9*4096])
		for i := range buf {
			if buf[i] != want[i] {
				t.Fatalf("contents after discard differ at byte %d: %d, want %d", i, buf[i], want[i])
			}
		}
	}
	check(func(b []byte) error { return r.c.ReadAt(ctx, b, 0) }) // from the overlay
	if err := r.c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	check(func(b []byte) error { return r.c.ReadAt(ctx, b, 0) }) // from the map
	objects := dataObjects(t, st)
	if err := r.c.Zero(ctx, 32*mib, 16*mib, true, false); err != nil { // never written
		t.Fatal(err)
	}
	if err := r.c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if got := dataObjects(t, st); got != objects {
		t.Fatalf("discarding unwritten space stored %d objects", got-objects)
	}
}

func TestInvalidRequests(t *testing.T) {
	r := newRig(t, mem.New(), false)
	ctx := context.Background()
	for name, err := range map[string]error{
		"misaligned write": r.c.WriteAt(ctx, make([]byte, 100), 0, false),
		"unaligned offset": r.c.WriteAt(ctx, make([]byte, 4096), 512, false),
		"past the end":     r.c.WriteAt(ctx, make([]byte, 4096), 64*mib, false),
		"read past end":    r.c.ReadAt(ctx, make([]byte, 8192), 64*mib-4096),
		"zero past end":    r.c.Zero(ctx, 64*mib-4096, 8192, true, false),
	} {
		if !errors.Is(err, frontend.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}
