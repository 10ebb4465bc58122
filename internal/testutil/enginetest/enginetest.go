// Package enginetest opens a real engine (object proxy → volume → chunker)
// over a store through engine.Open, as main does, for the frontend tests that must run
// against the real write path rather than an in-memory device.
package enginetest

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/volume"
)

// Engine is one attach of a volume with its userspace chunker.
type Engine struct {
	*engine.Engine
	Objs   *objproxy.Proxy
	Volume *volume.Volume
	Dev    *chunker.Chunker
	Cache  *cache.Cache // the read cache, nil with NoCache
	closed bool
}

// Options choose the geometry and the flush semantics.
type Options struct {
	Size, BlockSize int64
	ChunkSize       int64 // default 4 MiB
	Durable         bool
	// The read cache is on by default (64 MiB, 64 KiB windows, 256 KiB fetch spans), as in
	// production: NoCache turns it off, Cache shares one between engines
	// (a restart that keeps the process's cache).
	NoCache bool
	Cache   *cache.Cache
	// StoreObserver, when set, hears of every store call (metrics tests).
	StoreObserver objproxy.Observer
	// Encryption is the record sealed.Open returned when st is a sealed
	// store (nil for a plaintext one). Key instead has the engine check
	// the key against st and seal it, as main does.
	Encryption *sealed.Record
	Key        *sealed.KeyConfig
	// Buffers, when set, is the chunker's buffer count, with the chunks in
	// flight the daemon allows for it (engine.DefaultInflight): benchmarks
	// pass the daemon's default (config.Config.ChunkBuffers) to measure
	// what users run. Tests keep the smaller default below.
	Buffers int
	// DaemonStack stacks the store as the daemon's default configuration
	// does (engine.FromConfig): CRC32C-checksummed objects under the
	// compressed store with its default codec. Benchmarks use it to
	// measure the write path users run; it overrides Key.
	DaemonStack bool
	// Wrappers wrap the store above everything else (the daemon's stack
	// with DaemonStack): what the object proxy calls. Tests put faults
	// there.
	Wrappers []engine.StoreWrapper
}

// buffers is the chunker's buffer count and the volume's MaxInflight
// unless Options.Buffers is set.
const buffers = 18

// New attaches the volume in st (creating it when new). Nothing stops it
// by itself: for tests that crash it; others use Open.
func New(st store.Store, o Options) (*Engine, error) {
	if o.ChunkSize == 0 {
		o.ChunkSize = 4 << 20
	}
	nbuf, inflight := buffers, int64(buffers)
	if o.Buffers > 0 {
		nbuf, inflight = o.Buffers, int64(engine.DefaultInflight(o.Buffers))
	}
	eo := engine.Options{
		Store:      st,
		Encryption: o.Encryption,
		Key:        o.Key,
		Proxy:      objproxy.Options{Uploaders: 16, Downloaders: 16, Observer: o.StoreObserver},
		Volume: volume.Options{
			Size: o.Size, BlockSize: o.BlockSize, ChunkSize: o.ChunkSize, ConditionalWrites: true,
			CheckpointInterval: time.Minute, CheckpointObjects: 256, MaxInflight: inflight,
			MapIdleTimeout: 100 * time.Millisecond,
		},
		SharedCache: o.Cache,
		Chunker:     &chunker.Options{Durable: o.Durable, Buffers: nbuf, MaxInflight: int(inflight), CollisionArea: 1 << 20},
		Logger:      zerolog.Nop(),
	}
	if o.DaemonStack {
		d := engine.FromConfig(config.Default(), false, zerolog.Nop())
		eo.Key, eo.Wrappers = d.Key, d.Wrappers
	}
	eo.Wrappers = append(eo.Wrappers, o.Wrappers...)
	if o.Cache == nil && !o.NoCache {
		eo.Cache = &cache.Options{MemoryBytes: 64 << 20, Window: cache.DefaultWindow, FetchSize: 256 << 10}
	}
	e, err := engine.Open(context.Background(), eo)
	if err != nil {
		return nil, err
	}
	return &Engine{Engine: e, Objs: e.Proxy, Volume: e.Volume, Dev: e.Chunker, Cache: e.Cache}, nil
}

// Open is New that fails the test on error and stops the engine cleanly
// at the end of the test unless Close came first.
func Open(tb testing.TB, st store.Store, o Options) *Engine {
	tb.Helper()
	e, err := New(st, o)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if !e.closed {
			e.Close(tb)
		}
	})
	return e
}

// Close stops the engine as SIGTERM does: everything written is committed
// and a final checkpoint is written.
func (e *Engine) Close(tb testing.TB) {
	tb.Helper()
	e.closed = true
	if err := e.Engine.Close(context.Background()); err != nil {
		tb.Error(err)
	}
}

// BlockVersion fills dst (one block) with version ver of block: the block
// number and version first, then a stream seeded by both, so a block read
// back shows which write it came from and whether it is intact. Version 0
// is zeros (never written, or discarded).
func BlockVersion(dst []byte, block int64, ver uint64) {
	if ver == 0 {
		clear(dst)
		return
	}
	binary.LittleEndian.PutUint64(dst[0:], uint64(block))
	binary.LittleEndian.PutUint64(dst[8:], ver)
	r := rand.NewPCG(uint64(block), ver)
	for i := 16; i+8 <= len(dst); i += 8 {
		binary.LittleEndian.PutUint64(dst[i:], r.Uint64())
	}
}
