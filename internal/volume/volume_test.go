package volume

import (
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/frontend/buse"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/kernelemu"
	"github.com/bs3/bs3/internal/testutil/minio"
)

const mib = 1 << 20

// workload drives the emulated BUSE kernel against v and keeps the model.
// Phase 1 serializes acknowledgements (so the model knows which write is
// newer) while chunks of 8 queues upload and apply out of order; phase 2
// writes disjoint stripes from all queues at once.
func workload(t *testing.T, v *Volume, m *model, rng *rand.Rand, ops int, maxLen int64) {
	t.Helper()
	bs := v.BlockSize()
	size := v.Size()
	const queues = 8
	em := kernelemu.New(buse.NewAdapter(v), v.Layout(), size, 1*mib, queues, 4)
	defer func() {
		if err := em.Close(); err != nil {
			t.Errorf("emulator close: %v", err)
		}
	}()
	// Phase 1: overlapping writes, discards and write-zeroes in several
	// hot regions, acknowledged one at a time from random queues.
	hot := []int64{0, size / 3 / bs * bs, size - 64*mib}
	for i := 0; i < ops; i++ {
		q := rng.IntN(queues)
		n := (1 + rng.Int64N(maxLen/bs)) * bs
		base := hot[rng.IntN(len(hot))]
		off := base + rng.Int64N((32*mib-n)/bs+1)*bs
		switch r := rng.IntN(20); {
		case r == 0:
			if err := em.Discard(q, off, n); err != nil {
				t.Fatal(err)
			}
			m.zero(off, n)
		case r == 1:
			if err := em.WriteZeroes(q, off, n); err != nil {
				t.Fatal(err)
			}
			m.zero(off, n)
		default:
			d := randomData(rng, n)
			if err := em.Write(q, off, d); err != nil {
				t.Fatal(err)
			}
			m.write(off, d)
		}
		if rng.IntN(50) == 0 {
			if err := em.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Phase 2: every queue writes its own stripe concurrently.
	var wg sync.WaitGroup
	stripe := (size / 2) / queues / bs * bs
	for q := 0; q < queues; q++ {
		qrng := rand.New(rand.NewPCG(rng.Uint64(), uint64(q)))
		type w struct {
			off  int64
			data []byte
		}
		var ws []w
		for i := 0; i < ops/queues; i++ {
			n := (1 + qrng.Int64N(maxLen/bs)) * bs
			off := size/2 + int64(q)*stripe + qrng.Int64N((stripe-n)/bs)*bs
			ws = append(ws, w{off, randomData(qrng, n)})
		}
		for _, x := range ws {
			m.write(x.off, x.data) // in stripe order: later writes win
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, x := range ws {
				if err := em.Write(q, x.off, x.data); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := em.Flush(); err != nil {
		t.Fatal(err)
	}
}

// The foundation test of the engine against real S3: random writes of
// 4 KiB–1 MiB from 8 emulated kernel queues over a 4 GiB device, every
// byte read back equal to the model, unwritten space zeros, and the same
// after a clean stop and a new instance.
func TestEmulatedKernelOnMinIO(t *testing.T) {
	srv := minio.Start(t)
	for _, bs := range []int64{4096, 512} {
		t.Run(map[int64]string{4096: "4k", 512: "512"}[bs], func(t *testing.T) {
			st := srv.Store(t, srv.Bucket(t))
			o := testOptions(4<<30, bs)
			v, objs := open(t, st, o)
			m := newModel(bs)
			rng := rand.New(rand.NewPCG(1, uint64(bs)))
			ops := 400
			if bs == 512 {
				ops = 150
			}
			workload(t, v, m, rng, ops, 1*mib)
			m.verify(t, v.Size()/bs, v.readFn(), rng)
			if err := v.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			objs.Close()

			v2, objs2 := open(t, st, o)
			defer objs2.Close()
			defer v2.Close(context.Background())
			if v2.Generation() != v.Generation()+1 {
				t.Fatalf("generation after re-attach = %d, want %d", v2.Generation(), v.Generation()+1)
			}
			m.verify(t, v2.Size()/bs, v2.readFn(), rng)
		})
	}
}

// A crash (no clean stop, no final checkpoint) is recovered by replaying
// every object; a damaged newest checkpoint falls back to the previous.
func TestRecoveryAndCheckpointFallback(t *testing.T) {
	st := mem.New()
	o := testOptions(256*mib, 4096)
	rng := rand.New(rand.NewPCG(7, 7))
	m := newModel(4096)

	v, objs := open(t, st, o)
	workload(t, v, m, rng, 120, 256*1024)
	// Crash: abandon v without Close.
	objs.Close()

	v, objs = open(t, st, o)
	m.verify(t, v.Size()/4096, v.readFn(), rng)
	if err := v.Checkpoint(context.Background()); err != nil {
		t.Fatal(err)
	}
	workload(t, v, m, rng, 60, 256*1024)
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	objs.Close()

	// Damage the newest checkpoint: flip a byte in the middle.
	var names []string
	if err := st.List(context.Background(), store.CheckpointPrefix, func(n string, _ int64) error { names = append(names, n); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(names) != 2 {
		t.Fatalf("checkpoints kept = %v, want 2", names)
	}
	newest := names[len(names)-1]
	raw, err := readAll(st, newest)
	if err != nil {
		t.Fatal(err)
	}
	raw[len(raw)/2] ^= 0xff
	if err := st.Put(context.Background(), newest, raw, false); err != nil {
		t.Fatal(err)
	}
	v, objs = open(t, st, o)
	defer objs.Close()
	defer v.Close(context.Background())
	m.verify(t, v.Size()/4096, v.readFn(), rng)
}

func readAll(st store.Store, name string) ([]byte, error) {
	size, err := st.Size(context.Background(), name)
	if err != nil {
		return nil, err
	}
	b := make([]byte, size)
	_, err = st.GetRange(context.Background(), name, 0, b)
	return b, err
}

// Keys after the first missing key are not part of the consistent prefix:
// recovery drops them and their writes are not visible.
func TestRollForwardStopsAtGap(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	v, objs := open(t, st, o)
	k0 := v.Watermark() // the first key the writes below get
	em := kernelemu.New(buse.NewAdapter(v), v.Layout(), v.Size(), mib, 1, 2)
	fill := func(b byte) []byte { d := make([]byte, 4096); d[0], d[4095] = b, b; return d }
	for i, off := range []int64{0, 4096, 8192} {
		if err := em.Write(0, off, fill(byte(i+1))); err != nil {
			t.Fatal(err)
		}
		if err := em.Flush(); err != nil { // one object per write
			t.Fatal(err)
		}
	}
	if err := em.Close(); err != nil {
		t.Fatal(err)
	}
	objs.Close() // crash
	if err := st.Delete(context.Background(), store.DataName(k0+1)); err != nil {
		t.Fatal(err)
	}
	v, objs = open(t, st, o)
	defer objs.Close()
	defer v.Close(context.Background())
	buf := make([]byte, 3*4096)
	if err := v.Read(context.Background(), 0, 3, buf); err != nil {
		t.Fatal(err)
	}
	if buf[0] != 1 || buf[4096] != 0 || buf[8192] != 0 {
		t.Fatalf("after gap at key 1: block bytes %d %d %d, want 1 0 0", buf[0], buf[4096], buf[8192])
	}
	// Key 2 is not deleted (an attach deletes nothing); the claim record
	// at the gap makes every later recovery skip it.
	if size, err := st.Size(context.Background(), store.DataName(k0+2)); err != nil || size == 0 {
		t.Fatalf("key 2 past the gap: size %d, err %v; want its data left in place", size, err)
	}
	head := make([]byte, ClaimMagicLen)
	if _, err := st.GetRange(context.Background(), store.DataName(k0+1), 0, head); err != nil || !IsClaimRecord(head) {
		t.Fatalf("gap key: %q, err %v; want a claim record", head, err)
	}
	// A second recovery reads the same state.
	v.Close(context.Background())
	v, objs = open(t, st, o)
	defer objs.Close()
	defer v.Close(context.Background())
	if err := v.Read(context.Background(), 0, 3, buf); err != nil {
		t.Fatal(err)
	}
	if buf[0] != 1 || buf[4096] != 0 || buf[8192] != 0 {
		t.Fatalf("second attach after gap at key 1: block bytes %d %d %d, want 1 0 0", buf[0], buf[4096], buf[8192])
	}
}

// Every write after an attach wins over every write before it, even when
// the per-run counters restart and the map is rebuilt by roll-forward.
func TestGenerationOrdersAcrossAttaches(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	o.SkipCheckpoint = true
	v, objs := open(t, st, o)
	em := kernelemu.New(buse.NewAdapter(v), v.Layout(), v.Size(), mib, 1, 2)
	old := make([]byte, 4096)
	for i := 0; i < 50; i++ { // drive the area counter high
		old[0] = byte(i)
		if err := em.Write(0, 0, old); err != nil {
			t.Fatal(err)
		}
	}
	if err := em.Close(); err != nil {
		t.Fatal(err)
	}
	objs.Close() // crash

	v, objs = open(t, st, o)
	em = kernelemu.New(buse.NewAdapter(v), v.Layout(), v.Size(), mib, 1, 2)
	newer := make([]byte, 4096)
	newer[0] = 200
	if err := em.Write(0, 0, newer); err != nil { // seqno 1 of the new attach
		t.Fatal(err)
	}
	if err := em.Close(); err != nil {
		t.Fatal(err)
	}
	objs.Close() // crash again: the map is rebuilt from both attaches

	v, objs = open(t, st, o)
	defer objs.Close()
	defer v.Close(context.Background())
	buf := make([]byte, 4096)
	if err := v.Read(context.Background(), 0, 1, buf); err != nil {
		t.Fatal(err)
	}
	if buf[0] != 200 {
		t.Fatalf("block 0 holds %d from the older attach, want 200 from the newer", buf[0])
	}
}

// A second engine on the same volume must not interleave keys: the store
// refuses its conditional write and it stops taking writes.
func TestSecondWriterIsFenced(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	v1, objs1 := open(t, st, o)
	defer objs1.Close()
	v2, objs2 := open(t, st, o)
	defer objs2.Close()
	w := func(v *Volume, b byte) error {
		buf := make([]byte, v.Layout().BufferSize())
		b0 := chunk.NewBuilder(v.Layout(), buf)
		d := make([]byte, 4096)
		d[0] = b
		b0.Add(chunk.Item{Sector: 0, Length: 8, Seqno: 1, Flag: chunk.OpWrite}, d)
		return v.Commit(context.Background(), v.NextKey(), buf, 1)
	}
	if err := w(v2, 2); err != nil {
		t.Fatalf("second attach writes first: %v", err)
	}
	err := w(v1, 1)
	if !errors.Is(err, ErrFenced) {
		t.Fatalf("first attach writing the same key: %v, want ErrFenced", err)
	}
	if !strings.Contains(err.Error(), "second bs3") {
		t.Errorf("fencing error does not explain itself: %v", err)
	}
	if err := w(v1, 1); !errors.Is(err, ErrFenced) {
		t.Fatalf("fenced volume accepted a later write: %v", err)
	}
	buf := make([]byte, 4096)
	if err := v2.Read(context.Background(), 0, 1, buf); err != nil || buf[0] != 2 {
		t.Fatalf("second writer's data: byte %d, err %v; want 2", buf[0], err)
	}
}

func TestSuperblockGeometry(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	v, objs := open(t, st, o)
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	objs.Close()

	bad := o
	bad.BlockSize = 512
	objs = newProxy(st)
	defer objs.Close()
	if _, err := Open(context.Background(), objs, bad); err == nil || !strings.Contains(err.Error(), "block_size 4096") || !strings.Contains(err.Error(), "512") {
		t.Fatalf("mismatched block size: %v", err)
	}
	small := o
	small.Size = 32 * mib
	if _, err := Open(context.Background(), objs, small); err == nil || !strings.Contains(err.Error(), "--shrink") {
		t.Fatalf("shrink without --shrink: %v", err)
	}
	big := o
	big.Size = 128 * mib
	v, err := Open(context.Background(), objs, big)
	if err != nil {
		t.Fatalf("grow: %v", err)
	}
	defer v.Close(context.Background())
	if v.Size() != 128*mib {
		t.Fatalf("size after growth = %d", v.Size())
	}
	buf := make([]byte, 4096)
	buf[0] = 1
	if err := v.Read(context.Background(), (100*mib)/4096, 1, buf); err != nil || buf[0] != 0 {
		t.Fatalf("new space: byte %d err %v, want zeros", buf[0], err)
	}
	raw, err := readAll(st, store.SuperblockName)
	if err != nil {
		t.Fatal(err)
	}
	var sb Superblock
	if err := json.Unmarshal(raw, &sb); err != nil || sb.Size != 128*mib || sb.Generation != 2 {
		t.Fatalf("stored superblock %+v (err %v): want size %d generation 2", sb, err, 128*mib)
	}
}

// A second daemon is told that the volume is attached elsewhere while the
// first renews its lease; it attaches once the first released the lease,
// or once a crashed holder stopped renewing it.
func TestLeaseRefusesSecondAttach(t *testing.T) {
	t.Run("mem", func(t *testing.T) { testLease(t, mem.New()) })
	t.Run("minio", func(t *testing.T) {
		srv := minio.Start(t)
		testLease(t, srv.Store(t, srv.Bucket(t)))
	})
}

func testLease(t *testing.T, st store.Store) {
	o := testOptions(64*mib, 4096)
	o.LeaseInterval = 100 * time.Millisecond
	a, objsA := open(t, st, o)

	objs := newProxy(st)
	defer objs.Close()
	_, err := Open(context.Background(), objs, o)
	if !errors.Is(err, ErrAttachedElsewhere) || !strings.Contains(err.Error(), "stop that daemon first") {
		t.Fatalf("second attach while the first is alive: %v, want ErrAttachedElsewhere with advice", err)
	}
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	objsA.Close()

	_, objsB := open(t, st, o) // released lease: attaches at once
	// Crash b: its renewals stop reaching the store.
	objsB.Close()
	start := time.Now()
	c, objsC := open(t, st, o)
	defer objsC.Close()
	defer c.Close(context.Background())
	if waited := time.Since(start); waited < 2*o.LeaseInterval {
		t.Fatalf("attach over a crashed holder's lease took %v; it must wait for the lease to go stale", waited)
	}
}
