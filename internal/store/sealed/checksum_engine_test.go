package sealed_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

var checksums = sealed.KeyConfig{Checksums: true}

// A new plaintext volume with checksums: the superblock records the
// framing, a restart reads it back without the setting (the volume keeps
// its format), and a flipped byte in any data object reads as an I/O
// error wrapping ErrCorrupt, never as wrong bytes.
func TestChecksummedVolumeMinIO(t *testing.T) {
	srv := minio.Start(t)
	raw := srv.Store(t, srv.Bucket(t))
	_, rec, err := sealed.Open(ctxT(t), raw, checksums)
	if err != nil {
		t.Fatal(err)
	}
	if rec == nil || rec.Cipher != sealed.CipherChecksum || rec.Encrypted() {
		t.Fatalf("new volume with checksums: record %+v", rec)
	}
	writeBlocks(t, mustAttach(t, raw, checksums), 1)
	if rec, _, err := sealed.ReadRecord(ctxT(t), raw); err != nil || rec == nil || rec.Cipher != sealed.CipherChecksum {
		t.Fatalf("superblock's record %+v, %v; want the checksum record", rec, err)
	}
	e := mustAttach(t, raw, sealed.KeyConfig{}) // the setting only picks a new volume's format
	checkBlocks(t, e, 1)
	e.Close(t)

	damageAndRead(t, raw, snapshot(t, raw), sealed.KeyConfig{})
}

// The checksum setting never changes an existing volume's format, and a
// key is refused on a checksummed (unencrypted) volume, leaving it as it
// was; an encrypted volume still needs its key.
func TestChecksumOpenDecisions(t *testing.T) {
	ctx := ctxT(t)
	old, summed, enc := mem.New(), mem.New(), mem.New()
	writeBlocks(t, mustAttach(t, old, sealed.KeyConfig{}), 1)
	writeBlocks(t, mustAttach(t, summed, checksums), 1)
	writeBlocks(t, mustAttach(t, enc, keyFile(t, 1)), 1)

	st, rec, err := sealed.Open(ctx, old, checksums)
	if err != nil || rec != nil || st != store.Store(old) {
		t.Fatalf("volume created without checksums, opened with the setting: store %T rec %+v err %v; want the raw store", st, rec, err)
	}
	e := mustAttach(t, old, checksums)
	checkBlocks(t, e, 1)
	e.Close(t)

	for _, tc := range []struct {
		name string
		raw  store.Store
		cfg  sealed.KeyConfig
		want string
	}{
		{"checksummed volume, a key", summed, keyFile(t, 1), "this volume is not encrypted"},
		{"encrypted volume, checksums but no key", enc, checksums, "volume is encrypted: set [encryption]"},
	} {
		before := snapshot(t, tc.raw)
		if _, _, err := sealed.Open(ctx, tc.raw, tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
		sameSnapshot(t, tc.name, before, snapshot(t, tc.raw))
	}
	if err := sealed.Passwd(ctx, summed, sealed.KeyConfig{}, keyFile(t, 2)); err == nil || !strings.Contains(err.Error(), "not encrypted") {
		t.Errorf("passwd on a checksummed volume: %v", err)
	}
	// A checksummed volume read as raw (a store wired without sealed.Open)
	// is refused by the volume itself.
	if _, err := enginetest.New(summed, enginetest.Options{Size: volSize, BlockSize: bs}); err == nil || !strings.Contains(err.Error(), "checksums") {
		t.Errorf("checksummed volume attached without its framing: %v", err)
	}
}

// A checkpoint that fails its checksum is unusable, not fatal: the attach
// falls back to an older checkpoint (or a replay) and reads the same data.
func TestChecksummedCheckpointDamageFallsBack(t *testing.T) {
	raw := mem.New()
	writeBlocks(t, mustAttach(t, raw, checksums), 1)
	writeBlocks(t, mustAttach(t, raw, checksums), 1) // a second checkpoint
	var newest string
	for name := range snapshot(t, raw) {
		if strings.HasPrefix(name, store.CheckpointPrefix) && name > newest {
			newest = name
		}
	}
	if newest == "" {
		t.Fatal("no checkpoint in the bucket")
	}
	body := []byte(snapshot(t, raw)[newest])
	body[len(body)/2] ^= 0x20
	if err := raw.Put(ctxT(t), newest, body, false); err != nil {
		t.Fatal(err)
	}
	e := mustAttach(t, raw, checksums)
	defer e.Close(t)
	checkBlocks(t, e, 1)
}

// A crash leaves data objects past the newest checkpoint; if the header
// segment of one of them fails its checksum, the roll-forward refuses the
// attach (as for a header that does not parse) rather than stopping the
// log there and dropping later writes, and it deletes or rewrites no
// data object.
func TestChecksummedDamagedHeaderRefusesAttach(t *testing.T) {
	ctx := ctxT(t)
	live := mem.New()
	e := mustAttach(t, live, checksums)
	buf := make([]byte, bs)
	for b := int64(0); b < volSize/bs; b += 7 {
		enginetest.BlockVersion(buf, b, 1)
		if err := e.Dev.WriteAt(ctx, buf, b*bs, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Dev.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	crashed := snapshot(t, live) // the bucket as a crash here leaves it
	e.Close(t)

	raw := mem.New()
	var victim string
	for name, body := range crashed {
		if err := raw.Put(ctx, name, []byte(body), false); err != nil {
			t.Fatal(err)
		}
		if _, ok := store.ParseDataName(name); ok && len(body) > 64<<10 && name > victim {
			victim = name
		}
	}
	if victim == "" {
		t.Fatal("no data object written before the crash")
	}
	body := []byte(crashed[victim])
	body[100] ^= 1 // inside the first segment: the chunk header
	if err := raw.Put(ctx, victim, body, false); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, raw)
	if _, err := attach(t, raw, checksums); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("attach over a damaged header: err = %v, want a refusal naming the damage", err)
	}
	after := snapshot(t, raw)
	for name, b := range before {
		if _, ok := store.ParseDataName(name); ok && after[name] != b {
			t.Errorf("data object %s was changed or deleted by the refused attach", name)
		}
	}
}

// damager sits on top of the daemon's store stack and, once armed, flips
// one byte of the next data object put after the engine took the
// object's checksum: memory damage between the frontend and the seal.
type damager struct {
	store.Store
	armed   atomic.Bool
	damaged atomic.Pointer[string] // the name of the damaged object
}

func (d *damager) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	one := [1][]byte{body}
	return d.PutV(ctx, name, one[:], ifAbsent)
}

