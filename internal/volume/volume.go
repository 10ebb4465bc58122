// Package volume is the engine of bs3: it owns the write path (chunk →
// key → upload → map update), the read path (map lookup → parallel ranged
// GETs), the superblock, checkpoints and recovery of one volume.
//
// It talks to the object store only through the object proxy and to the
// extent map only through the map proxy; it never knows which frontend
// feeds it. The BUSE adapter (frontend/buse) and the chunker of the
// userspace frontends both call Read, NextKey and Commit.
package volume

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/sealed"
)

// Options are the volume's settings, taken from the configuration by main.
type Options struct {
	Size      int64 // device size in bytes (multiple of BlockSize)
	BlockSize int64 // 512 or 4096
	ChunkSize int64 // data bytes per chunk
	// Shrink allows attaching with a Size smaller than the volume's.
	Shrink bool
	// ConditionalWrites writes new keys with If-None-Match: * so that a
	// second writer on the volume is refused instead of interleaving.
	ConditionalWrites bool
	// SkipCheckpoint neither loads nor writes checkpoints (the map is
	// rebuilt from every object at attach).
	SkipCheckpoint bool
	// CheckpointInterval and CheckpointObjects bound how much recovery has
	// to replay: a checkpoint is written when either is reached.
	CheckpointInterval time.Duration
	CheckpointObjects  int64
	// MaxInflight is the most chunks the frontend keeps in flight; it
	// bounds how far past a gap a crashed attach may have left keys.
	MaxInflight int64
	// MapIdleTimeout bounds how long low-priority map work waits for an
	// idle moment (gc.idle_timeout).
	MapIdleTimeout time.Duration
	// LeaseInterval is how often the attached daemon renews the volume's
	// lease; a second daemon waits 2.5 intervals to tell a live holder
	// from a crashed one. 0 disables the lease (tests of one engine).
	LeaseInterval time.Duration
	// RecoveryConcurrency is how many object headers are fetched at once
	// during roll-forward.
	RecoveryConcurrency int
	// CompactChunks stores chunks in the compact layout: only the used
	// item slots before the data (docs/ARCHITECTURE.md §3). The attach
	// moves the volume to format 2 first. Objects of both layouts are
	// always read.
	CompactChunks bool
	// Cache, when not nil, serves reads and keeps what they fetch and what
	// commits store; its entries are keyed by this volume's id. main owns
	// it (it may outlive the volume).
	Cache *cache.Cache
	// Encryption is the record sealed.Open returned when objs seals its
	// objects, nil for a plaintext store. A new volume records it in its
	// superblock; an existing one must record the same seal.
	Encryption *sealed.Record
	Logger     zerolog.Logger
}

// Defaults for zero Options fields; they are those of [checkpoint]
// objects and interval (internal/engine's tests hold the two together).
const (
	DefaultCheckpointObjects  = 1024
	DefaultCheckpointInterval = 5 * time.Minute
)

// ErrFenced is returned by writes after another writer took the volume.
var ErrFenced = errors.New("volume is owned by another writer")

// Volume is one attached volume.
type Volume struct {
	o      Options
	layout chunk.Layout
	objs   *objproxy.Proxy
	maps   *mapproxy.Proxy
	log    zerolog.Logger
	sb     Superblock
	cache  *cache.Cache // nil: no read cache
	ra     readahead

	nextKey atomic.Int64 // next key to hand out
	// inflight counts the commits running; closing (under inflightMu)
	// stops new ones from entering once Close waits for them, as a
	// WaitGroup may not grow from zero while it is waited on.
	inflightMu sync.Mutex
	closing    bool
	inflight   sync.WaitGroup

	// Objects are applied to the map strictly in key order, so the map is
	// always the state after a prefix of the keys: a checkpoint taken at
	// any moment is exactly the prefix below its watermark, and an object
	// that died in the map stays dead after any recovery (docs/ARCHITECTURE.md §4).
	// applyMu/applyCond let a commit wait for its predecessors; watermark
	// (the next key to apply) is written only on the map owner goroutine.
	applyMu   sync.Mutex
	applyCond *sync.Cond
	watermark atomic.Int64
	sinceCkpt atomic.Int64
	// deleteFloor: see DeleteFloor.
	deleteFloor atomic.Int64

	failed atomic.Pointer[error]

	// claims are the keys of the claim records this attach wrote or
	// replayed; filled during attach, read-only afterwards.
	claims map[int64]struct{}

	// pins counts the reads in flight per object key (see Pinned).
	pinMu sync.Mutex
	pins  map[int64]int

	ckptMu    sync.Mutex // one checkpoint at a time
	ckptDone  chan struct{}
	leaseDone chan struct{}
	ckptStop  chan struct{}
	// bgCtx is the context of the background loops (lease, periodic
	// checkpoints); Close cancels it so that none of them outlives a
	// bounded shutdown.
	bgCtx    context.Context
	bgCancel context.CancelFunc

	closeOnce sync.Once
	closeErr  error

	stats statCounters // for Stats (stats.go)
}

