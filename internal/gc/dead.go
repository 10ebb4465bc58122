package gc

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/volume"
)

// deadConcurrency bounds the deletes and placeholder uploads of a dead
// pass that are queued on the object proxy at once.
const deadConcurrency = 8

// What a dead pass does with one dead object.
type deadOp uint8

const (
	opDelete      deadOp = iota // below the floor: delete, then forget
	opPlaceholder               // at or above it: replace by an empty object
	opCheckEmpty                // at or above it, no data blocks: empty it unless it is already
)

type deadAction struct {
	op    deadOp
	key   int64
	bytes int64 // object size when known (-1: unknown)
	err   error
	done  bool // the store call succeeded
	empty bool // opCheckEmpty: the object was (or now is) empty
}

// CollectDead runs one dead-GC pass: every applied object except the
// newest that no map entry references is deleted (key below the delete
// floor) or replaced by an empty placeholder (key at or above it). Objects
// referenced by a read in flight, or being compacted, wait for a later
// pass. Passes run one at a time.
func (c *Collector) CollectDead(ctx context.Context) (Stats, error) {
	c.deadMu.Lock()
	defer c.deadMu.Unlock()
	start := time.Now()
	st, err := c.collectDead(ctx)
	st.Duration = time.Since(start)
	c.totals.record(KindDead, st, err)
	switch {
	case err != nil:
		c.log.Warn().Err(err).Int64("reclaimed", st.Reclaimed).Int64("placeholders", st.Placeholders).Msg("dead GC pass failed")
	case st.Reclaimed > 0 || st.Placeholders > 0:
		c.log.Info().Int64("reclaimed", st.Reclaimed).Int64("placeholders", st.Placeholders).
			Int64("bytes_freed", st.BytesFreed).Int64("in_use", st.InUse).Dur("duration_ms", st.Duration).Msg("dead GC pass")
	default:
		c.log.Debug().Int64("in_use", st.InUse).Dur("duration_ms", st.Duration).Msg("dead GC pass: nothing to reclaim")
	}
	return st, err
}

