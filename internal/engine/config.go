package engine

import (
	"context"
	"fmt"
	"os"
	"path"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/compressed"
	"github.com/bs3/bs3/internal/store/dir"
	s3store "github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/volume"
)

// LeaseInterval is how often the daemon renews the volume lease; a second
// daemon on the same volume waits 2.5 intervals before it may attach over
// a lease that was not released (docs/ARCHITECTURE.md §9).
const LeaseInterval = 5 * time.Second

// DefaultBuffers is the chunker's buffer count when Options leave it 0:
// a 32 MiB write buffer of 4 MiB chunks for one thread (the daemon's
// count comes from the configuration, config.ChunkBuffers).
const DefaultBuffers = 8

// DefaultInflight is the most chunks that may have a key and not be
// applied yet, for a chunker of buffers buffers. A chunk's buffer is
// reused once its object is stored, so more chunks than buffers may wait
// for their in-order apply behind a slow upload (docs/ARCHITECTURE.md
// §4.4); the claim window of the next attach covers them all.
func DefaultInflight(buffers int) int { return 2 * buffers }

// FromConfig returns the Options the daemon attaches with: every part
// that cfg describes, the store opened from cfg, the chunker unless the
// frontend is BUSE (the kernel builds the chunks there). shrink is
// `bs3 serve --shrink`.
func FromConfig(cfg config.Config, shrink bool, log zerolog.Logger) Options {
	buffers := cfg.ChunkBuffers()
	inflight := DefaultInflight(buffers)
	o := Options{
		Config: &cfg,
		Key:    &sealed.KeyConfig{KeyFile: cfg.Encryption.KeyFile, PassphraseFile: cfg.Encryption.PassphraseFile, Checksums: cfg.Integrity.Checksums},
		// Compress, then seal (docs/ARCHITECTURE.md §19). Always wrapped,
		// whatever the codec: objects written under another codec must
		// stay readable.
		Wrappers: []StoreWrapper{compression(compressed.Options{Codec: cfg.Compression.Codec, Level: cfg.Compression.Level})},
		Proxy:    objproxy.Options{Uploaders: cfg.S3.Uploaders, Downloaders: cfg.S3.Downloaders},
		Volume: volume.Options{
			Size:               cfg.SizeBytes(),
			BlockSize:          int64(cfg.BlockSize),
			ChunkSize:          cfg.ChunkBytes(),
			Shrink:             shrink,
			ConditionalWrites:  cfg.S3.ConditionalWrites,
			SkipCheckpoint:     cfg.SkipCheckpoint,
			CheckpointInterval: cfg.CheckpointInterval(),
			CheckpointObjects:  int64(cfg.Checkpoint.Objects),
			MaxInflight:        int64(inflight),
			MapIdleTimeout:     cfg.GCIdleTimeout(),
			LeaseInterval:      LeaseInterval,
		},
		Logger: log,
	}
	if cfg.CacheMemoryBytes() > 0 {
		o.Cache = &cache.Options{
			MemoryBytes: cfg.CacheMemoryBytes(),
			Window:      cache.WindowFor(cfg.CacheFetchBytes()),
			FetchSize:   cfg.CacheFetchBytes(),
			Dir:         cfg.Cache.Dir,
			DiskBytes:   cfg.CacheDiskBytes(),
		}
	}
	if cfg.Frontend != config.FrontendBUSE {
		o.Chunker = &chunker.Options{
			Durable:       cfg.Write.Durable,
			Buffers:       buffers,
			MaxInflight:   inflight,
			CollisionArea: cfg.CollisionBytes(),
		}
	}
	return o
}