// Open attaches the volume stored behind objs: superblock, newest valid
// checkpoint, roll-forward, then it accepts I/O.
func Open(ctx context.Context, objs *objproxy.Proxy, o Options) (*Volume, error) {
	if o.BlockSize != 512 && o.BlockSize != 4096 {
		return nil, fmt.Errorf("block size %d: must be 512 or 4096", o.BlockSize)
	}
	if o.Size <= 0 || o.Size%o.BlockSize != 0 {
		return nil, fmt.Errorf("size %d: must be a positive multiple of the block size %d", o.Size, o.BlockSize)
	}
	if o.ChunkSize <= 0 || o.ChunkSize%o.BlockSize != 0 {
		return nil, fmt.Errorf("chunk size %d: must be a positive multiple of the block size %d", o.ChunkSize, o.BlockSize)
	}
	if o.RecoveryConcurrency <= 0 {
		o.RecoveryConcurrency = 32
	}
	if o.MaxInflight <= 0 {
		o.MaxInflight = 64
	}
	if o.CheckpointObjects <= 0 {
		o.CheckpointObjects = DefaultCheckpointObjects
	}
	if o.CheckpointInterval <= 0 {
		o.CheckpointInterval = DefaultCheckpointInterval
	}
	v := &Volume{
		o:         o,
		layout:    chunk.Layout{ChunkSize: o.ChunkSize, BlockSize: o.BlockSize},
		objs:      objs,
		cache:     o.Cache,
		log:       o.Logger,
		pins:      make(map[int64]int),
		claims:    make(map[int64]struct{}),
		ckptStop:  make(chan struct{}),
		ckptDone:  make(chan struct{}),
		leaseDone: make(chan struct{}),
	}
	v.applyCond = sync.NewCond(&v.applyMu)
	v.bgCtx, v.bgCancel = context.WithCancel(context.Background())
	if err := v.attach(ctx); err != nil {
		v.bgCancel()
		return nil, err
	}
	v.stats.attached.Store(time.Now().UnixNano())
	go v.checkpointLoop()
	return v, nil
}

// attach claims the volume (docs/ARCHITECTURE.md §6): superblock, an
// exclusive generation, the lease, then recovery. Nothing is deleted or
// overwritten before the generation is ours and the volume's state is
// established; a failure after the lease was taken releases it.
func (v *Volume) attach(ctx context.Context) error {
	o := v.o
	sb, created, err := readSuperblock(ctx, v.objs, o)
	if err != nil {
		return err
	}
	latest, records, err := latestGeneration(ctx, v.objs, sb)
	if err != nil {
		return err
	}
	if latest >= maxGeneration {
		return fmt.Errorf("volume generation %d is exhausted", latest)
	}
	v.sb = sb
	if o.LeaseInterval > 0 {
		if err := v.checkLease(ctx, latest); err != nil {
			return err
		}
	}
	v.sb.Generation = latest + 1
	if o.CompactChunks {
		// Written in establish, before any compact object can exist.
		v.sb.Format = FormatVersion
	}
	// The largest in-flight window any attach used: the next attach
	// claims past it (see claimWindow).
	v.sb.MaxInflight = max(o.MaxInflight, sb.MaxInflight)
	v.log = v.log.With().Str("volume", v.sb.VolumeID).Uint64("generation", v.sb.Generation).Logger()
	if err := v.claimGeneration(ctx, v.sb.Generation); err != nil {
		return err
	}
	if o.LeaseInterval > 0 {
		// Taken before recovery and renewed during it, so a daemon that
		// starts meanwhile sees a live holder.
		if err := v.putLease(ctx, 0, false); err != nil {
			return err
		}
		go v.leaseLoop()
	} else {
		close(v.leaseDone)
	}
	m, err := v.establish(ctx, created)
	if err != nil {
		close(v.ckptStop)
		<-v.leaseDone
		if o.LeaseInterval > 0 && !errors.Is(err, ErrFenced) {
			if lerr := v.putLease(context.WithoutCancel(ctx), 0, true); lerr != nil {
				v.log.Warn().Err(lerr).Msg("could not release the lease after a failed attach; the next start waits for it to go stale")
			}
		}
		return err
	}
	v.maps = mapproxy.New(m, o.MapIdleTimeout)
	v.pruneAttachRecords(ctx, records)
	return nil
}

// establish writes the superblock of this attach and recovers the map.
func (v *Volume) establish(ctx context.Context, created bool) (*extentmap.Map, error) {
	if err := writeSuperblock(ctx, v.objs, v.sb, created, v.o.ConditionalWrites); err != nil {
		return nil, err
	}
	if created {
		v.log.Info().Int64("size", v.sb.Size).Int64("block_size", v.sb.BlockSize).Msg("created new volume")
	}
	return v.recover(ctx)
}

// Size is the device size in bytes.
func (v *Volume) Size() int64 { return v.sb.Size }

