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
	gap, err := v.rollForward(ctx, m, wm)
	if err != nil {
		return nil, err
	}
	if err := v.dropPastGap(ctx, gap); err != nil {
		return nil, err
	}
	v.nextKey.Store(gap)
	v.watermark.Store(gap)
	v.lastCkptKey = wm
	v.sinceCkpt.Store(gap - wm)
	return m, nil
}

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

// dropPastGap deletes keys that a crashed attach uploaded after the first
// missing key. At most MaxInflight chunks were in flight, so no such key
// lies further than that past the gap.
func (v *Volume) dropPastGap(ctx context.Context, gap int64) error {
	window := max(v.sb.MaxInflight, v.o.MaxInflight)
	var mu sync.Mutex
	var dropped []int64
	var firstErr error
	var wg sync.WaitGroup
	sem := make(chan struct{}, v.o.RecoveryConcurrency)
	for k := gap + 1; k <= gap+window; k++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			_, err := v.objs.Size(ctx, objproxy.High, store.DataName(k))
			if errors.Is(err, store.ErrNotFound) {
				return
			}
			if err == nil {
				err = v.objs.Delete(ctx, objproxy.High, store.DataName(k))
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = fmt.Errorf("drop key %d past the gap at %d: %w", k, gap, err)
			}
			if err == nil {
				dropped = append(dropped, k)
			}
		}()
	}
	wg.Wait()
	if len(dropped) > 0 {
		v.log.Warn().Int64("gap", gap).Ints64("dropped_keys", dropped).Msg("dropped objects past the first missing key (writes not covered by a completed flush)")
	}
	return firstErr
}
