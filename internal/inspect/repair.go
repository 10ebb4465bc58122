package inspect

import (
	"context"
	"fmt"
	"time"

	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
)

// Repair policy. A repair is done only when it is provably safe, i.e. it
// cannot change what any attach reads now or later:
//
//   - removing probe objects (conditional-write and payload-checksum
//     probes of the S3 store) older than ProbeMaxAge.
//     They are not part of the volume (no attach or recovery reads them),
//     and a probe finishes within seconds, so one that old belongs to a
//     start that crashed mid-probe, never to one still probing.
//
// Nothing else is repaired: a missing key, a truncated object or a
// damaged checkpoint can only be put right from a copy of the lost
// object (an older object version, a backup), which check names; creating
// a placeholder over a hole would silently drop every write after it,
// and deleting a damaged checkpoint would move the delete floor.

// ProbeMaxAge is how old a probe object must be before Repair removes it.
const ProbeMaxAge = time.Hour

// Repair performs the provably safe repairs for r and returns what it
// did. The caller must have made sure no daemon holds the lease.
func Repair(ctx context.Context, objs *objproxy.Proxy, r *Report, now time.Time) ([]string, error) {
	var done []string
	for _, name := range r.Probes {
		_, t, ok := store.ParseProbeName(name)
		if !ok || now.Sub(t) < ProbeMaxAge {
			continue
		}
		if err := objs.Delete(ctx, objproxy.Low, name); err != nil {
			return done, fmt.Errorf("delete probe object %s: %w", name, err)
		}
		done = append(done, fmt.Sprintf("removed %s, a probe object left by a start on %s", name, t.UTC().Format(time.RFC3339)))
	}
	return done, nil
}

// LeaseLive reports whether a daemon may hold the volume: the lease is
// not released and its counter changes within 2.5 lease intervals (the
// attach rule of docs/ARCHITECTURE.md §9, so no clocks are compared). A
// lease that is absent or released is free at once.
func LeaseLive(ctx context.Context, objs *objproxy.Proxy, interval time.Duration) (bool, LeaseInfo, error) {
	l, err := readLease(ctx, objs)
	if err != nil || !l.Present || (l.Readable && l.Released) {
		return false, l, err
	}
	deadline := time.Now().Add(interval * 5 / 2)
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return false, l, ctx.Err()
		case <-time.After(interval / 2):
		}
		l2, err := readLease(ctx, objs)
		if err != nil {
			return false, l, err
		}
		if l2.Readable && l2.Released {
			return false, l2, nil
		}
		if l2.Present != l.Present || l2.Counter != l.Counter || l2.Generation != l.Generation {
			return true, l2, nil
		}
	}
	return false, l, nil
}
