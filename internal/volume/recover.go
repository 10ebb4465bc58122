package volume

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/progress"
	"github.com/bs3/bs3/internal/store"
)

// ErrNoState is returned by Open when the volume's state cannot be
// established from the bucket (no usable checkpoint where keys were
// collected). Nothing was changed; the message says what is missing.
var ErrNoState = errors.New("volume state cannot be established")

// recover rebuilds the map (docs/ARCHITECTURE.md §6): newest usable
// checkpoint, then roll-forward of the objects after its watermark in key
// order up to the first missing key outside a claimed window, then a claim
// of that key for this attach. Recovery never deletes or overwrites an
// object: keys a crashed writer left past the gap are neutralized by the
// claim record's window instead.
func (v *Volume) recover(ctx context.Context) (*extentmap.Map, error) {
	blocks := v.sb.Size / v.o.BlockSize
	names, err := v.listCheckpoints(ctx)
	if err != nil {
		return nil, err
	}
	// Dead GC deletes keys only below the oldest checkpoint kept, and only
	// after that checkpoint exists, so its name alone says how far keys
	// may be missing, whether or not its content is readable. Without a
	// usable checkpoint, a replay from key 0 is the volume only if it gets
	// past that floor without a gap.
	v.setDeleteFloor(names)
	floor := v.DeleteFloor()
	var m *extentmap.Map
	var wm int64
	var failures []error
	if !v.o.SkipCheckpoint {
		if m, wm, failures, err = v.loadCheckpoint(ctx, names); err != nil {
			return nil, err
		}
	}
	fullReplay := m == nil
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
		if fullReplay && gap < floor {
			return nil, v.noState(gap, floor, failures)
		}
		if err := v.Err(); err != nil {
			// The lease showed a newer attach while we recovered.
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

// noState explains why a replay from key 0 cannot be trusted: it stopped
// at a missing key below the delete floor, where dead GC may have deleted
// objects that only a checkpoint still accounts for.
func (v *Volume) noState(gap, floor int64, failures []error) error {
	why := "no usable checkpoint"
	if v.o.SkipCheckpoint {
		why = "skip_checkpoint = true"
	} else if len(failures) > 0 {
		why = fmt.Sprintf("no usable checkpoint (%v)", errors.Join(failures...))
	}
	hint := "Restore a checkpoint object (e.g. from an older object version) and start again"
	if v.o.SkipCheckpoint {
		hint = "Set skip_checkpoint = false"
	}
	return fmt.Errorf("%w: %s, and a replay from key 0 stops at missing key %d, below %d, the watermark of the oldest checkpoint: garbage collection may have deleted keys there that only a checkpoint accounts for, so the volume cannot be rebuilt from its objects; no data object or checkpoint was changed. %s",
		ErrNoState, why, gap, floor, hint)
}

// maxClaimAttempts bounds how often an attach chases a writer that keeps
// storing the key it tries to claim.
const maxClaimAttempts = 8

// errGapTaken: the first missing key appeared while the attach claimed it.
var errGapTaken = errors.New("the first missing key was stored meanwhile")

// A claim record is what an attach stores at the first missing key: the
// magic, then JSON. It says that the keys after it up to End belong to
// the attach of Generation, which writes nothing there but placeholders,
// so whatever else is found there (uploads of a crashed or fenced writer
// that never became part of the consistent prefix) counts as a
// placeholder, and a missing key there is no gap. It is never mistaken
// for a chunk: read as an item, the magic is a sector far past any
// device's end.
const claimMagic = "BS3CLAIM"

type claimRecord struct {
	Generation uint64 `json:"generation"`
	End        int64  `json:"end"`
}

func encodeClaim(c claimRecord) ([]byte, error) {
	j, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("encode claim record: %w", err)
	}
	return append([]byte(claimMagic), j...), nil
}

// IsClaimRecord reports whether head, the first bytes of an object,
// starts a claim record. Dead GC leaves claim records alone above the
// delete floor: replacing one with an empty placeholder would expose the
// orphans in its window to the next roll-forward.
func IsClaimRecord(head []byte) bool { return bytes.HasPrefix(head, []byte(claimMagic)) }

// IsClaim reports whether key holds a claim record that this attach
// wrote or read during recovery; others (below the checkpoint it loaded)
// are found by reading their first bytes (IsClaimRecord).
func (v *Volume) IsClaim(key int64) bool {
	_, ok := v.claims[key]
	return ok
}

// ClaimMagicLen is how many leading bytes IsClaimRecord needs.
const ClaimMagicLen = len(claimMagic)

func decodeClaim(key int64, b []byte) (claimRecord, error) {
	var c claimRecord
	if err := json.Unmarshal(b[len(claimMagic):], &c); err != nil {
		return c, fmt.Errorf("claim record at key %d is corrupt: %w", key, err)
	}
	if c.End <= key || c.End-key > maxClaimWindow {
		return c, fmt.Errorf("claim record at key %d has a window ending at %d", key, c.End)
	}
	return c, nil
}

// maxClaimWindow bounds the window a claim record may declare, so that a
// damaged record cannot make recovery skip the rest of the volume.
const maxClaimWindow = 1 << 20

// header is one fetched object header during roll-forward.
type header struct {
	missing bool
	claim   *claimRecord
	parsed  chunk.Parsed
	err     error
}

// rollForward applies objects wm, wm+1, ... to m until the first missing
// key outside a claimed window, which it returns. Headers (the metadata
// areas) are fetched concurrently in batches; they are applied strictly
// in key order.
func (v *Volume) rollForward(ctx context.Context, m *extentmap.Map, wm int64) (int64, error) {
	batch := int64(v.o.RecoveryConcurrency)
	rep := progress.New(v.log, "roll-forward", progress.Options{
		Unit: "objects", BytesName: "write_bytes", Always: true,
	})
	stopCount := func() {}
	defer func() { stopCount() }()
	counting := false
	var wbytes int64 // bytes of the writes replayed
	key := wm
	window := int64(-1) // keys below window are in a claimed window
	for {
		// Keys inside a window need no fetch: whatever is there counts
		// as a placeholder.
		for key < window {
			if err := m.AddObject(key, 0); err != nil {
				return 0, fmt.Errorf("roll-forward: track key %d of a claimed window: %w", key, err)
			}
			key++
		}
		hdrs := make([]header, batch)
		var wg sync.WaitGroup
		for i := range hdrs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				hdrs[i] = v.fetchHeader(ctx, key+int64(i))
			}()
		}
		wg.Wait()
		for _, h := range hdrs {
			if key < window {
				if err := m.AddObject(key, 0); err != nil {
					return 0, fmt.Errorf("roll-forward: track key %d of a claimed window: %w", key, err)
				}
				key++
				continue
			}
			if h.err != nil {
				return 0, h.err
			}
			if h.missing {
				rep.Set(key-wm, wbytes)
				rep.Finish()
				return key, nil
			}
			if h.claim != nil {
				if h.claim.Generation >= v.sb.Generation {
					return 0, fmt.Errorf("%w (%w): key %d was claimed by generation %d, not older than this attach's %d", ErrAttachedElsewhere, ErrFenced, key, h.claim.Generation, v.sb.Generation)
				}
				window = h.claim.End
				v.claims[key] = struct{}{}
			} else if g := itemsGeneration(h.parsed); g >= v.sb.Generation {
				return 0, fmt.Errorf("%w (%w): key %d holds writes of generation %d, not older than this attach's %d", ErrAttachedElsewhere, ErrFenced, key, g, v.sb.Generation)
			}
			if err := v.applyItems(m, key, h.parsed); err != nil {
				return 0, fmt.Errorf("roll-forward: apply key %d: %w", key, err)
			}
			for _, it := range h.parsed.Items {
				if it.HasData() {
					wbytes += it.Bytes()
				}
			}
			key++
		}
		rep.Set(key-wm, wbytes)
		if !counting && wm == 0 && rep.Elapsed() >= progress.DefaultEvery {
			counting = true
			stopCount = v.countKeys(ctx, wm, rep)
		}
	}
}

