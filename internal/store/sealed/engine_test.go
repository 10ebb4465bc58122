package sealed_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
	"github.com/bs3/bs3/internal/volume"
)

func init() {
	// Argon2id at its production cost takes a noticeable time per
	// attach; the parameters are recorded, so cheap ones are as valid.
	sealed.DefaultArgon2 = sealed.Argon2Params{Time: 1, MemoryKiB: 1024, Threads: 1}
}

const (
	volSize = 64 << 20
	bs      = 4096
)

func writeFile(t *testing.T, name string, body []byte, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, body, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // umask-proof
		t.Fatal(err)
	}
	return p
}

func keyFile(t *testing.T, b byte) sealed.KeyConfig {
	return sealed.KeyConfig{KeyFile: writeFile(t, "key", bytes.Repeat([]byte{b}, 32), 0o600)}
}

func passFile(t *testing.T, pass string) sealed.KeyConfig {
	return sealed.KeyConfig{PassphraseFile: writeFile(t, "pass", []byte(pass+"\n"), 0o600)}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// attach opens the key and the engine as main does.
func attach(t *testing.T, raw store.Store, cfg sealed.KeyConfig) (*enginetest.Engine, error) {
	t.Helper()
	return enginetest.New(raw, enginetest.Options{Size: volSize, BlockSize: bs, Key: &cfg})
}

func mustAttach(t *testing.T, raw store.Store, cfg sealed.KeyConfig) *enginetest.Engine {
	t.Helper()
	e, err := attach(t, raw, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// writeBlocks writes version ver of every 7th block and stops the engine.
func writeBlocks(t *testing.T, e *enginetest.Engine, ver uint64) {
	t.Helper()
	ctx := ctxT(t)
	buf := make([]byte, bs)
	for b := int64(0); b < volSize/bs; b += 7 {
		enginetest.BlockVersion(buf, b, ver)
		if err := e.Dev.WriteAt(ctx, buf, b*bs, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Dev.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	e.Close(t)
}

func checkBlocks(t *testing.T, e *enginetest.Engine, ver uint64) {
	t.Helper()
	ctx := ctxT(t)
	got, want := make([]byte, bs), make([]byte, bs)
	for b := int64(0); b < volSize/bs; b++ {
		v := ver
		if b%7 != 0 {
			v = 0
		}
		enginetest.BlockVersion(want, b, v)
		if err := e.Dev.ReadAt(ctx, got, b*bs); err != nil {
			t.Fatalf("read block %d: %v", b, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("block %d: wrong content after restart", b)
		}
	}
}

// snapshot is every object of the bucket, for "nothing changed" checks.
func snapshot(t *testing.T, raw store.Store) map[string]string {
	t.Helper()
	ctx := ctxT(t)
	out := map[string]string{}
	err := raw.List(ctx, "", func(name string, size int64) error {
		b := make([]byte, size)
		if _, err := raw.GetRange(ctx, name, 0, b); err != nil {
			return err
		}
		out[name] = string(b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameSnapshot(t *testing.T, what string, before, after map[string]string) {
	t.Helper()
	if len(before) != len(after) {
		t.Errorf("%s: the bucket went from %d to %d objects", what, len(before), len(after))
	}
	for name, body := range before {
		if after[name] != body {
			t.Errorf("%s: object %s changed", what, name)
		}
	}
}

// engineRoundTrip: write through a sealed engine, restart, read back; no
// written block appears in the bucket; a damaged data object is an I/O
// error, never wrong bytes.
func engineRoundTrip(t *testing.T, raw store.Store) {
	cfg := keyFile(t, 1)
	writeBlocks(t, mustAttach(t, raw, cfg), 1)
	e := mustAttach(t, raw, cfg)
	checkBlocks(t, e, 1)
	e.Close(t)

	objs := snapshot(t, raw)
	buf := make([]byte, bs)
	for b := int64(0); b < volSize/bs; b += 7 * 37 {
		enginetest.BlockVersion(buf, b, 1)
		for name, body := range objs {
			if strings.Contains(body, string(buf[16:48])) {
				t.Fatalf("block %d appears in object %s in the clear", b, name)
			}
		}
	}
	damageAndRead(t, raw, objs, cfg)
}

// damageAndRead flips a byte in the data area of every data object in
// objs (a snapshot of raw), attaches with cfg and reads every written
// block: a read either fails with an error wrapping ErrCorrupt or returns
// exactly what was written, and at least one read per damaged object fails.
func damageAndRead(t *testing.T, raw store.Store, objs map[string]string, cfg sealed.KeyConfig) {
	t.Helper()
	var data []string
	for name, body := range objs {
		if _, ok := store.ParseDataName(name); ok && len(body) > 64<<10 {
			data = append(data, name)
		}
	}
	if len(data) == 0 {
		t.Fatal("no data object in the bucket")
	}
	for _, name := range data {
		b := []byte(objs[name])
		b[len(b)-100] ^= 1
		if err := raw.Put(ctxT(t), name, b, false); err != nil {
			t.Fatal(err)
		}
	}
	e := mustAttach(t, raw, cfg)
	defer e.Close(t)
	ctx := ctxT(t)
	failed := 0
	buf, want := make([]byte, bs), make([]byte, bs)
	for b := int64(0); b < volSize/bs; b += 7 {
		enginetest.BlockVersion(want, b, 1)
		if err := e.Dev.ReadAt(ctx, buf, b*bs); err != nil {
			if !errors.Is(err, store.ErrCorrupt) {
				t.Errorf("block %d: error %v does not wrap ErrCorrupt", b, err)
			}
			failed++
			continue
		}
		if !bytes.Equal(buf, want) {
			t.Fatalf("block %d: wrong bytes returned from a damaged bucket", b)
		}
	}
	if failed < len(data) {
		t.Fatalf("%d reads failed for %d damaged objects", failed, len(data))
	}
}

func TestEngineMem(t *testing.T) { engineRoundTrip(t, mem.New()) }

func TestEngineMinIO(t *testing.T) {
	srv := minio.Start(t)
	engineRoundTrip(t, srv.Store(t, srv.Bucket(t)))
}

func TestAttachRefusals(t *testing.T) {
	ctx := ctxT(t)
	key := keyFile(t, 1)
	enc, plain := mem.New(), mem.New()
	writeBlocks(t, mustAttach(t, enc, key), 1)
	writeBlocks(t, mustAttach(t, plain, sealed.KeyConfig{}), 1)
	encBefore, plainBefore := snapshot(t, enc), snapshot(t, plain)

	cases := []struct {
		name string
		raw  store.Store
		cfg  sealed.KeyConfig
		want string
	}{
		{"encrypted volume, no key", enc, sealed.KeyConfig{}, "volume is encrypted: set [encryption] key_file or passphrase_file"},
		{"encrypted volume, wrong key", enc, keyFile(t, 2), "the key does not open this volume's data key"},
		{"encrypted volume, a passphrase instead of its key file", enc, passFile(t, "hello"), "the key does not open this volume's data key"},
		{"plaintext volume, a key", plain, key, "this volume is not encrypted; remove [encryption] or use a new bucket/prefix"},
	}
	for _, tc := range cases {
		before := snapshot(t, tc.raw)
		_, _, err := sealed.Open(ctx, tc.raw, tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
		sameSnapshot(t, tc.name, before, snapshot(t, tc.raw))
	}

	// The second line of defence: volume.Open itself refuses a store
	// that does not match the superblock, before claiming a generation.
	st, rec, err := sealed.Open(ctx, enc, key)
	if err != nil {
		t.Fatal(err)
	}
	other := *rec
	other.SealID = bytes.Repeat([]byte{5}, 16)
	vcases := []struct {
		name string
		st   store.Store
		rec  *sealed.Record
		want string
	}{
		{"sealed store without the record", st, nil, "volume is encrypted"},
		{"raw store of an encrypted volume", enc, nil, "volume is encrypted"},
		{"record of another seal", st, &other, "another encryption seal"},
		{"plaintext volume with a record", plain, rec, "this volume is not encrypted"},
	}
	for _, tc := range vcases {
		raw := enc
		if tc.name == "plaintext volume with a record" {
			raw = plain
		}
		before := snapshot(t, raw)
		e, err := engine.Open(ctx, engine.Options{
			Store: tc.st, Encryption: tc.rec,
			Proxy:  objproxy.Options{Uploaders: 2, Downloaders: 2},
			Volume: volume.Options{Size: volSize, BlockSize: bs, ChunkSize: 4 << 20, ConditionalWrites: true},
			Logger: zerolog.Nop(),
		})
		if err == nil {
			t.Errorf("%s: engine.Open succeeded", tc.name)
			if cerr := e.Close(ctx); cerr != nil {
				t.Error(cerr)
			}
		} else if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
		sameSnapshot(t, tc.name, before, snapshot(t, raw))
	}
	sameSnapshot(t, "all refusals (encrypted)", encBefore, snapshot(t, enc))
	sameSnapshot(t, "all refusals (plaintext)", plainBefore, snapshot(t, plain))

	// And the right key still attaches and reads.
	e := mustAttach(t, enc, key)
	checkBlocks(t, e, 1)
	e.Close(t)
}

func TestPassphraseChange(t *testing.T) {
	ctx := ctxT(t)
	raw := mem.New()
	oldPass, newPass := passFile(t, "correct horse"), passFile(t, "battery staple")
	writeBlocks(t, mustAttach(t, raw, oldPass), 1)
	if err := sealed.Passwd(ctx, raw, passFile(t, "wrong"), newPass); !errors.Is(err, sealed.ErrWrongKey) {
		t.Fatalf("passwd with a wrong old passphrase: %v, want ErrWrongKey", err)
	}
	if err := sealed.Passwd(ctx, raw, oldPass, newPass); err != nil {
		t.Fatal(err)
	}
	if _, _, err := sealed.Open(ctx, raw, oldPass); !errors.Is(err, sealed.ErrWrongKey) {
		t.Fatalf("old passphrase after the change: %v, want ErrWrongKey", err)
	}
	e := mustAttach(t, raw, newPass)
	checkBlocks(t, e, 1)
	e.Close(t)
	// From a passphrase to a key file, and the superblock's other fields
	// survive the rewrite (the engine attaches with the same geometry).
	key := keyFile(t, 3)
	if err := sealed.Passwd(ctx, raw, newPass, key); err != nil {
		t.Fatal(err)
	}
	e = mustAttach(t, raw, key)
	checkBlocks(t, e, 1)
	e.Close(t)
	if _, _, err := sealed.Open(ctx, raw, newPass); !errors.Is(err, sealed.ErrWrongKey) {
		t.Fatalf("passphrase after moving to a key file: %v, want ErrWrongKey", err)
	}
}

func TestKeyFiles(t *testing.T) {
	ctx := ctxT(t)
	k := bytes.Repeat([]byte{0xab}, 32)
	hexKey := sealed.KeyConfig{KeyFile: writeFile(t, "hex", []byte(hex.EncodeToString(k)+"\n"), 0o600)}
	rawKey := sealed.KeyConfig{KeyFile: writeFile(t, "raw", k, 0o400)}
	st := mem.New()
	if _, _, err := sealed.Open(ctx, st, hexKey); err != nil {
		t.Fatalf("hex key: %v", err)
	}
	// A volume made with the hex file opens with the same key in raw
	// form: both parse to one key.
	writeBlocks(t, mustAttach(t, st, hexKey), 2)
	e := mustAttach(t, st, rawKey)
	checkBlocks(t, e, 2)
	e.Close(t)

	before := snapshot(t, st)
	for _, tc := range []struct {
		name string
		cfg  sealed.KeyConfig
		want string
	}{
		{"group-readable key", sealed.KeyConfig{KeyFile: writeFile(t, "k", k, 0o640)}, "chmod 600"},
		{"world-readable passphrase", sealed.KeyConfig{PassphraseFile: writeFile(t, "p", []byte("x"), 0o604)}, "chmod 600"},
		{"short key", sealed.KeyConfig{KeyFile: writeFile(t, "s", k[:31], 0o600)}, "want exactly 32 raw bytes or 64 hex digits"},
		{"bad hex", sealed.KeyConfig{KeyFile: writeFile(t, "h", bytes.Repeat([]byte("zz"), 32), 0o600)}, "want exactly 32 raw bytes or 64 hex digits"},
		{"empty passphrase", sealed.KeyConfig{PassphraseFile: writeFile(t, "e", []byte("\n"), 0o600)}, "is empty"},
		{"both", sealed.KeyConfig{KeyFile: hexKey.KeyFile, PassphraseFile: "x"}, "set only one"},
		{"missing", sealed.KeyConfig{KeyFile: filepath.Join(t.TempDir(), "none")}, "no such file"},
	} {
		_, _, err := sealed.Open(ctx, st, tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
	sameSnapshot(t, "bad key files", before, snapshot(t, st))
}

// The superblock records the encryption in the clear, without the key.
func TestSuperblockRecord(t *testing.T) {
	st := mem.New()
	cfg := keyFile(t, 4)
	writeBlocks(t, mustAttach(t, st, cfg), 1)
	rec, found, err := sealed.ReadRecord(ctxT(t), st)
	if err != nil || !found || rec == nil {
		t.Fatalf("ReadRecord: %v, %v, %v", rec, found, err)
	}
	if rec.Cipher != sealed.CipherV1 || rec.KDF != sealed.KDFKeyFile || len(rec.SealID) != 16 || len(rec.WrappedKey) != 12+32+16 {
		t.Errorf("record %+v", rec)
	}
	sb := snapshot(t, st)[store.SuperblockName]
	if strings.Contains(sb, string(bytes.Repeat([]byte{4}, 32))) {
		t.Error("the key appears in the superblock")
	}
	if !strings.Contains(sb, `"encryption"`) {
		t.Errorf("superblock has no encryption field: %s", sb)
	}
}
