package volume

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/frontend/buse"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/kernelemu"
)

// Tests of the attach protocol (docs/ARCHITECTURE.md §6): each one sets
// up a bucket that earlier versions turned into data loss and checks
// that the attach now refuses or recovers, and never deletes.

// snapshot is every object of a bucket: name → CRC of its content.
func snapshot(t *testing.T, st store.Store) map[string]uint32 {
	t.Helper()
	out := map[string]uint32{}
	ctx := context.Background()
	err := st.List(ctx, "", func(name string, size int64) error {
		buf := make([]byte, size)
		if _, err := st.GetRange(ctx, name, 0, buf); err != nil {
			return err
		}
		out[name] = crc32.ChecksumIEEE(buf)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// volumeData keeps the objects an attach must never change: data keys and
// checkpoints (an attach writes its own attach record, superblock and
// lease, and may prune old attach records).
func volumeData(s map[string]uint32) map[string]uint32 {
	out := map[string]uint32{}
	for n, c := range s {
		if _, ok := store.ParseDataName(n); ok || strings.HasPrefix(n, store.CheckpointPrefix) {
			out[n] = c
		}
	}
	return out
}

func sameObjects(t *testing.T, what string, before, after map[string]uint32) {
	t.Helper()
	var diffs []string
	for n, c := range before {
		if c2, ok := after[n]; !ok {
			diffs = append(diffs, n+" deleted")
		} else if c2 != c {
			diffs = append(diffs, n+" changed")
		}
	}
	for n := range after {
		if _, ok := before[n]; !ok {
			diffs = append(diffs, n+" created")
		}
	}
	sort.Strings(diffs)
	if len(diffs) > 0 {
		t.Fatalf("%s: %s", what, strings.Join(diffs, ", "))
	}
}

func block(b byte) []byte {
	d := make([]byte, 4096)
	for i := range d {
		d[i] = b
	}
	return d
}

// writeFlushed writes each pattern to block blk as one object.
func writeFlushed(t *testing.T, v *Volume, blk int64, patterns ...byte) {
	t.Helper()
	em := kernelemu.New(buse.NewAdapter(v), v.Layout(), v.Size(), mib, 1, 2)
	for _, p := range patterns {
		if err := em.Write(0, blk*4096, block(p)); err != nil {
			t.Fatal(err)
		}
		if err := em.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if err := em.Close(); err != nil {
		t.Fatal(err)
	}
}

func readBlock(t *testing.T, v *Volume, blk int64) byte {
	t.Helper()
	buf := make([]byte, 4096)
	if err := v.Read(context.Background(), blk, 1, buf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, block(buf[0])) {
		t.Fatalf("block %d is torn", blk)
	}
	return buf[0]
}

// collectBelowFloor deletes the dead data keys below the delete floor, as
// dead GC does.
func collectBelowFloor(t *testing.T, st store.Store, v *Volume) int64 {
	t.Helper()
	floor := v.DeleteFloor()
	if floor == 0 {
		t.Fatal("no delete floor: the test needs at least two checkpoints")
	}
	var dead []int64
	if err := v.maps.Do(context.Background(), mapproxy.Low, func(m *extentmap.Map) { dead = m.Dead(floor) }); err != nil {
		t.Fatal(err)
	}
	if len(dead) == 0 {
		t.Fatal("nothing dead below the floor")
	}
	for _, k := range dead {
		if err := st.Delete(context.Background(), store.DataName(k)); err != nil {
			t.Fatal(err)
		}
	}
	return floor
}

// A volume whose low keys were collected cannot be rebuilt without a
// checkpoint: skip_checkpoint and all-damaged checkpoints are refused and
// change nothing; restoring a checkpoint brings the data back.
func TestNoUsableCheckpointRefuses(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	v, objs := open(t, st, o)
	for i := range 3 {
		// Block 0 is overwritten by every object, so the early ones die.
		writeFlushed(t, v, 0, byte(10*i+1), byte(10*i+2), byte(10*i+3))
		writeFlushed(t, v, int64(i+1), byte(100+i))
		if err := v.Checkpoint(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	floor := collectBelowFloor(t, st, v)
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	objs.Close()
	want := map[int64]byte{0: 23, 1: 100, 2: 101, 3: 102}

	before := volumeData(snapshot(t, st))
	skip := o
	skip.SkipCheckpoint = true
	objs = newProxy(st)
	_, err := Open(context.Background(), objs, skip)
	objs.Close()
	if !errors.Is(err, ErrNoState) || !strings.Contains(err.Error(), "skip_checkpoint") {
		t.Fatalf("skip_checkpoint over collected keys below %d: err %v; want a refusal naming skip_checkpoint", floor, err)
	}
	sameObjects(t, "refused skip_checkpoint attach", before, volumeData(snapshot(t, st)))

	// Damage every checkpoint.
	saved := map[string][]byte{}
	for name := range before {
		if !strings.HasPrefix(name, store.CheckpointPrefix) {
			continue
		}
		size, _ := st.Size(context.Background(), name)
		buf := make([]byte, size)
		if _, err := st.GetRange(context.Background(), name, 0, buf); err != nil {
			t.Fatal(err)
		}
		saved[name] = buf
		bad := append([]byte(nil), buf...)
		bad[len(bad)/2] ^= 0xff
		if err := st.Put(context.Background(), name, bad, false); err != nil {
			t.Fatal(err)
		}
	}
	if len(saved) != ckptKeep {
		t.Fatalf("%d checkpoints, want %d", len(saved), ckptKeep)
	}
	before = volumeData(snapshot(t, st))
	objs = newProxy(st)
	_, err = Open(context.Background(), objs, o)
	objs.Close()
	if !errors.Is(err, ErrNoState) || !strings.Contains(err.Error(), "no usable checkpoint") {
		t.Fatalf("all checkpoints damaged: err %v; want a refusal saying no usable checkpoint", err)
	}
	sameObjects(t, "refused attach without a usable checkpoint", before, volumeData(snapshot(t, st)))

	for name, b := range saved {
		if err := st.Put(context.Background(), name, b, false); err != nil {
			t.Fatal(err)
		}
	}
	v, objs = open(t, st, o)
	defer objs.Close()
	defer v.Close(context.Background())
	for blk, p := range want {
		if got := readBlock(t, v, blk); got != p {
			t.Errorf("block %d after restoring the checkpoints: %d, want %d", blk, got, p)
		}
	}
}

// A bucket with data but no superblock is refused, unchanged; a bucket
// with only the attach records of a first attach that crashed before
// writing its superblock is a new volume above those generations.
func TestMissingSuperblock(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	for range 3 {
		v, objs := open(t, st, o)
		writeFlushed(t, v, 0, 7)
		if err := v.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		objs.Close()
	}
	if err := st.Delete(context.Background(), store.SuperblockName); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, st)
	objs := newProxy(st)
	_, err := Open(context.Background(), objs, o)
	objs.Close()
	if err == nil || !strings.Contains(err.Error(), "superblock is missing") {
		t.Fatalf("attach without a superblock over data: err %v; want a refusal", err)
	}
	sameObjects(t, "refused attach without a superblock", before, snapshot(t, st))

	fresh := mem.New()
	for _, g := range []uint64{1, 2} {
		if err := fresh.Put(context.Background(), store.AttachName(g), []byte("{}"), true); err != nil {
			t.Fatal(err)
		}
	}
	v, objs := open(t, fresh, o)
	defer objs.Close()
	defer v.Close(context.Background())
	if v.Generation() != 3 {
		t.Fatalf("new volume over attach records 1 and 2 has generation %d, want 3", v.Generation())
	}
}

// Daemons that start together: exactly one attaches, the others are
// refused as attached elsewhere, and the winner's data survives.
func TestConcurrentAttachOneWins(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	o.LeaseInterval = 500 * time.Millisecond // a loaded machine must not starve the renewals for 2.5 intervals
	v, objs := open(t, st, o)
	writeFlushed(t, v, 0, 1)
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	objs.Close()
	for round := range 5 {
		const n = 4
		var wg sync.WaitGroup
		vols := make([]*Volume, n)
		errs := make([]error, n)
		start := make(chan struct{})
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				objs := newProxy(st)
				vols[i], errs[i] = Open(context.Background(), objs, o)
				if errs[i] != nil {
					objs.Close()
				}
			}()
		}
		close(start)
		wg.Wait()
		var winner *Volume
		for i := range n {
			switch {
			case errs[i] == nil && winner != nil:
				t.Fatalf("round %d: two daemons attached the volume", round)
			case errs[i] == nil:
				winner = vols[i]
			case !errors.Is(errs[i], ErrAttachedElsewhere):
				t.Fatalf("round %d: loser failed with %v; want ErrAttachedElsewhere", round, errs[i])
			}
		}
		if winner == nil {
			t.Fatalf("round %d: no daemon attached: %v", round, errors.Join(errs...))
		}
		writeFlushed(t, winner, int64(round+1), byte(round+2))
		if err := winner.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		winner.objs.Close()
	}
	v, objs = open(t, st, o)
	defer objs.Close()
	defer v.Close(context.Background())
	for blk := int64(0); blk <= 5; blk++ {
		if got := readBlock(t, v, blk); got != byte(blk+1) {
			t.Errorf("block %d: %d, want %d", blk, got, blk+1)
		}
	}
}

// recorder counts the calls that could destroy data: deletes and
// overwrites (Put without ifAbsent) of data objects.
type recorder struct {
	store.Store
	mu        sync.Mutex
	destroyed []string
}

func (r *recorder) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	if _, ok := store.ParseDataName(name); ok && !ifAbsent {
		r.note("overwrite " + name)
	}
	return r.Store.Put(ctx, name, body, ifAbsent)
}

func (r *recorder) Delete(ctx context.Context, name string) error {
	if _, ok := store.ParseDataName(name); ok {
		r.note("delete " + name)
	}
	return r.Store.Delete(ctx, name)
}

func (r *recorder) note(s string) {
	r.mu.Lock()
	r.destroyed = append(r.destroyed, s)
	r.mu.Unlock()
}

// A writer crashed with key G missing and later keys present. The attach
// claims G with a record of its window and deletes nothing; the keys
// past G stay invisible through any number of later attaches, also when
// an attach crashes right after its claim.
func TestCrashedWriterOrphansAreIgnoredNotDeleted(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	v, objs := open(t, st, o)
	k0 := v.Watermark()
	writeFlushed(t, v, 0, 1, 2, 3, 4) // keys k0..k0+3, block 0 ends as 4
	objs.Close()                      // crash
	gap := k0 + 1
	if err := st.Delete(context.Background(), store.DataName(gap)); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{Store: st}
	for attach := range 3 {
		objs := newProxy(rec)
		v, err := Open(context.Background(), objs, o)
		if err != nil {
			t.Fatal(err)
		}
		if got := readBlock(t, v, 0); got != 1 {
			t.Fatalf("attach %d: block 0 is %d; want 1, the last write before the gap", attach, got)
		}
		if attach < 2 {
			objs.Close() // crash right after the attach
			continue
		}
		if err := v.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		objs.Close()
	}
	if len(rec.destroyed) > 0 {
		t.Fatalf("attaches destroyed objects: %v", rec.destroyed)
	}
	for k := gap + 1; k <= gap+2; k++ {
		if size, err := st.Size(context.Background(), store.DataName(k)); err != nil || size == 0 {
			t.Fatalf("orphan key %d: size %d err %v; want it left in place", k, size, err)
		}
	}
}

// A claim record, a checkpoint or a data object of a generation not older
// than the attach's own means a newer attach took the volume while this
// one recovered: it is refused as fenced.
func TestNewerGenerationInBucketIsFenced(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	v, objs := open(t, st, o)
	writeFlushed(t, v, 0, 1)
	gen, next := v.Generation(), v.Watermark()
	objs.Close() // crash
	// A record of a generation far ahead, as a concurrent attach would
	// leave at the gap.
	body, err := encodeClaim(claimRecord{Generation: gen + 5, End: next + 10})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Put(context.Background(), store.DataName(next), body, true); err != nil {
		t.Fatal(err)
	}
	objs = newProxy(st)
	defer objs.Close()
	if _, err := Open(context.Background(), objs, o); !errors.Is(err, ErrFenced) {
		t.Fatalf("attach below a newer claim record: err %v; want ErrFenced", err)
	}
}

// A per-attach seqno past 40 bits would wrap below older writes of the
// same attach; the commit is refused before anything is stored.
func TestSeqnoExhaustionFailsLoudly(t *testing.T) {
	st := mem.New()
	v, objs := open(t, st, testOptions(64*mib, 4096))
	defer objs.Close()
	defer v.Close(context.Background())
	l := v.Layout()
	b := chunk.NewBuilder(l, make([]byte, l.BufferSize()))
	b.Add(chunk.Item{Sector: 0, Length: 8, Seqno: maxSeqno + 1, Flag: chunk.OpWrite}, block(9))
	key := v.NextKey()
	err := v.Commit(context.Background(), key, b.Seal(), b.Items())
	if !errors.Is(err, ErrSeqnoExhausted) {
		t.Fatalf("commit with seqno 2^40: %v; want ErrSeqnoExhausted", err)
	}
	if _, err := st.Size(context.Background(), store.DataName(key)); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("key %d was stored (err %v)", key, err)
	}
	if v.Err() == nil {
		t.Fatal("volume still takes writes")
	}
}

// barrier holds every attach-record Put until n of them are waiting, so
// that n attaches have all listed the same newest generation before any
// claims the next one: the forced interleaving of two daemons started at
// the same moment.
type barrier struct {
	store.Store
	n       int
	mu      sync.Mutex
	waiting int
	release chan struct{}
}

func (b *barrier) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	if strings.HasPrefix(name, store.AttachPrefix) {
		b.mu.Lock()
		b.waiting++
		if b.waiting == b.n {
			close(b.release)
		}
		b.mu.Unlock()
		select {
		case <-b.release:
		case <-time.After(5 * time.Second):
		}
	}
	return b.Store.Put(ctx, name, body, ifAbsent)
}

