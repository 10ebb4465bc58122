package engine

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/volume"
)

// The configuration's defaults and the packages' defaults for zero
// Options are one set: a test or tool that leaves a field zero runs as
// the daemon does with the default configuration.
func TestDefaultsAgree(t *testing.T) {
	c := config.Default()
	if c.S3.Uploaders != objproxy.DefaultUploaders || c.S3.Downloaders != objproxy.DefaultDownloaders {
		t.Errorf("config uploaders/downloaders %d/%d, objproxy defaults %d/%d", c.S3.Uploaders, c.S3.Downloaders, objproxy.DefaultUploaders, objproxy.DefaultDownloaders)
	}
	if c.GC.Step != gc.DefaultStep || c.GC.LiveData != gc.DefaultLiveData || c.GCWait() != gc.DefaultWait {
		t.Errorf("config gc step/live_data/wait %d/%v/%v, gc defaults %d/%v/%v", c.GC.Step, c.GC.LiveData, c.GCWait(), gc.DefaultStep, gc.DefaultLiveData, gc.DefaultWait)
	}
	if c.Checkpoint.Objects != volume.DefaultCheckpointObjects || c.CheckpointInterval() != volume.DefaultCheckpointInterval {
		t.Errorf("config checkpoint objects/interval %d/%v, volume defaults %d/%v", c.Checkpoint.Objects, c.CheckpointInterval(), volume.DefaultCheckpointObjects, volume.DefaultCheckpointInterval)
	}
	if c.CollisionBytes() != chunker.DefaultCollisionArea {
		t.Errorf("config collision area %d, chunker default %d", c.CollisionBytes(), chunker.DefaultCollisionArea)
	}
}

// FromConfig wires what main wired before the engine package existed.
func TestFromConfig(t *testing.T) {
	c := config.Default()
	c.Threads = 2
	c.Frontend = config.FrontendNBD
	o := FromConfig(c, true, zerolog.Nop())
	b := c.ChunkBuffers()
	if o.Chunker == nil || o.Chunker.Buffers != b || o.Chunker.MaxInflight != 2*b || o.Volume.MaxInflight != int64(2*b) {
		t.Fatalf("chunker %+v, volume max inflight %d: want %d buffers and %d in flight", o.Chunker, o.Volume.MaxInflight, b, 2*b)
	}
	if len(o.Wrappers) != 1 || o.Key == nil || o.Key.Checksums != c.Integrity.Checksums {
		t.Fatalf("wrappers %d, key %+v: want the compression wrapper and the integrity setting", len(o.Wrappers), o.Key)
	}
	if !o.Volume.Shrink || o.Volume.LeaseInterval != LeaseInterval || o.Proxy.Uploaders != 16 || o.Proxy.MaxAttempts != 0 {
		t.Fatalf("volume %+v, proxy %+v", o.Volume, o.Proxy)
	}
	if o.Cache == nil || o.Key == nil {
		t.Fatalf("cache %v, key %v: want both set", o.Cache, o.Key)
	}
	c.Frontend = config.FrontendBUSE
	c.Cache.MemorySize = 0
	if o := FromConfig(c, false, zerolog.Nop()); o.Chunker != nil || o.Cache != nil {
		t.Fatalf("BUSE without cache: chunker %v, cache %v; want neither", o.Chunker, o.Cache)
	}
}

func testOptions(st store.Store) Options {
	return Options{
		Store:   st,
		Proxy:   objproxy.Options{Uploaders: 4, Downloaders: 4},
		Volume:  volume.Options{Size: 16 << 20, BlockSize: 4096, ChunkSize: 1 << 20, ConditionalWrites: true},
		Chunker: &chunker.Options{Durable: true, CollisionArea: 1 << 20},
		Logger:  zerolog.Nop(),
	}
}

// A write through the engine survives Close and the next Open.
func TestOpenCloseReopen(t *testing.T) {
	ctx := context.Background()
	st := mem.New()
	e, err := Open(ctx, testOptions(st))
	if err != nil {
		t.Fatal(err)
	}
	if e.Chunker == nil || e.Volume == nil || e.Cache != nil {
		t.Fatalf("parts: chunker %v volume %v cache %v", e.Chunker, e.Volume, e.Cache)
	}
	want := bytes.Repeat([]byte{7}, 4096)
	if err := e.Chunker.WriteAt(ctx, want, 8192, true); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(ctx); err != nil {
		t.Fatal(err)
	}
	e, err = Open(ctx, testOptions(st))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := e.Close(ctx); err != nil {
			t.Error(err)
		}
	}()
	got := make([]byte, 4096)
	if err := e.Chunker.ReadAt(ctx, got, 8192); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("block written before the close reads back different")
	}
}

// Wrappers sit where their names say: raw ones see the bucket's bytes
// (sealed), the others the plaintext the proxy hands down.
func TestWrapperOrder(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, bytes.Repeat([]byte{'a'}, 64), 0o600); err != nil {
		t.Fatal(err)
	}
	var raw, plain recorder
	o := testOptions(mem.New())
	o.Key = &sealed.KeyConfig{KeyFile: keyFile}
	o.RawWrappers = []StoreWrapper{raw.wrap}
	o.Wrappers = []StoreWrapper{plain.wrap}
	e, err := Open(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if e.Encryption == nil {
		t.Fatal("no encryption record for a volume opened with a key")
	}
	block := bytes.Repeat([]byte("plaintext block "), 4096/16)
	if err := e.Chunker.WriteAt(ctx, block, 0, true); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if !holds(plain.bodies, block[:64]) {
		t.Error("the wrapper above the seal did not see the plaintext")
	}
	if len(raw.bodies) == 0 || holds(raw.bodies, block[:64]) {
		t.Errorf("the raw wrapper saw %d objects, or saw the plaintext", len(raw.bodies))
	}
}

func holds(bodies map[string][]byte, b []byte) bool {
	for _, body := range bodies {
		if bytes.Contains(body, b) {
			return true
		}
	}
	return false
}

// recorder keeps the last body put under each name.
type recorder struct {
	store.Store
	mu     sync.Mutex
	bodies map[string][]byte
}

func (r *recorder) wrap(_ context.Context, s store.Store) (store.Store, error) {
	r.Store, r.bodies = s, map[string][]byte{}
	return r, nil
}

func (r *recorder) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	r.mu.Lock()
	r.bodies[name] = bytes.Clone(body)
	r.mu.Unlock()
	return r.Store.Put(ctx, name, body, ifAbsent)
}

// An attach that fails leaves nothing running: the proxy is closed.
func TestOpenFailureStopsProxy(t *testing.T) {
	ctx := context.Background()
	o := testOptions(mem.New())
	o.Volume.BlockSize = 1000 // invalid
	var p *objproxy.Proxy
	o.Proxied = func(x *objproxy.Proxy) error { p = x; return nil }
	if _, err := Open(ctx, o); err == nil || !strings.Contains(err.Error(), "attach volume") {
		t.Fatalf("Open with a bad block size: %v, want an attach error", err)
	}
	if p == nil {
		t.Fatal("Proxied was not called")
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := p.Size(cctx, objproxy.High, "x"); !errors.Is(err, objproxy.ErrClosed) {
		t.Fatalf("proxy after a failed Open: %v, want ErrClosed", err)
	}
}

// Open needs a store or a configuration to open one from.
func TestOpenNoStore(t *testing.T) {
	if _, err := Open(context.Background(), Options{}); err == nil {
		t.Fatal("Open without a store: no error")
	}
}