// countKeys estimates, for the progress lines of a roll-forward from
// key from, how many keys it will visit, by listing the bucket in the
// background, and returns the function that stops the listing.
// rollForward starts it only for a replay from key 0 (no usable
// checkpoint, or skip_checkpoint) that has run for a progress interval:
// that is the replay that can be long, and there the listing costs a
// request per thousand objects against the roll-forward's one per object;
// after a checkpoint the roll-forward is bounded by checkpoint.objects,
// and a short replay (every attach in the crash tests) makes no extra
// request. The count is of the data objects at or above from, an upper
// bound: the roll-forward ends at the first missing key, before any
// orphan past it.
func (v *Volume) countKeys(ctx context.Context, from int64, rep *progress.Reporter) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		n, err := v.countDataKeys(ctx, from)
		if err == nil {
			rep.SetTotal(n)
		} else if ctx.Err() == nil {
			v.log.Debug().Err(err).Msg("roll-forward: could not count the objects for the progress lines")
		}
	}()
	return func() { cancel(); <-done }
}

// countDataKeys counts the data objects at or above key from.
func (v *Volume) countDataKeys(ctx context.Context, from int64) (int64, error) {
	var n int64
	err := v.objs.List(ctx, objproxy.High, "", func(name string, _ int64) error {
		if k, ok := store.ParseDataName(name); ok && k >= from {
			n++
		}
		return ctx.Err()
	})
	if err != nil {
		return 0, fmt.Errorf("count data objects: %w", err)
	}
	return n, nil
}

