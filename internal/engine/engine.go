// Package engine builds the block engine the way every user of it runs
// it: store stack → object proxy → read cache → volume → chunker
// (docs/ARCHITECTURE.md §2). main, the subcommands, the test
// harnesses and the benchmarks all call Open, so what is passed to which
// constructor, and the defaults derived from the configuration, are
// written here once.
package engine

import (
	"context"
	"errors"
	"fmt"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/volume"
)

// StoreWrapper wraps a store in the stack, e.g. a store that transforms
// bodies (compression) or one that injects faults. It may read the store
// (a marker object) and fail; Open then fails with its error.
type StoreWrapper func(ctx context.Context, st store.Store) (store.Store, error)

// Options say what to build. FromConfig fills them as the daemon runs;
// tests fill them directly. The garbage collector is not a part: it
// imports the volume's packages and the gc tests import this one, so
// whoever runs one builds it over Engine.Volume (main does, from the
// configuration). The Logger fields of the nested part options
// are replaced by Logger with the part's "component" field.
type Options struct {
	// Store is the raw store, already under the volume prefix. When nil,
	// Open opens the store Config describes (OpenStore).
	Store store.Store
	// Config describes the store to open when Store is nil; ReadOnly
	// opens it for the read-only tools (no bucket creation, no probes).
	Config   *config.Config
	ReadOnly bool
	// RawWrappers wrap the raw store, in order, below the seal (they see
	// the bytes the bucket holds).
	RawWrappers []StoreWrapper
	// Key, when not nil, is checked against the volume and seals its
	// objects (sealed.Open, docs/ARCHITECTURE.md §16); a zero KeyConfig
	// still refuses an encrypted volume. nil uses the store as given:
	// Encryption then names the record of a store that is already
	// sealed (nil for a plaintext one).
	Key        *sealed.KeyConfig
	Encryption *sealed.Record
	// Wrappers wrap the store, in order, above the seal: what the object
	// proxy calls.
	Wrappers []StoreWrapper

	// Proxy configures the object proxy. Proxied, when set, is told of
	// the proxy before the volume is attached (a test that must be able
	// to stop an attach in progress); an error from it ends Open with
	// that error, the proxy closed.
	Proxy   objproxy.Options
	Proxied func(*objproxy.Proxy) error

	// NoVolume stops after the object proxy (status, check, passwd).
	NoVolume bool
	// Cache, when not nil, builds a read cache the engine owns.
	// SharedCache is one the caller owns instead (it may outlive the
	// engine); at most one of them is set.
	Cache       *cache.Options
	SharedCache *cache.Cache
	// Volume configures the attach. Cache and Encryption are set by Open;
	// MaxInflight 0 takes the chunker's (2 × its buffers, see
	// DefaultInflight); CompactChunks follows volume.ReadsCompactObjects.
	Volume volume.Options
	// Chunker, when not nil, builds the userspace chunker (NBD, FUSE,
	// ublk; BUSE builds chunks in the kernel). Buffers 0 takes
	// DefaultBuffers; MaxInflight 0 takes the volume's. ChunkerEngine,
	// when set, stands between the chunker and the volume.
	Chunker       *chunker.Options
	ChunkerEngine func(*volume.Volume) chunker.Engine

	Logger zerolog.Logger
}

// Engine is one attach of a volume and the parts that serve it. Fields are
// nil for the parts the Options did not ask for.
type Engine struct {
	Store      store.Store // what the proxy calls (sealed and wrapped)
	Raw        store.Store // the raw store, below the seal and its wrappers
	Encryption *sealed.Record
	Proxy      *objproxy.Proxy
	Cache      *cache.Cache
	Volume     *volume.Volume
	Chunker    *chunker.Chunker

	ownsCache bool
}