// ToolOptions returns the Options of the read-only tools (status, check,
// gc): the store opened read-only, sealed with the configured key, and a
// proxy that gives up after a few attempts; no volume is attached.
func ToolOptions(cfg config.Config, log zerolog.Logger) Options {
	return Options{
		Config:   &cfg,
		ReadOnly: true,
		// An encrypted volume is read through its key, checked against
		// the superblock (sealed.Open writes nothing).
		Key: &sealed.KeyConfig{KeyFile: cfg.Encryption.KeyFile, PassphraseFile: cfg.Encryption.PassphraseFile},
		// Compressed objects are read through their headers; a daemon
		// beside may be writing its first ones, so do not trust a
		// missing marker.
		Wrappers: []StoreWrapper{compression(compressed.Options{AssumeCompressed: true})},
		Proxy:    ProxyOptions(cfg),
		NoVolume: true,
		Logger:   log,
	}
}

// toolAttempts is how often the tools try a store call before giving up.
const toolAttempts = 5

// ProxyOptions are the object proxy Options of a tool run for cfg: the
// configured downloaders, few uploaders (the tools write little) and a
// bounded number of attempts, so a store that stops answering fails the
// tool instead of hanging it.
func ProxyOptions(cfg config.Config) objproxy.Options {
	return objproxy.Options{Uploaders: 2, Downloaders: cfg.S3.Downloaders, MaxAttempts: toolAttempts}
}

// compression is the StoreWrapper of the compressed store.
func compression(o compressed.Options) StoreWrapper {
	return func(ctx context.Context, st store.Store) (store.Store, error) {
		cs, err := compressed.Open(ctx, st, o)
		if err != nil {
			return nil, fmt.Errorf("compression: %w", err)
		}
		return cs, nil
	}
}

// OpenStore builds the configured object store, under the volume prefix.
// readOnly (status, check, passwd) creates nothing: no bucket, no probe
// object, no cleanup of a running daemon's temporary files.
func OpenStore(ctx context.Context, cfg config.Config, log zerolog.Logger, readOnly bool) (store.Store, error) {
	switch cfg.Store {
	case config.StoreDir:
		open := dir.New
		if readOnly {
			open = dir.OpenExisting
		}
		st, err := open(cfg.Dir.Path)
		if err != nil {
			return nil, fmt.Errorf("open dir store %s: %w", cfg.Dir.Path, err)
		}
		return store.WithPrefix(st, cfg.S3.Prefix), nil
	default:
		st, err := s3store.New(ctx, s3store.Options{
			Endpoint:     cfg.S3.Remote,
			Region:       cfg.S3.Region,
			Bucket:       cfg.S3.Bucket,
			AccessKey:    cfg.S3.AccessKey,
			SecretKey:    cfg.S3.SecretKey,
			MaxConns:     cfg.S3.Uploaders + cfg.S3.Downloaders,
			CreateBucket: !readOnly,
			// The SHA-256 of every body is the largest CPU cost of a PUT:
			// a CRC32C the store verifies replaces it where it can
			// (docs/ARCHITECTURE.md §18).
			PayloadChecksum: s3store.PayloadMode(cfg.S3.PayloadChecksum),
			Logger:          component(log, "s3"),
		})
		if err != nil {
			return nil, err
		}
		if readOnly {
			// status and check write nothing, not even probes.
			return store.WithPrefix(st, cfg.S3.Prefix), nil
		}
		// A name of its own per start, as for the conditional-write probe.
		probe := store.ProbeName(store.PayloadChecksumProbe, os.Getpid(), time.Now())
		if _, err := st.ProbePayloadChecksum(ctx, path.Join(cfg.S3.Prefix, probe)); err != nil {
			return nil, err
		}
		if cfg.S3.ConditionalWrites {
			// A name of its own per start: two daemons probing one
			// name at once would see each other's object and blame
			// the store.
			probe := store.ProbeName(store.ConditionalWriteProbe, os.Getpid(), time.Now())
			if err := st.ProbeConditionalWrites(ctx, path.Join(cfg.S3.Prefix, probe)); err != nil {
				return nil, fmt.Errorf("%w\n(the store must refuse overwrites with If-None-Match: * to fence a second writer; if it cannot, set s3.conditional_writes = false and make sure only one bs3 attaches this volume)", err)
			}
		}
		return store.WithPrefix(st, cfg.S3.Prefix), nil
	}
}
