package volume

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// Attaching is exclusive before anything is recovered or written
// (docs/ARCHITECTURE.md §6): every attach claims a generation of its own
// by creating the attach record of that generation with ifAbsent. Of two
// daemons that start together, one loses that create and is refused; a
// daemon that starts later sees the newer record and waits for the lease
// of its holder to go stale before it may claim the next generation.

// attachRecord is the content of an attach record: who claimed the
// generation, for people and `bs3 status`.
type attachRecord struct {
	Generation uint64    `json:"generation"`
	VolumeID   string    `json:"volume_id"`
	Host       string    `json:"host"`
	PID        int       `json:"pid"`
	Started    time.Time `json:"started"`
}

// attachKeep is how many attach records stay in the bucket. Only the
// newest matters (the next generation is above it); a few more help
// whoever investigates a history of restarts.
const attachKeep = 4

// latestGeneration returns the highest generation ever claimed: the
// newest attach record, or the superblock's generation when that is
// higher (volumes written before attach records existed). names are the
// attach records in generation order.
func latestGeneration(ctx context.Context, objs *objproxy.Proxy, sb Superblock) (uint64, []string, error) {
	var names []string
	latest := sb.Generation
	err := objs.List(ctx, objproxy.High, store.AttachPrefix, func(name string, _ int64) error {
		g, ok := store.ParseAttachName(name)
		if !ok {
			return nil // not ours; never touched
		}
		names = append(names, name)
		latest = max(latest, g)
		return nil
	})
	if err != nil {
		return 0, nil, fmt.Errorf("list attach records: %w", err)
	}
	return latest, names, nil
}

// claimGeneration creates the attach record of g. With conditional writes
// only one daemon can create it; without them the lease is the only
// guard (the documented limit of conditional_writes = false).
func (v *Volume) claimGeneration(ctx context.Context, g uint64) error {
	host, _ := os.Hostname()
	body, err := json.Marshal(attachRecord{
		Generation: g, VolumeID: v.sb.VolumeID, Host: host, PID: os.Getpid(), Started: time.Now().UTC(),
	})
	if err != nil {
		return fmt.Errorf("encode attach record: %w", err)
	}
	if err := v.objs.Put(ctx, objproxy.High, store.AttachName(g), body, v.o.ConditionalWrites); err != nil {
		if errors.Is(err, store.ErrExists) {
			return fmt.Errorf("%w: another bs3 claimed generation %d of this volume at the same moment; stop it first (systemctl stop bs3 there), or point this one at another bucket/prefix", ErrAttachedElsewhere, g)
		}
		return fmt.Errorf("claim generation %d: %w", g, err)
	}
	return nil
}

// pruneAttachRecords deletes all but the newest attachKeep records (ours
// is the newest). A failure only leaves a few small objects behind.
func (v *Volume) pruneAttachRecords(ctx context.Context, names []string) {
	// names was listed before our own record was created.
	for len(names) > attachKeep-1 {
		if err := v.objs.Delete(ctx, objproxy.Low, names[0]); err != nil {
			v.log.Warn().Err(err).Str("record", names[0]).Msg("could not delete an old attach record; will retry at the next attach")
			return
		}
		names = names[1:]
	}
}