// Open builds the parts in order. On error nothing it built is left
// running: a start that fails undoes itself.
func Open(ctx context.Context, o Options) (*Engine, error) {
	log := o.Logger
	e := &Engine{}
	ok := false
	defer func() {
		if !ok {
			e.abandon()
		}
	}()

	st := o.Store
	var err error
	if st == nil {
		if o.Config == nil {
			return nil, errors.New("engine: neither a store nor a configuration to open one from")
		}
		if st, err = OpenStore(ctx, *o.Config, log, o.ReadOnly); err != nil {
			return nil, err
		}
	}
	for _, w := range o.RawWrappers {
		if st, err = w(ctx, st); err != nil {
			return nil, err
		}
	}
	e.Raw = st
	e.Encryption = o.Encryption
	if o.Key != nil {
		// Checks the key against the superblock before anything is
		// written, and seals the objects of an encrypted volume.
		sst, rec, err := sealed.Open(ctx, st, *o.Key)
		if err != nil {
			return nil, fmt.Errorf("encryption: %w", err)
		}
		st, e.Encryption = sst, rec
		if !o.ReadOnly {
			switch {
			case rec.Encrypted():
				log.Info().Str("cipher", rec.Cipher).Str("kdf", rec.KDF).Msg("volume is encrypted")
			case rec != nil:
				log.Info().Str("format", rec.Cipher).Msg("volume is not encrypted; every object carries CRC32C checksums")
			default:
				log.Warn().Msg("volume is not encrypted and its objects carry no checksums (created without [integrity] checksums): a damaged object would read as wrong bytes")
			}
		}
	}
	sealedStore := st // the disk cache's sealer comes from here
	for _, w := range o.Wrappers {
		if st, err = w(ctx, st); err != nil {
			return nil, err
		}
	}
	e.Store = st

	po := o.Proxy
	po.Logger = component(log, "objproxy")
	e.Proxy = objproxy.New(st, po)
	if o.Proxied != nil {
		if err := o.Proxied(e.Proxy); err != nil {
			return nil, err
		}
	}
	if o.NoVolume {
		ok = true
		return e, nil
	}

	switch {
	case o.Cache != nil && o.SharedCache != nil:
		return nil, errors.New("engine: both a cache to build and a shared one")
	case o.Cache != nil:
		co := *o.Cache
		co.Logger = component(log, "cache")
		// An encrypted volume's disk cache files are sealed under a key
		// derived from its data key (docs/ARCHITECTURE.md §16.5).
		if e.Encryption.Encrypted() && co.Dir != "" && co.Sealer == nil {
			ss, ok := sealedStore.(*sealed.Store)
			if !ok {
				return nil, fmt.Errorf("read cache: the encrypted volume's store is a %T, not the sealed store: refusing a disk cache that could hold plaintext", sealedStore)
			}
			if co.Sealer, err = ss.CacheSealer(); err != nil {
				return nil, fmt.Errorf("read cache: %w", err)
			}
		}
		rc, err := cache.New(co)
		if err != nil {
			return nil, fmt.Errorf("read cache: %w", err)
		}
		e.Cache, e.ownsCache = rc, true
	default:
		e.Cache = o.SharedCache
	}

	vo := o.Volume
	vo.Cache = e.Cache
	vo.Encryption = e.Encryption
	vo.Logger = component(log, "volume")
	// Compact objects once the read path resolves their data start
	// (docs/ARCHITECTURE.md §3).
	vo.CompactChunks = volume.ReadsCompactObjects
	var co chunker.Options
	if o.Chunker != nil {
		co = *o.Chunker
		if co.Buffers <= 0 {
			co.Buffers = DefaultBuffers
		}
	}
	if vo.MaxInflight <= 0 {
		buffers := co.Buffers
		if buffers <= 0 {
			buffers = DefaultBuffers
		}
		vo.MaxInflight = int64(DefaultInflight(buffers))
	}
	v, err := volume.Open(ctx, e.Proxy, vo)
	if err != nil {
		return nil, fmt.Errorf("attach volume: %w", err)
	}
	e.Volume = v

	if o.Chunker != nil {
		if co.MaxInflight <= 0 {
			co.MaxInflight = int(vo.MaxInflight)
		}
		co.Logger = component(log, "chunker")
		var ce chunker.Engine = v
		if o.ChunkerEngine != nil {
			ce = o.ChunkerEngine(v)
		}
		e.Chunker = chunker.New(ce, co)
	}
	ok = true
	return e, nil
}

// component is log with the part's name, once per part (newLogger in
// main explains the rule).
func component(log zerolog.Logger, name string) zerolog.Logger {
	return log.With().Str("component", name).Logger()
}

// Close stops the parts in reverse order of their start, as SIGTERM does:
// the chunker commits what it holds, the volume
// writes its final checkpoint and releases the lease, then the cache (if
// the engine owns it) and the proxy stop. Every error is returned; a
// part that fails does not keep the next ones running. ctx bounds the
// chunker and the volume (docs/ARCHITECTURE.md §10).
func (e *Engine) Close(ctx context.Context) error {
	var errs []error
	if e.Chunker != nil {
		if err := e.Chunker.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("close chunker: %w", err))
		}
	}
	if e.Volume != nil {
		if err := e.Volume.Close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("close volume: %w", err))
		}
	}
	if e.ownsCache {
		e.Cache.Close()
	}
	if e.Proxy != nil {
		e.Proxy.Close()
	}
	return errors.Join(errs...)
}

// abandon undoes a partial Open: no volume exists yet, so only the proxy
// and an owned cache run.
func (e *Engine) abandon() {
	if e.ownsCache && e.Cache != nil {
		e.Cache.Close()
	}
	if e.Proxy != nil {
		e.Proxy.Close()
	}
}

// The volume is what the chunker writes through, with every optional
// part: a volume that stopped being one would silently lose them (the
// chunker finds them by type assertion).
var (
	_ chunker.UnappliedReader = (*volume.Volume)(nil)
	_ chunker.WindowedEngine  = (*volume.Volume)(nil)
	_ chunker.StreamObserver  = (*volume.Volume)(nil)
)