func (d *damager) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	if _, data := store.ParseDataName(name); data && d.armed.CompareAndSwap(true, false) {
		last := body[len(body)-1]
		last[len(last)/2] ^= 0x40
		d.damaged.Store(&name)
	}
	return store.PutPieces(ctx, d.Store, name, body, ifAbsent)
}

// A chunk damaged in memory after its writes were taken is refused by the
// daemon's default stack (checksummed objects under the compressed
// store) before anything is stored: the engine fails instead of sealing
// wrong bytes under valid tags, and a later attach reads the blocks as
// they were before, never the damaged bytes.
func TestDamagedInMemoryNeverStored(t *testing.T) {
	ctx := ctxT(t)
	srv := minio.Start(t)
	raw := srv.Store(t, srv.Bucket(t))
	d := &damager{}
	e, err := enginetest.New(raw, enginetest.Options{Size: volSize, BlockSize: bs, DaemonStack: true,
		Wrappers: []engine.StoreWrapper{func(_ context.Context, st store.Store) (store.Store, error) {
			d.Store = st
			return d, nil
		}}})
	if err != nil {
		t.Fatal(err)
	}
	writeBlocks(t, e, 1) // committed and stopped cleanly: version 1 everywhere

	e, err = enginetest.New(raw, enginetest.Options{Size: volSize, BlockSize: bs, DaemonStack: true,
		Wrappers: []engine.StoreWrapper{func(_ context.Context, st store.Store) (store.Store, error) {
			d.Store = st
			return d, nil
		}}})
	if err != nil {
		t.Fatal(err)
	}
	d.armed.Store(true)
	// The device fails at the refused upload: the writes after it, or
	// the drain, return the error.
	buf := make([]byte, bs)
	for b := int64(0); b < volSize/bs && err == nil; b += 7 {
		enginetest.BlockVersion(buf, b, 2)
		err = e.Dev.WriteAt(ctx, buf, b*bs, false)
	}
	if err == nil {
		err = e.Dev.Drain(ctx)
	}
	if !errors.Is(err, store.ErrCorrupt) {
		t.Fatalf("writes after a chunk was damaged in memory: %v, want an error wrapping ErrCorrupt", err)
	}
	name := d.damaged.Load()
	if name == nil {
		t.Fatal("no data object was put")
	}
	if _, err := raw.Size(ctx, *name); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("the damaged object %s was stored (size: %v)", *name, err)
	}
	if err := e.Engine.Close(ctx); err == nil {
		t.Fatal("the engine stopped cleanly after an upload was refused")
	}

	// Every block reads as its last stored version: 1, never damaged bytes.
	e = enginetest.Open(t, raw, enginetest.Options{Size: volSize, BlockSize: bs, DaemonStack: true})
	checkBlocks(t, e, 1)
}