// itemsGeneration is the highest generation among the items of p.
func itemsGeneration(p chunk.Parsed) uint64 {
	var g uint64
	for _, it := range p.Items {
		g = max(g, it.Seqno>>GenerationBits)
	}
	return g
}

// fetchHeader reads and parses the metadata area of key. An empty object
// is a placeholder for a collected object and parses as no items; a
// short object starting with the claim magic is a claim record.
func (v *Volume) fetchHeader(ctx context.Context, key int64) header {
	h, err := ReadHeader(ctx, v.objs, objproxy.High, v.layout, v.devSectors(), key)
	switch {
	case err != nil:
		return header{err: fmt.Errorf("roll-forward: %w", err)}
	case h.Kind == KeyMissing:
		return header{missing: true}
	case h.Kind == KeyClaim && h.Err != nil:
		return header{err: fmt.Errorf("roll-forward: %w; refusing to attach so that no later data is dropped (inspect object %s)", h.Err, store.DataName(key))}
	case h.Kind == KeyClaim:
		return header{claim: &h.Claim}
	case h.Err != nil:
		return header{err: fmt.Errorf("roll-forward: %w; refusing to attach so that no later data is dropped (inspect or remove it by hand)", h.Err)}
	}
	return header{parsed: h.Parsed}
}

// claimWindow is how many keys an attach claims from the gap on: more than
// a previous writer can have in flight past its applied prefix (its chunk
// buffers and GC chunks).
func (v *Volume) claimWindow() int64 {
	return 2*max(v.sb.MaxInflight, v.o.MaxInflight) + 16
}

// claimFrom makes the keys [gap, gap+window) this attach's own and returns
// the first key it will write.
//
// The claim record goes to the gap key with ifAbsent: that create is the
// moment this attach's prefix is decided. A previous writer that is still
// alive either stored the gap key first (then the attach replays it and
// looks again) or fails its upload with ErrExists and, since it applies
// keys in order, can never apply anything after it. Its later uploads
// may still land in the window; the record makes every later recovery
// treat them as placeholders, so the attach needs to delete nothing, and
// a crash at any step of the claim leaves a volume the next attach reads
// the same way. Empty placeholders are then created where window keys do
// not exist yet, which makes a late upload of the old writer fail too;
// an object already there is left for dead GC (it is tracked as an empty
// object, and GC replaces it with a placeholder).
func (v *Volume) claimFrom(ctx context.Context, m *extentmap.Map, gap int64) (int64, error) {
	end := gap + v.claimWindow()
	rec, err := encodeClaim(claimRecord{Generation: v.sb.Generation, End: end})
	if err != nil {
		return 0, err
	}
	if err := v.objs.Put(ctx, objproxy.High, store.DataName(gap), rec, v.o.ConditionalWrites); err != nil {
		if errors.Is(err, store.ErrExists) {
			return 0, errGapTaken
		}
		return 0, fmt.Errorf("claim key %d: %w", gap, err)
	}
	v.claims[gap] = struct{}{}
	if v.o.ConditionalWrites {
		v.placeholders(ctx, gap+1, end)
	}
	for k := gap; k < end; k++ {
		if err := m.AddObject(k, 0); err != nil {
			return 0, fmt.Errorf("track claimed key %d: %w", k, err)
		}
	}
	v.log.Info().Int64("gap", gap).Int64("first_key", end).Msg("claimed keys for this attach")
	return end, nil
}

// placeholders creates empty objects under the keys of [from, to) that
// do not exist, RecoveryConcurrency at a time. Failures are logged only:
// the claim record already protects the window.
func (v *Volume) placeholders(ctx context.Context, from, to int64) {
	var mu sync.Mutex
	var orphans []int64
	var firstErr error
	var wg sync.WaitGroup
	sem := make(chan struct{}, v.o.RecoveryConcurrency)
	for k := from; k < to; k++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			err := v.objs.Put(ctx, objproxy.High, store.DataName(k), nil, true)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case errors.Is(err, store.ErrExists):
				orphans = append(orphans, k)
			case err != nil && firstErr == nil:
				firstErr = err
			}
		}()
	}
	wg.Wait()
	if len(orphans) > 0 {
		v.log.Warn().Int64("gap", from-1).Ints64("keys", orphans).Msg("objects past the first missing key are not part of the volume (writes not covered by a completed flush); ignored, and reclaimed by dead GC")
	}
	if firstErr != nil {
		v.log.Warn().Err(firstErr).Msg("could not create every placeholder of the claimed window; the claim record protects it")
	}
}
