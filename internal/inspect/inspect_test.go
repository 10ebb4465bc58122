package inspect

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/volume"
)

const (
	testSize  = 64 << 20
	testBlock = 4096
	testChunk = 1 << 20
)

var testOpts = enginetest.Options{Size: testSize, BlockSize: testBlock, ChunkSize: testChunk, Durable: true, NoCache: true}

// write writes n blocks of version ver from block on, and flushes.
func write(t *testing.T, e *enginetest.Engine, block, n int64, ver uint64) {
	t.Helper()
	buf := make([]byte, n*testBlock)
	for i := range n {
		enginetest.BlockVersion(buf[i*testBlock:(i+1)*testBlock], block+i, ver)
	}
	ctx := context.Background()
	if err := e.Dev.WriteAt(ctx, buf, block*testBlock, false); err != nil {
		t.Fatal(err)
	}
	if err := e.Dev.Flush(ctx); err != nil {
		t.Fatal(err)
	}
}

// life runs a small life of a volume in st: two attaches with
// overwrites, discards, checkpoints, threshold and dead GC (so the bucket
// holds claim records, placeholders, GC copies and objects emptied after
// the checkpoint that still counts them). It leaves the second attach
// running when keep is set, and returns it.
func life(t *testing.T, st store.Store, keep bool) *enginetest.Engine {
	t.Helper()
	ctx := context.Background()
	e := enginetest.Open(t, st, testOpts)
	for i := range int64(8) {
		write(t, e, i*64, 64, 1)
	}
	if err := e.Volume.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range int64(8) {
		write(t, e, i*64, 48, 2) // most of each object dies
	}
	if err := e.Dev.Zero(ctx, 600*testBlock, 16*testBlock, true, false); err != nil {
		t.Fatal(err)
	}
	col := gc.New(e.Volume, gc.Options{LiveData: 0.5, Logger: zerolog.Nop()})
	if _, err := col.Threshold(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := col.CollectDead(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.Volume.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	write(t, e, 0, 8, 3)
	if _, err := col.CollectDead(ctx); err != nil {
		t.Fatal(err)
	}
	col.Stop()
	e.Close(t)

	e = enginetest.Open(t, st, testOpts)
	write(t, e, 100, 32, 4)
	write(t, e, 4, 8, 5)
	col = gc.New(e.Volume, gc.Options{LiveData: 0.5, Logger: zerolog.Nop()})
	if _, err := col.CollectDead(ctx); err != nil {
		t.Fatal(err)
	}
	col.Stop()
	if !keep {
		e.Close(t)
	}
	return e
}

func proxy(t *testing.T, st store.Store) *objproxy.Proxy {
	t.Helper()
	// As the tools open it: the store as given, no volume attached.
	e, err := engine.Open(context.Background(), engine.Options{Store: st, NoVolume: true, Proxy: objproxy.Options{MaxAttempts: 3}, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Proxy.Close)
	return e.Proxy
}

func check(t *testing.T, st store.Store) *Report {
	t.Helper()
	r, err := Check(context.Background(), proxy(t, st), CheckOptions{})
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	return r
}

func text(t *testing.T, r *Report) string {
	t.Helper()
	var b strings.Builder
	if err := r.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// checkpoints returns the watermarks of the checkpoints in st, ascending.
func checkpoints(t *testing.T, st store.Store) []int64 {
	t.Helper()
	var wms []int64
	err := st.List(context.Background(), store.CheckpointPrefix, func(name string, _ int64) error {
		wm, ok := volume.ParseCheckpointName(name)
		if !ok {
			t.Fatalf("bad checkpoint name %q", name)
		}
		wms = append(wms, wm)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return wms
}

func get(t *testing.T, st store.Store, name string) []byte {
	t.Helper()
	ctx := context.Background()
	size, err := st.Size(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, size)
	if _, err := st.GetRange(ctx, name, 0, buf); err != nil {
		t.Fatal(err)
	}
	return buf
}

func put(t *testing.T, st store.Store, name string, body []byte) {
	t.Helper()
	if err := st.Put(context.Background(), name, body, false); err != nil {
		t.Fatal(err)
	}
}

// A volume after a life with every kind of object is healthy, both
// stopped and while attached, and the checkpoints were replayed.
func TestCheckHealthy(t *testing.T) {
	st := mem.New()
	e := life(t, st, true)
	r := check(t, st)
	if !r.Healthy() {
		t.Fatalf("attached volume after a life reported damaged:\n%s", text(t, r))
	}
	e.Close(t)
	r = check(t, st)
	if !r.Healthy() {
		t.Fatalf("stopped volume after a life reported damaged:\n%s", text(t, r))
	}
	if r.Replays < 1 || r.ReplayedKeys == 0 {
		t.Errorf("check replayed %d times over %d keys, want the newest checkpoint verified against the older one:\n%s", r.Replays, r.ReplayedKeys, text(t, r))
	}
	for _, f := range r.Findings {
		if f.Severity == Warning {
			t.Errorf("warning on a cleanly stopped volume: %+v", f)
		}
	}
	if r.EndOfLog != e.Volume.Watermark() {
		t.Errorf("end of log %d, the volume's watermark was %d", r.EndOfLog, e.Volume.Watermark())
	}
}

// A key missing between the delete floor and the end of the log is
// damage, named by its key.
func TestCheckMissingKey(t *testing.T) {
	st := mem.New()
	life(t, st, false)
	wms := checkpoints(t, st)
	victim := wms[len(wms)-1] - 1 // below the newest checkpoint, above the floor
	if victim < wms[0] {
		t.Fatalf("no key between the checkpoints %v", wms)
	}
	if err := st.Delete(context.Background(), store.DataName(victim)); err != nil {
		t.Fatal(err)
	}
	r := check(t, st)
	if r.Healthy() {
		t.Fatalf("check passed with key %d deleted:\n%s", victim, text(t, r))
	}
	if got := r.DamagedKeys(); len(got) != 1 || got[0] != victim {
		t.Errorf("damaged keys %v, want [%d]:\n%s", got, victim, text(t, r))
	}
}

// A data object whose content changed after the checkpoint covering it
// was written (here: one item's seqno) makes the replay disagree with
// that checkpoint; check names the checkpoint and the block.
func TestCheckReplayDisagrees(t *testing.T) {
	st := mem.New()
	life(t, st, false)
	wms := checkpoints(t, st)
	layout := chunk.Layout{ChunkSize: testChunk, BlockSize: testBlock}
	// The last object with data below the newest checkpoint whose first
	// block the checkpoint still maps to it.
	newest := store.CheckpointName(wms[len(wms)-1])
	_, m, err := volume.LoadCheckpoint(newest, get(t, st, newest), testBlock)
	if err != nil {
		t.Fatal(err)
	}
	victim := int64(-1)
	var body []byte
	for k := wms[len(wms)-1] - 1; k >= wms[0] && victim < 0; k-- {
		b := get(t, st, store.DataName(k))
		if int64(len(b)) <= layout.MetadataSize() {
			continue
		}
		it := chunk.GetItem(b, 0)
		block := int64(it.Sector) * chunk.SectorSize / testBlock
		hit := false
		m.Scan(block, 1, func(ex extentmap.Extent, _ uint64) bool { hit = ex.Key == k; return false })
		if hit {
			victim, body = k, b
		}
	}
	if victim < 0 {
		t.Fatalf("no live object between the checkpoints %v", wms)
	}
	seq := binary.LittleEndian.Uint64(body[16:])
	binary.LittleEndian.PutUint64(body[16:], seq-1)
	put(t, st, store.DataName(victim), body)
	r := check(t, st)
	if r.Healthy() {
		t.Fatalf("check passed with key %d's seqno changed after the checkpoint:\n%s", victim, text(t, r))
	}
	found := false
	for _, f := range r.Findings {
		if f.Severity == Damage && f.Object == newest && strings.Contains(f.Message, "disagrees with a replay") {
			found = true
		}
	}
	if !found {
		t.Errorf("no finding that %s disagrees with the replay:\n%s", newest, text(t, r))
	}
}

// After a crash, keys stored past the first missing one (uploads that
// finished out of order) are orphans the next attach claims: a warning
// naming the end of the log, not damage. After a clean stop the same
// layout is a hole: damage.
func TestCheckOrphansPastTheEnd(t *testing.T) {
	st := mem.New()
	e, err := enginetest.New(st, testOpts) // crashed: never closed
	if err != nil {
		t.Fatal(err)
	}
	write(t, e, 0, 64, 1)
	write(t, e, 64, 64, 2)
	end := e.Volume.Watermark()
	orphan := get(t, st, store.DataName(end-1))
	put(t, st, store.DataName(end+2), orphan)
	r := check(t, st)
	if !r.Healthy() {
		t.Fatalf("orphans past the end after a crash reported as damage:\n%s", text(t, r))
	}
	warned := false
	for _, f := range r.Findings {
		if f.Severity == Warning && f.Key == end && strings.Contains(f.Message, "end of the log") {
			warned = true
		}
	}
	if !warned || r.EndOfLog != end {
		t.Errorf("no warning about the end of the log at %d (end %d):\n%s", end, r.EndOfLog, text(t, r))
	}

	// The same after a clean stop: the stop waited for every upload, so
	// a key past the end can only mean a lost one.
	st2 := mem.New()
	e2 := enginetest.Open(t, st2, testOpts)
	write(t, e2, 0, 64, 1)
	end2 := e2.Volume.Watermark()
	e2.Close(t)
	// enginetest runs without a lease; main's daemon releases it at a
	// clean stop.
	put(t, st2, volume.LeaseName, fmt.Appendf(nil, `{"volume_id":%q,"generation":1,"host":"h","pid":1,"counter":0,"released":true}`, e2.Volume.Superblock().VolumeID))
	put(t, st2, store.DataName(end2+1), get(t, st2, store.DataName(end2-1)))
	r = check(t, st2)
	if r.Healthy() {
		t.Fatalf("a key past a hole after a clean stop passed:\n%s", text(t, r))
	}
	if got := r.DamagedKeys(); len(got) != 1 || got[0] != end2 {
		t.Errorf("damaged keys %v, want [%d] (the hole):\n%s", got, end2, text(t, r))
	}
}

// A corrupt claim record, a checkpoint of the wrong block size and a
// superblock that does not decode are each named.
func TestCheckRecords(t *testing.T) {
	st := mem.New()
	life(t, st, false)
	sb := get(t, st, store.SuperblockName)
	put(t, st, store.SuperblockName, []byte("{not json"))
	r := check(t, st)
	if r.Healthy() || !strings.Contains(text(t, r), "superblock: superblock is corrupt") {
		t.Errorf("corrupt superblock not named:\n%s", text(t, r))
	}
	put(t, st, store.SuperblockName, sb)
	if r := check(t, st); !r.Healthy() {
		t.Fatalf("restored volume damaged:\n%s", text(t, r))
	}
	// The second attach's claim record.
	claim := int64(-1)
	err := st.List(context.Background(), "", func(name string, size int64) error {
		if k, ok := store.ParseDataName(name); ok && size > 0 && size < 64 {
			claim = max(claim, k)
		}
		return nil
	})
	if err != nil || claim < 0 {
		t.Fatalf("no claim record found (%v)", err)
	}
	put(t, st, store.DataName(claim), []byte("BS3CLAIM{broken"))
	r = check(t, st)
	if got := r.DamagedKeys(); len(got) != 1 || got[0] != claim {
		t.Errorf("damaged keys %v, want the broken claim record %d:\n%s", got, claim, text(t, r))
	}
}

// Status reads an attached volume: the holder, generation, checkpoints
// and data, and writes nothing.
func TestStatus(t *testing.T) {
	st := mem.New()
	e := life(t, st, true)
	before := names(t, st)
	s, err := ReadStatus(context.Background(), proxy(t, st), Fallback{})
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	claims := int64(0)
	for name, size := range before {
		if _, ok := store.ParseDataName(name); ok && size > 0 && volume.IsClaimRecord(get(t, st, name)) {
			claims++
		}
	}
	switch {
	case s.VolumeID != e.Volume.Superblock().VolumeID:
		t.Errorf("volume id %q, want %q", s.VolumeID, e.Volume.Superblock().VolumeID)
	case s.Generation != e.Volume.Generation() || s.Generation != 2:
		t.Errorf("generation %d, want 2", s.Generation)
	case s.Size != testSize || s.BlockSize != testBlock || s.ChunkSize != testChunk:
		t.Errorf("geometry %d/%d/%d", s.Size, s.BlockSize, s.ChunkSize)
	case claims == 0 || s.ClaimRecords != claims:
		t.Errorf("%d claim records, the bucket holds %d", s.ClaimRecords, claims)
	case len(s.Checkpoints) != 2 || s.Watermark != s.Checkpoints[1].Watermark || s.DeleteFloor != s.Checkpoints[0].Watermark:
		t.Errorf("checkpoints %+v, watermark %d, floor %d", s.Checkpoints, s.Watermark, s.DeleteFloor)
	case s.LiveFraction <= 0 || s.LiveFraction > 1 || s.LiveBlocks > s.StoredBlocks:
		t.Errorf("live fraction %v (%d of %d)", s.LiveFraction, s.LiveBlocks, s.StoredBlocks)
	case s.Objects != "plaintext, no checksums": // enginetest attaches without sealed.Open
		t.Errorf("status says objects are %q, want plaintext without checksums", s.Objects)
	}
	// The enginetest engine runs without a lease (LeaseInterval 0), so
	// the one from main's daemon is written here as it would be.
	put(t, st, volume.LeaseName, fmt.Appendf(nil, `{"volume_id":%q,"generation":2,"host":%q,"pid":%d,"counter":3,"released":false,"renewed":%q}`,
		s.VolumeID, host, os.Getpid(), time.Now().UTC().Format(time.RFC3339Nano)))
	s, err = ReadStatus(context.Background(), proxy(t, st), Fallback{})
	if err != nil {
		t.Fatal(err)
	}
	if !s.Lease.Readable || s.Lease.Released || s.Lease.PID != os.Getpid() || s.Lease.Host != host {
		t.Errorf("lease %+v", s.Lease)
	}
	var b strings.Builder
	if err := s.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), fmt.Sprintf("held by host %s pid %d, generation 2", host, os.Getpid())) {
		t.Errorf("status text does not name the holder:\n%s", b.String())
	}
	after := names(t, st)
	delete(after, volume.LeaseName)
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Errorf("status changed the bucket:\nbefore %v\nafter  %v", before, after)
	}
}

func names(t *testing.T, st store.Store) map[string]int64 {
	t.Helper()
	m := map[string]int64{}
	if err := st.List(context.Background(), "", func(name string, size int64) error { m[name] = size; return nil }); err != nil {
		t.Fatal(err)
	}
	return m
}

// Repair removes probe objects older than ProbeMaxAge and nothing else.
func TestRepairProbes(t *testing.T) {
	st := mem.New()
	life(t, st, false)
	now := time.Now()
	old := fmt.Sprintf("conditional-write-probe-77-%d", now.Add(-2*ProbeMaxAge).UnixNano())
	fresh := fmt.Sprintf("payload-checksum-probe-78-%d", now.Add(-time.Minute).UnixNano())
	put(t, st, old, []byte("probe"))
	put(t, st, fresh, []byte("probe"))
	before := names(t, st)
	r := check(t, st)
	if !r.Healthy() || len(r.Probes) != 2 {
		t.Fatalf("probes: %v, healthy %v:\n%s", r.Probes, r.Healthy(), text(t, r))
	}
	done, err := Repair(context.Background(), proxy(t, st), r, now)
	if err != nil {
		t.Fatal(err)
	}
	after := names(t, st)
	if len(done) != 1 {
		t.Errorf("repairs %v, want the old probe removed", done)
	}
	if _, ok := after[old]; ok {
		t.Errorf("old probe %s still there", old)
	}
	delete(before, old)
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Errorf("repair changed more than the old probe:\nbefore %v\nafter  %v", before, after)
	}
}

// A data object below the delete floor that the volume still maps is
// not covered by key contiguity (keys there may be collected); check
// finds it missing through the state the next attach would recover.
func TestCheckMappedObjectMissing(t *testing.T) {
	st := mem.New()
	e := enginetest.Open(t, st, testOpts)
	ctx := context.Background()
	write(t, e, 0, 64, 1) // stays live: never overwritten
	first := e.Volume.Watermark() - 1
	for i := range 3 {
		write(t, e, 1000, 8, uint64(2+i))
		if err := e.Volume.Checkpoint(ctx); err != nil {
			t.Fatal(err)
		}
	}
	e.Close(t)
	if wms := checkpoints(t, st); wms[0] <= first {
		t.Fatalf("the delete floor %d is not above key %d", wms[0], first)
	}
	if r := check(t, st); !r.Healthy() {
		t.Fatalf("healthy volume reported damaged:\n%s", text(t, r))
	}
	if err := st.Delete(ctx, store.DataName(first)); err != nil {
		t.Fatal(err)
	}
	r := check(t, st)
	if got := r.DamagedKeys(); len(got) != 1 || got[0] != first {
		t.Fatalf("damaged keys %v, want [%d] (deleted, still mapped):\n%s", got, first, text(t, r))
	}
	if !strings.Contains(text(t, r), "maps 64 block(s) to it") {
		t.Errorf("the finding does not say how many blocks are lost:\n%s", text(t, r))
	}
}

// An encrypted volume, read through its key as `bs3 status` and `bs3
// check` do (sealed.Open), is healthy after a life, and a truncated
// sealed data object is still named by its key.
func TestCheckEncrypted(t *testing.T) {
	raw := mem.New()
	keyPath := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(keyPath, bytes.Repeat([]byte{7}, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := sealed.KeyConfig{KeyFile: keyPath}
	ctx := context.Background()
	st, rec, err := sealed.Open(ctx, raw, cfg)
	if err != nil {
		t.Fatal(err)
	}
	o := testOpts
	o.Encryption = rec
	e := enginetest.Open(t, st, o)
	write(t, e, 0, 64, 1)
	write(t, e, 32, 64, 2)
	victim := e.Volume.Watermark() - 1
	e.Close(t)

	st, _, err = sealed.Open(ctx, raw, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r := check(t, st); !r.Healthy() {
		t.Fatalf("encrypted volume reported damaged:\n%s", text(t, r))
	}
	s, err := ReadStatus(ctx, proxy(t, st), Fallback{})
	if err != nil {
		t.Fatal(err)
	}
	if s.LiveBlocks < 96 || s.VolumeID != e.Volume.Superblock().VolumeID {
		t.Errorf("status of the encrypted volume: %d live blocks (want >= 96), id %q", s.LiveBlocks, s.VolumeID)
	}
	if want := "encrypted (" + sealed.CipherV1 + ")"; s.Objects != want {
		t.Errorf("status says objects are %q, want %q", s.Objects, want)
	}
	// Plain check of the raw bucket sees ciphertext: never healthy.
	if r, err := Check(ctx, proxy(t, raw), CheckOptions{}); err == nil && r.Healthy() {
		t.Errorf("the raw (still encrypted) bucket passed check:\n%s", text(t, r))
	}

	// Cut the sealed object short by whole sealed segments, so that its
	// stored size stays a possible one and the listing works.
	body := get(t, raw, store.DataName(victim))
	plain, ok := sealed.PlainSize(int64(len(body)))
	if !ok || plain < 8192 {
		t.Fatalf("key %d: stored %d bytes, plain %d (%v)", victim, len(body), plain, ok)
	}
	put(t, raw, store.DataName(victim), body[:sealed.SealedSize(plain-4096)])
	r := check(t, st)
	if got := r.DamagedKeys(); len(got) != 1 || got[0] != victim {
		t.Errorf("damaged keys %v, want [%d] (sealed object cut short):\n%s", got, victim, text(t, r))
	}
	// Cut inside a segment, even the first (listed as 1 byte by the
	// sealed store, TestTruncated there): named by its key too.
	for _, cut := range []int{len(body) - 100, 10} {
		put(t, raw, store.DataName(victim), body[:cut])
		r := check(t, st)
		if got := r.DamagedKeys(); len(got) != 1 || got[0] != victim {
			t.Errorf("damaged keys %v, want [%d] (sealed object cut to %d bytes):\n%s", got, victim, cut, text(t, r))
		}
	}
}