// Without a lease to watch, the create of the attach record alone decides
// which of two simultaneous attaches gets the generation.
func TestSimultaneousGenerationClaim(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	v, objs := open(t, st, o)
	writeFlushed(t, v, 0, 1)
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	objs.Close()
	b := &barrier{Store: st, n: 2, release: make(chan struct{})}
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			objs := newProxy(b)
			v, err := Open(context.Background(), objs, o)
			errs[i] = err
			if err == nil {
				v.Close(context.Background())
			}
			objs.Close()
		}()
	}
	wg.Wait()
	failed := 0
	for _, err := range errs {
		if err != nil {
			failed++
			if !errors.Is(err, ErrAttachedElsewhere) || !strings.Contains(err.Error(), "at the same moment") {
				t.Errorf("loser: %v; want ErrAttachedElsewhere from the generation claim", err)
			}
		}
	}
	if failed != 1 {
		t.Fatalf("%d of 2 simultaneous attaches failed (%v); want exactly 1", failed, errors.Join(errs...))
	}
}

// A daemon that was fenced without noticing yet must not prune the new
// owner's checkpoints: a checkpoint newer than its own stops it.
func TestStaleWriterDoesNotPruneNewerCheckpoints(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	stale, objs := open(t, st, o)
	defer objs.Close()
	writeFlushed(t, stale, 0, 1)
	if err := stale.Checkpoint(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The new owner attaches (the stale one's lease is off in this test)
	// and writes two checkpoints above the stale one's watermark.
	owner, objs2 := open(t, st, o)
	defer objs2.Close()
	defer owner.Close(context.Background())
	for i := range 2 {
		writeFlushed(t, owner, 1, byte(2+i))
		if err := owner.Checkpoint(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	before := volumeData(snapshot(t, st))
	if err := stale.Checkpoint(context.Background()); !errors.Is(err, ErrFenced) {
		t.Fatalf("stale checkpoint: %v; want ErrFenced", err)
	}
	after := volumeData(snapshot(t, st))
	for name := range before {
		if _, ok := after[name]; !ok && strings.HasPrefix(name, store.CheckpointPrefix) {
			t.Fatalf("the stale writer deleted %s", name)
		}
	}
	if stale.Err() == nil {
		t.Fatal("the stale writer still takes writes")
	}
}

// A checkpoint whose map tracks a key at or above its own watermark does
// not describe the prefix it claims to: it is unusable, and recovery falls
// back (here to a full replay, since nothing was collected).
func TestCheckpointTrackingKeysPastItsWatermarkIsUnusable(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	v, objs := open(t, st, o)
	writeFlushed(t, v, 0, 42)
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	objs.Close()
	var names []string
	if err := st.List(context.Background(), store.CheckpointPrefix, func(n string, _ int64) error { names = append(names, n); return nil }); err != nil || len(names) != 1 {
		t.Fatalf("checkpoints %v, err %v; want one", names, err)
	}
	var wm uint64
	if _, err := fmt.Sscanf(names[0], store.CheckpointPrefix+"%016x", &wm); err != nil {
		t.Fatal(err)
	}
	m, err := extentmap.New(64 * mib / 4096)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.AddObject(int64(wm)+10, 0); err != nil {
		t.Fatal(err)
	}
	mapBytes, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	body := encodeCheckpoint(ckptHeader{generation: 1, blockSize: 4096, watermark: int64(wm)}, mapBytes)
	if err := st.Put(context.Background(), names[0], body, false); err != nil {
		t.Fatal(err)
	}
	v, objs = open(t, st, o)
	defer objs.Close()
	defer v.Close(context.Background())
	if got := readBlock(t, v, 0); got != 42 {
		t.Fatalf("block 0 is %d after loading a checkpoint past its watermark; want 42", got)
	}
}
