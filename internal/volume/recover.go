package volume

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// recover rebuilds the map: newest valid checkpoint, then roll-forward of
// the objects after its watermark in key order up to the first missing
// key, then deletion of the keys a crashed attach left past that gap
// (they are not part of the consistent prefix, DESIGN §4.3).
func (v *Volume) recover(ctx context.Context) (*extentmap.Map, error) {
	blocks := v.sb.Size / v.o.BlockSize
	var m *extentmap.Map
	var wm int64
	var err error
	if !v.o.SkipCheckpoint {
		if m, wm, err = v.loadCheckpoint(ctx); err != nil {
			return nil, err
		}
	}
	if m == nil {
		wm = 0
		if m, err = extentmap.New(blocks); err != nil {
			return nil, fmt.Errorf("new extent map of %d blocks: %w", blocks, err)
		}
	} else if m.Blocks() < blocks {
		if err := m.Grow(blocks); err != nil {
			return nil, fmt.Errorf("grow extent map to %d blocks: %w", blocks, err)
		}
	}
	from := wm
	for attempt := 0; ; attempt++ {
		gap, err := v.rollForward(ctx, m, from)
		if err != nil {
			return nil, err
		}
		next, err := v.claimFrom(ctx, m, gap)
		if errors.Is(err, errGapTaken) {
			if attempt < maxClaimAttempts {
				// A writer that is still running stored the gap key
				// meanwhile: replay it too and try again.
				from = gap
				continue
			}
			return nil, fmt.Errorf("%w (%w): another writer kept storing new keys while this one attached; stop the other bs3 first", ErrAttachedElsewhere, ErrFenced)
		}
		if err != nil {
			return nil, err
		}
		v.nextKey.Store(next)
		v.watermark.Store(next)
		v.sinceCkpt.Store(next - wm)
		return m, nil
	}
}

// maxClaimAttempts bounds how often an attach chases a writer that keeps
// storing the key it tries to claim.
const maxClaimAttempts = 8

// errGapTaken: the first missing key appeared while the attach claimed it.
var errGapTaken = errors.New("the first missing key was stored meanwhile")

// header is one fetched object header during roll-forward.
type header struct {
	missing bool
	parsed  chunk.Parsed
	err     error
}

// rollForward applies objects wm, wm+1, ... to m until the first missing
// key, which it returns. Headers (the metadata areas) are fetched
// concurrently in batches; they are applied strictly in key order.
func (v *Volume) rollForward(ctx context.Context, m *extentmap.Map, wm int64) (int64, error) {
	md := v.layout.MetadataSize()
	batch := int64(v.o.RecoveryConcurrency)
	start := time.Now()
	lastLog := start
	key := wm
	for {
		hdrs := make([]header, batch)
		var wg sync.WaitGroup
		for i := range hdrs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				hdrs[i] = v.fetchHeader(ctx, key+int64(i), md)
			}()
		}
		wg.Wait()
		for _, h := range hdrs {
			if h.err != nil {
				return 0, h.err
			}
			if h.missing {
				v.logReplay(key-wm, start, true)
				return key, nil
			}
			if err := v.applyItems(m, key, h.parsed); err != nil {
				return 0, fmt.Errorf("roll-forward: apply key %d: %w", key, err)
			}
			key++
		}
		if time.Since(lastLog) > 3*time.Second {
			v.logReplay(key-wm, start, false)
			lastLog = time.Now()
		}
	}
}

func (v *Volume) logReplay(n int64, start time.Time, done bool) {
	el := time.Since(start)
	ev := v.log.Info()
	if !done {
		ev = v.log.Info().Bool("in_progress", true)
	}
	ev.Int64("objects", n).Dur("elapsed", el).
		Float64("objects_per_s", float64(n)/max(el.Seconds(), 1e-3)).Msg("roll-forward")
}

// fetchHeader reads and parses the metadata area of key. An empty object
// is a placeholder for a collected object and parses as no items.
func (v *Volume) fetchHeader(ctx context.Context, key, md int64) header {
	buf := make([]byte, md)
	n, err := v.objs.GetRange(ctx, objproxy.High, store.DataName(key), 0, buf)
	if errors.Is(err, store.ErrNotFound) {
		return header{missing: true}
	}
	if err != nil {
		return header{err: fmt.Errorf("roll-forward: read header of key %d: %w", key, err)}
	}
	if n == 0 {
		return header{}
	}
	if int64(n) < md {
		return header{err: fmt.Errorf("roll-forward: object %s (key %d) is %d bytes, shorter than its %d-byte metadata area: the object is corrupt; refusing to attach so that no later data is dropped (inspect or remove it by hand)", store.DataName(key), key, n, md)}
	}
	p, err := v.layout.Parse(buf, -1, v.devSectors())
	if err != nil {
		return header{err: fmt.Errorf("roll-forward: object %s (key %d) is corrupt: %v; refusing to attach so that no later data is dropped", store.DataName(key), key, err)}
	}
	return header{parsed: p}
}

