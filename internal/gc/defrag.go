package gc

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
)

// Range is a byte range of the device to defragment: Length bytes from
// Offset; Length 0 (or past the end) runs to the end of the device. It is
// widened to whole blocks.
type Range struct {
	Offset, Length int64
}

// blocks returns the device blocks [from, to) that r covers on a device of
// size bytes in blocks of bs bytes.
func (r Range) blocks(size, bs int64) (from, to int64, err error) {
	if r.Offset < 0 || r.Length < 0 {
		return 0, 0, fmt.Errorf("defragment range %d+%d: offset and length must not be negative", r.Offset, r.Length)
	}
	if r.Offset >= size {
		return 0, 0, fmt.Errorf("defragment range %d+%d: starts at or past the end of the %d-byte device", r.Offset, r.Length, size)
	}
	end := size
	if r.Length > 0 && r.Length < size-r.Offset {
		end = r.Offset + r.Length
	}
	return r.Offset / bs, (end + bs - 1) / bs, nil
}

// Defrag copies the live data of the range, whatever the live fraction
// of the objects holding it, into new chunks in device block order, so
// that a sequential read of the range maps to long runs in few objects;
// then it runs a dead pass (objects left without live data go). Discard
// tombstones of the range that those objects recorded are copied along.
// The newest object and objects applied after the run started are left
// alone, as in threshold GC. It shares threshold GC's exclusivity: it
// returns ErrBusy at once if a threshold or defragmentation run is going.
func (c *Collector) Defrag(ctx context.Context, r Range) (Stats, error) {
	return c.exclusive(ctx, func(ctx context.Context) (Stats, error) { return c.defrag(ctx, r) })
}

// TriggerDefrag starts Defrag of r in the background (the SIGUSR2
// handler) and returns true, or logs and returns false when a threshold
// or defragmentation run is going or the collector is stopped. The run
// logs its outcome.
func (c *Collector) TriggerDefrag(r Range) bool {
	return c.trigger("defragmentation", func(ctx context.Context) { _, _ = c.defrag(ctx, r) })
}

// defrag is one run; the caller holds busy.
func (c *Collector) defrag(ctx context.Context, r Range) (Stats, error) {
	start := time.Now()
	var st Stats
	from, to, err := r.blocks(c.v.Size(), c.v.BlockSize())
	log := c.log.With().Int64("offset", r.Offset).Int64("length", r.Length).Logger()
	if err == nil {
		log = log.With().Int64("from_block", from).Int64("to_block", to).Logger()
		log.Info().Msg("defragmentation started")
		err = c.v.Err()
	}
	if err == nil {
		st, err = c.defragBlocks(ctx, from, to)
	}
	if err == nil {
		var ds Stats
		ds, err = c.CollectDead(ctx)
		st.add(ds)
	}
	st.Duration = time.Since(start)
	c.totals.record(KindDefrag, st, err)
	logRun(log, st, err, "defragmentation run")
	if err != nil {
		return st, fmt.Errorf("defragment: %w", err)
	}
	return st, nil
}

// defragBlocks copies the live extents of blocks [from, to) held by
// objects older than the newest into new chunks in block order.
func (c *Collector) defragBlocks(ctx context.Context, from, to int64) (Stats, error) {
	var st Stats
	v := c.v
	// 1. The objects with data in the range, applied and not the newest
	// when the run starts. Later objects hold writes newer than the run:
	// they are already in the order they were written and are left alone.
	var wm int64
	if err := v.MapDo(ctx, mapproxy.Low, func(*extentmap.Map) { wm = v.Watermark() }); err != nil {
		return st, fmt.Errorf("read watermark: %w", err)
	}
	var victims []int64
	rep := c.progress("find objects to defragment", "blocks", "", to-from)
	err := c.scanWindows(ctx, from, to, func(e extentmap.Extent, _ uint64) {
		if !e.Zero && e.Key < wm-1 {
			victims = append(victims, e.Key)
		}
	}, func(end int64) error {
		// Keep the list small between windows.
		slices.Sort(victims)
		victims = slices.Compact(victims)
		rep.Set(end-from, 0)
		return nil
	})
	rep.Finish()
	if err != nil {
		return st, fmt.Errorf("list objects: %w", err)
	}
	st.Examined = int64(len(victims))
	st.Compacted = st.Examined
	if len(victims) == 0 {
		return st, nil
	}
	// 2. Copy the range's live extents of those objects.
	st.BytesRead, st.BytesWritten, err = c.copyLive(ctx, victims, from, to)
	return st, err
}

// logRun logs the outcome of a threshold or defragmentation run.
func logRun(log zerolog.Logger, st Stats, err error, msg string) {
	ev := log.Info()
	if err != nil {
		ev = log.Error().Err(err)
	}
	ev.Int64("examined", st.Examined).Int64("compacted", st.Compacted).
		Int64("bytes_read", st.BytesRead).Int64("bytes_written", st.BytesWritten).
		Int64("reclaimed", st.Reclaimed).Int64("placeholders", st.Placeholders).
		Int64("bytes_freed", st.BytesFreed).Dur("duration_ms", st.Duration).Msg(msg)
}