// BlockSize is the device block size in bytes.
func (v *Volume) BlockSize() int64 { return v.o.BlockSize }

// Layout is the chunk geometry of the volume.
func (v *Volume) Layout() chunk.Layout { return v.layout }

// Generation is this attach's generation.
func (v *Volume) Generation() uint64 { return v.sb.Generation }

// Superblock returns the attached superblock.
func (v *Volume) Superblock() Superblock { return v.sb }

// MapDo runs fn on the map at prio, on the map proxy's goroutine (the
// collectors pass mapproxy.Low, docs/ARCHITECTURE.md §7).
func (v *Volume) MapDo(ctx context.Context, prio mapproxy.Priority, fn func(*extentmap.Map)) error {
	return v.maps.Do(ctx, prio, fn)
}

// ObjectSize returns the size of key's data object, at low priority (the
// collectors).
func (v *Volume) ObjectSize(ctx context.Context, key int64) (int64, error) {
	return v.objs.Size(ctx, objproxy.Low, store.DataName(key))
}

// ReadObject reads key's data object at off into buf, at low priority
// (the collectors).
func (v *Volume) ReadObject(ctx context.Context, key, off int64, buf []byte) (int, error) {
	return v.objs.GetRange(ctx, objproxy.Low, store.DataName(key), off, buf)
}

// DeleteObject deletes key's data object, at low priority. Only the dead
// collector calls it, for keys no map entry or read uses
// (docs/ARCHITECTURE.md §7.1).
func (v *Volume) DeleteObject(ctx context.Context, key int64) error {
	return v.objs.Delete(ctx, objproxy.Low, store.DataName(key))
}

// EmptyObject replaces key's data object by an empty placeholder, at low
// priority: the dead collector's way to drop a dead object's data while
// roll-forward must still find its key (docs/ARCHITECTURE.md §7.1).
func (v *Volume) EmptyObject(ctx context.Context, key int64) error {
	return v.objs.Put(ctx, objproxy.Low, store.DataName(key), nil, false)
}

// Err is the error that stopped the volume from accepting writes, or nil.
func (v *Volume) Err() error {
	if p := v.failed.Load(); p != nil {
		return *p
	}
	return nil
}

func (v *Volume) fail(err error) {
	if v.failed.CompareAndSwap(nil, &err) {
		v.log.Error().Err(err).Msg("volume stops accepting writes")
	}
	v.applyMu.Lock()
	v.applyCond.Broadcast() // commits waiting for a predecessor give up
	v.applyMu.Unlock()
}

// Close waits for in-flight writes, writes a final checkpoint, releases
// the lease and stops the map owner. It gives up when ctx ends (a bounded
// shutdown during an outage) and then says what was not done; the volume
// is left as a crash would leave it, which recovery handles. It does not
// close the object proxy (main owns it).
func (v *Volume) Close(ctx context.Context) error {
	v.closeOnce.Do(func() {
		close(v.ckptStop)
		v.bgCancel()
		v.stopReadahead()
		<-v.ckptDone
		<-v.leaseDone
		idle := make(chan struct{})
		v.inflightMu.Lock()
		v.closing = true
		v.inflightMu.Unlock()
		go func() { v.inflight.Wait(); close(idle) }()
		select {
		case <-idle:
		case <-ctx.Done():
			v.closeErr = fmt.Errorf("close: writes still being stored when the shutdown timeout ended (no final checkpoint, lease not released; the next start recovers them): %w", ctx.Err())
			return // commits in flight still use the map owner
		}
		if v.Err() == nil && !v.o.SkipCheckpoint {
			if err := v.Checkpoint(ctx); err != nil {
				v.closeErr = fmt.Errorf("final checkpoint: %w", err)
			}
		}
		if v.Err() == nil && v.o.LeaseInterval > 0 {
			if err := v.putLease(ctx, 0, true); err != nil && v.closeErr == nil {
				v.closeErr = fmt.Errorf("release lease: %w", err)
			}
		}
		v.maps.Close()
		if v.cache != nil {
			v.log.Debug().Object("cache", v.cache.Stats()).Msg("read cache counters")
		}
	})
	return v.closeErr
}

// blocksOf converts an item's sector range into device blocks.
func (v *Volume) blocksOf(it chunk.Item) (block, n int64) {
	spb := uint64(v.o.BlockSize / chunk.SectorSize)
	return int64(it.Sector / spb), int64(it.Length / spb)
}

// devSectors is the device size in 512-byte sectors.
func (v *Volume) devSectors() uint64 { return uint64(v.sb.Size / chunk.SectorSize) }

// Watermark returns the next key to apply: every key below it is in the
// map, no key at or above it is.
func (v *Volume) Watermark() int64 { return v.watermark.Load() }

// NextKey hands out the next data key. Callers take keys when a chunk is
// closed, so every chunk closed before a flush has a lower key than every
// chunk closed after it.
func (v *Volume) NextKey() int64 { return v.nextKey.Add(1) - 1 }
