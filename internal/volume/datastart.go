package volume

import (
	"context"
	"fmt"

	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/mapproxy"
	"github.com/bs3/bs3/internal/objproxy"
)

// An object's data area starts after its metadata area, whose size
// depends on the object: the whole area of the layout for the BUSE layout,
// just the used item slots and the end slot for a compact object
// (docs/ARCHITECTURE.md §3). The map records the start of every compact
// object; readers turn a map offset into an object offset with these.

// ReadsCompactObjects says whether Volume.Read resolves each object's data
// start (fetch must call dataStart rather than assume the layout's whole
// metadata area). Until it does, Options.CompactChunks must stay off
// outside tests that read objects directly.
const ReadsCompactObjects = true

// DataStartIn returns the byte offset at which the data area of object
// key starts. It must run on the map owner goroutine (inside a map proxy
// request), like every map access; m is the map of that request.
func (v *Volume) DataStartIn(m *extentmap.Map, key int64) int64 {
	if s := m.DataStart(key); s > 0 {
		return s
	}
	return v.layout.MetadataSize()
}

// dataStart is DataStartIn for callers off the map goroutine (a fetch at
// priority prio): one map proxy request, skipped when the volume cannot hold compact objects
// (format 1). key must be pinned or otherwise kept from collection, or
// the answer may be the default for a key the map no longer tracks.
func (v *Volume) dataStart(ctx context.Context, prio objproxy.Priority, key int64) (int64, error) {
	if v.sb.Format == FormatBUSELayout {
		return v.layout.MetadataSize(), nil
	}
	mp := mapproxy.High
	if prio == objproxy.Low {
		mp = mapproxy.Low
	}
	var start int64
	err := v.maps.Do(ctx, mp, func(m *extentmap.Map) { start = v.DataStartIn(m, key) })
	if err != nil {
		return 0, fmt.Errorf("data start of key %d: %w", key, err)
	}
	return start, nil
}