// claimWindow is how many keys an attach claims from the gap on: more than
// a previous writer can have in flight past its applied prefix (its chunk
// buffers and GC chunks).
func (v *Volume) claimWindow() int64 {
	return 2*max(v.sb.MaxInflight, v.o.MaxInflight) + 16
}

// claimFrom makes the keys [gap, gap+window) this attach's own and returns
// the first key it will write. Keys a crashed writer left past the gap are
// not part of the consistent prefix and are deleted.
//
// With conditional writes, the gap key is claimed first with an empty
// placeholder (If-None-Match). From then on a previous writer that is
// still alive (two daemons on one volume) fails its upload of the gap key
// with 412 and, since it applies keys in order, can never apply anything
// after it: its later keys are orphans. Every other key of the window is
// then claimed too, deleting an orphan found there, so that none of its
// in-flight uploads can land among this attach's keys (DESIGN §4.6). The
// placeholders are tracked in the map like any collected object and
// reclaimed by dead GC.
//
// Without conditional writes nothing can be claimed: keys past the gap
// are deleted and writing starts at the gap.
func (v *Volume) claimFrom(ctx context.Context, m *extentmap.Map, gap int64) (int64, error) {
	window := v.claimWindow()
	if !v.o.ConditionalWrites {
		return gap, v.eachKey(ctx, gap+1, gap+window, v.dropKey)
	}
	if err := v.objs.Put(ctx, objproxy.High, store.DataName(gap), nil, true); err != nil {
		if errors.Is(err, store.ErrExists) {
			return 0, errGapTaken
		}
		return 0, fmt.Errorf("claim key %d: %w", gap, err)
	}
	if err := v.eachKey(ctx, gap+1, gap+window, v.claimKey); err != nil {
		return 0, err
	}
	for k := gap; k < gap+window; k++ {
		if err := m.AddObject(k, 0); err != nil {
			return 0, fmt.Errorf("track placeholder %d: %w", k, err)
		}
	}
	return gap + window, nil
}

// claimKey stores an empty placeholder under k, deleting an orphan that a
// previous writer's upload landed there first (reported as dropped).
func (v *Volume) claimKey(ctx context.Context, k int64) (dropped bool, err error) {
	name := store.DataName(k)
	for attempt := 0; attempt < maxClaimAttempts; attempt++ {
		err := v.objs.Put(ctx, objproxy.High, name, nil, true)
		if err == nil {
			return dropped, nil
		}
		if !errors.Is(err, store.ErrExists) {
			return dropped, fmt.Errorf("claim key %d: %w", k, err)
		}
		if err := v.objs.Delete(ctx, objproxy.High, name); err != nil {
			return dropped, fmt.Errorf("drop orphan key %d: %w", k, err)
		}
		dropped = true
	}
	return dropped, fmt.Errorf("claim key %d: another writer keeps storing it; is a second bs3 attached to this volume?", k)
}

// dropKey deletes k if it exists.
func (v *Volume) dropKey(ctx context.Context, k int64) (bool, error) {
	_, err := v.objs.Size(ctx, objproxy.High, store.DataName(k))
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	if err == nil {
		err = v.objs.Delete(ctx, objproxy.High, store.DataName(k))
	}
	if err != nil {
		return false, fmt.Errorf("drop key %d: %w", k, err)
	}
	return true, nil
}

// eachKey runs fn for the keys in [from, to), RecoveryConcurrency at a
// time, all past the first missing key (from-1), and logs the keys whose
// objects fn dropped: no recovery could ever apply them.
func (v *Volume) eachKey(ctx context.Context, from, to int64, fn func(context.Context, int64) (bool, error)) error {
	var mu sync.Mutex
	var dropped []int64
	var firstErr error
	var wg sync.WaitGroup
	sem := make(chan struct{}, v.o.RecoveryConcurrency)
	for k := from; k < to; k++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			d, err := fn(ctx, k)
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			if d {
				dropped = append(dropped, k)
			}
		}()
	}
	wg.Wait()
	if len(dropped) > 0 {
		v.log.Warn().Int64("gap", from-1).Ints64("dropped_keys", dropped).Msg("dropped objects past the first missing key (writes not covered by a completed flush)")
	}
	return firstErr
}