func (c *Collector) collectDead(ctx context.Context) (Stats, error) {
	var st Stats
	v := c.v
	if err := v.Err(); err != nil {
		// The map may no longer match the bucket; leave everything as it
		// is for the next attach to sort out.
		return st, fmt.Errorf("dead GC: volume failed: %w", err)
	}
	bs := v.BlockSize()
	var actions []*deadAction
	// Decide on the map owner goroutine: reads pin the objects they use
	// there, and an object found dead there stays dead (only applying its
	// own key could add entries to it, and that is done), so a pin-free
	// dead object cannot gain a reader later.
	err := v.MapDo(ctx, mapproxy.Low, func(m *extentmap.Map) {
		wm := v.Watermark()
		floor := v.DeleteFloor()
		// Below wm-1: never the newest object.
		for _, k := range m.Dead(wm - 1) {
			if c.isCompacting(k) || v.Pinned(k) {
				st.InUse++
				continue
			}
			_, total, _ := m.Live(k)
			size := int64(-1)
			_, isEmpty := c.empty[k]
			switch {
			case isEmpty:
				size = 0
			case total > 0:
				// Compact objects have a shorter metadata area
				// (docs/ARCHITECTURE.md §3).
				size = v.DataStartIn(m, k) + total*bs
			}
			switch {
			case k < floor:
				actions = append(actions, &deadAction{op: opDelete, key: k, bytes: size})
			case isEmpty || v.IsClaim(k):
				// Already a placeholder, or a claim record: it waits
				// for the floor.
			case total > 0:
				actions = append(actions, &deadAction{op: opPlaceholder, key: k, bytes: size})
			default:
				// No data blocks: a placeholder from an earlier attach, or
				// an object of discards only. Look before writing.
				actions = append(actions, &deadAction{op: opCheckEmpty, key: k, bytes: -1})
			}
		}
	})
	if err != nil {
		return st, fmt.Errorf("dead GC: find dead objects: %w", err)
	}
	if len(actions) == 0 {
		return st, nil
	}

	var wg sync.WaitGroup
	sem := make(chan struct{}, deadConcurrency)
	rep := c.progress("dead pass", "objects", "bytes_freed", int64(len(actions)))
	for _, a := range actions {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c.reclaim(ctx, a)
			freed := int64(0)
			if a.done {
				freed = max(a.bytes, 0)
			}
			rep.Add(1, freed)
		}()
	}
	wg.Wait()
	rep.Finish()

	// Record what was done, even if ctx ended meanwhile: a deleted object
	// must be forgotten and an emptied one counted as empty, or the map
	// would describe objects that are not there.
	var errs []error
	err = v.MapDo(context.WithoutCancel(ctx), mapproxy.Low, func(m *extentmap.Map) {
		for _, a := range actions {
			if !a.done {
				continue
			}
			switch a.op {
			case opDelete:
				if err := m.Forget(a.key); err != nil {
					errs = append(errs, fmt.Errorf("forget deleted key %d: %w", a.key, err))
				}
			case opPlaceholder, opCheckEmpty:
				if err := m.AddObject(a.key, 0); err != nil {
					errs = append(errs, fmt.Errorf("record placeholder of key %d: %w", a.key, err))
				}
			}
		}
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("record reclaimed objects: %w", err))
	}
	for _, a := range actions {
		if a.err != nil {
			errs = append(errs, a.err)
		}
		if !a.done {
			continue
		}
		switch a.op {
		case opDelete:
			delete(c.empty, a.key)
			st.Reclaimed++
		case opPlaceholder:
			c.empty[a.key] = struct{}{}
			st.Placeholders++
		case opCheckEmpty:
			c.empty[a.key] = struct{}{}
			if !a.empty {
				st.Placeholders++
			}
		}
		if a.bytes > 0 {
			st.BytesFreed += a.bytes
		}
	}
	if ctx.Err() != nil {
		// A cancelled pass is reported as such, whatever else failed.
		errs = append([]error{ctx.Err()}, errs...)
	}
	switch len(errs) {
	case 0:
		return st, nil
	case 1:
		return st, fmt.Errorf("dead GC: %w", errs[0])
	}
	// One outage fails every action alike: report the first and a count.
	return st, fmt.Errorf("dead GC: %w (and %d more errors)", errs[0], len(errs)-1)
}

// reclaim performs one action against the store, at low priority.
func (c *Collector) reclaim(ctx context.Context, a *deadAction) {
	v := c.v
	switch a.op {
	case opDelete:
		if err := v.DeleteObject(ctx, a.key); err != nil {
			a.err = fmt.Errorf("delete dead key %d: %w", a.key, err)
			return
		}
	case opCheckEmpty:
		size, err := v.ObjectSize(ctx, a.key)
		switch {
		case err == nil && size == 0:
			a.empty = true
			a.done = true
			return
		case err == nil && size < c.v.Layout().MetadataSize():
			// Shorter than any chunk: a claim record, which must stay
			// while recovery can still pass its window (above the
			// floor); below it, it is deleted like any dead object.
			head := make([]byte, volume.ClaimMagicLen)
			n, err := v.ReadObject(ctx, a.key, 0, head)
			if err != nil {
				a.err = fmt.Errorf("read dead key %d: %w", a.key, err)
				return
			}
			if volume.IsClaimRecord(head[:n]) {
				a.empty = true
				a.done = true
				return
			}
			a.bytes = size
		case err == nil:
			a.bytes = size
		case errors.Is(err, store.ErrNotFound):
			// A hole in the keys above the floor would end a
			// roll-forward there; the object is dead, so an empty
			// one in its place loses nothing.
			c.log.Warn().Int64("key", a.key).Msg("dead object above the delete floor is missing; writing a placeholder")
		default:
			a.err = fmt.Errorf("size of dead key %d: %w", a.key, err)
			return
		}
		fallthrough
	case opPlaceholder:
		if err := v.EmptyObject(ctx, a.key); err != nil {
			a.err = fmt.Errorf("replace dead key %d by a placeholder: %w", a.key, err)
			return
		}
	}
	a.done = true
}
