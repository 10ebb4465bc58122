package volume

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
)

// statCounters are the volume's event counters for Stats, updated where
// the events happen (checkpoint, lease renewal).
type statCounters struct {
	attached        atomic.Int64 // unix ns of the end of the attach
	checkpoints     atomic.Int64 // written by this attach
	checkpointAt    atomic.Int64 // unix ns of the newest one written
	checkpointBytes atomic.Int64 // its size
	leaseRenewals   atomic.Int64
	leaseFailures   atomic.Int64
}

func (s *statCounters) checkpointWritten(bytes int) {
	s.checkpoints.Add(1)
	s.checkpointAt.Store(time.Now().UnixNano())
	s.checkpointBytes.Store(int64(bytes))
}

func (s *statCounters) leaseRenewed(err error) {
	if err != nil {
		s.leaseFailures.Add(1)
		return
	}
	s.leaseRenewals.Add(1)
}

// Stats is a snapshot of the volume for the metrics export.
type Stats struct {
	Generation uint64
	// Watermark is the next key to apply, NextKey the next key to hand
	// out (the difference is the chunks being stored), DeleteFloor the
	// key below which dead objects are deleted (docs/ARCHITECTURE.md §6.3).
	Watermark, NextKey, DeleteFloor int64
	// Failed: the volume stopped taking writes (see Err).
	Failed bool

	// Map is false when the map could not be read (ctx ended while low
	// priority work waited, or the volume is closed); the fields below
	// it are then zero.
	Map bool
	// Objects tracked in the map: live (some block maps to it), dead
	// (data that nothing maps to, waiting for dead GC) and placeholders
	// (empty objects kept for a contiguous roll-forward, docs/ARCHITECTURE.md §7.1).
	LiveObjects, DeadObjects, Placeholders int64
	// StoredBytes is the data the tracked objects were written with
	// (metadata areas not included); LiveBytes the part of it the map
	// still points to, an estimate: discard tombstones count as live
	// blocks of the object that recorded them, up to its data blocks.
	StoredBytes, LiveBytes int64
	// MapBlocks is the blocks with a map entry (data or tombstone),
	// MapBytes the heap the map holds (extentmap.HeapBytes).
	MapBlocks, MapBytes int64

	// Checkpoints is the checkpoints this attach wrote; CheckpointBytes
	// the size of the newest; CheckpointAt when it was written, or the
	// end of the attach when none was (the attach's recovery is then
	// the newest state a restart would not replay again).
	Checkpoints, CheckpointBytes int64
	CheckpointAt                 time.Time
	// PendingObjects is the objects applied since the newest checkpoint:
	// what a crash now would replay beyond it.
	PendingObjects int64
	// LeaseRenewals and LeaseFailures count the lease renewals of this
	// attach that succeeded and that failed (docs/ARCHITECTURE.md §9).
	LeaseRenewals, LeaseFailures int64
}

// Stats returns a snapshot of the volume. The object and map figures are
// read on the map goroutine at low priority (one pass over the tracked
// objects, no scan of the map); when ctx ends first, or the volume is
// closed, Stats returns the rest with Map false and the error.
func (v *Volume) Stats(ctx context.Context) (Stats, error) {
	s := Stats{
		Generation:      v.sb.Generation,
		Watermark:       v.watermark.Load(),
		NextKey:         v.nextKey.Load(),
		DeleteFloor:     v.deleteFloor.Load(),
		Failed:          v.Err() != nil,
		Checkpoints:     v.stats.checkpoints.Load(),
		CheckpointBytes: v.stats.checkpointBytes.Load(),
		PendingObjects:  v.sinceCkpt.Load(),
		LeaseRenewals:   v.stats.leaseRenewals.Load(),
		LeaseFailures:   v.stats.leaseFailures.Load(),
	}
	at := v.stats.checkpointAt.Load()
	if at == 0 {
		at = v.stats.attached.Load()
	}
	if at != 0 {
		s.CheckpointAt = time.Unix(0, at)
	}
	bs := v.o.BlockSize
	err := v.maps.Do(ctx, mapproxy.Low, func(m *extentmap.Map) {
		s.MapBlocks = m.WrittenBlocks()
		s.MapBytes = m.HeapBytes()
		m.Objects(func(_, live, total int64) bool {
			switch {
			case live > 0:
				s.LiveObjects++
			case total > 0:
				s.DeadObjects++
			default:
				s.Placeholders++
			}
			s.StoredBytes += total * bs
			s.LiveBytes += min(live, total) * bs
			return true
		})
	})
	if err != nil {
		return s, fmt.Errorf("volume stats: read the map: %w", err)
	}
	s.Map = true
	return s, nil
}
