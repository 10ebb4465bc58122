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

// LeaseName is the object an attached daemon renews to say it is alive.
const LeaseName = store.LeaseName

// ErrAttachedElsewhere is returned by Open when another daemon holds the
// volume's lease.
var ErrAttachedElsewhere = errors.New("volume is attached by another bs3")

// lease is the content of the lease object. Counter changes at every
// renewal; a newcomer that sees it change knows the holder is alive,
// without comparing clocks of different machines.
type lease struct {
	VolumeID   string    `json:"volume_id"`
	Generation uint64    `json:"generation"`
	Host       string    `json:"host"`
	PID        int       `json:"pid"`
	Counter    uint64    `json:"counter"`
	Released   bool      `json:"released"`
	Renewed    time.Time `json:"renewed"`
}

// readLease returns the lease; ok is false when there is none or it is
// unreadable (a damaged lease proves nothing either way).
func (v *Volume) readLease(ctx context.Context) (lease, bool, error) {
	raw, err := readWhole(ctx, v.objs, LeaseName)
	if errors.Is(err, store.ErrNotFound) {
		return lease{}, false, nil
	}
	if err != nil {
		return lease{}, false, fmt.Errorf("read lease: %w", err)
	}
	var l lease
	if err := json.Unmarshal(raw, &l); err != nil {
		v.log.Warn().Err(err).Msg("lease object is unreadable")
		return lease{}, false, nil
	}
	return l, true, nil
}

// checkLease refuses to attach while the holder of the newest generation
// (latest) may be alive. The volume is free at once when the lease of
// that generation was released (a clean stop). Otherwise the lease is
// watched for 2.5 intervals: a holder that renews it is alive; a lease
// that neither changes nor disappears belongs to a daemon that died. A
// lease older than latest (or none at all, on a volume that has been
// attached) is watched the same way: the attach that claimed latest may
// still be starting and about to write its lease.
func (v *Volume) checkLease(ctx context.Context, latest uint64) error {
	l, ok, err := v.readLease(ctx)
	if err != nil {
		return err
	}
	if (ok && l.Released && l.Generation >= latest) || (!ok && latest == 0) {
		return nil
	}
	wait := v.o.LeaseInterval * 5 / 2
	v.log.Warn().Str("holder_host", l.Host).Int("holder_pid", l.PID).Uint64("holder_generation", l.Generation).
		Uint64("latest_generation", latest).Dur("wait_ms", wait).
		Msg("volume lease was not released (crash, or attached elsewhere); checking whether its holder is alive")
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(v.o.LeaseInterval / 2):
		}
		l2, ok2, err := v.readLease(ctx)
		if err != nil {
			return err
		}
		if ok2 && l2.Released && l2.Generation >= latest {
			return nil
		}
		if ok2 != ok || l2.Counter != l.Counter || l2.Generation != l.Generation {
			return fmt.Errorf("%w: host %s pid %d (generation %d) renewed its lease %s ago; stop that daemon first (systemctl stop bs3 there), or point this one at another bucket/prefix",
				ErrAttachedElsewhere, l2.Host, l2.PID, l2.Generation, time.Since(l2.Renewed).Round(time.Second))
		}
	}
	v.log.Warn().Msg("lease holder is gone; taking over the volume")
	return nil
}

func (v *Volume) putLease(ctx context.Context, counter uint64, released bool) error {
	host, _ := os.Hostname()
	body, err := json.Marshal(lease{
		VolumeID: v.sb.VolumeID, Generation: v.sb.Generation, Host: host, PID: os.Getpid(),
		Counter: counter, Released: released, Renewed: time.Now().UTC(),
	})
	if err != nil {
		return err
	}
	if err := v.objs.Put(ctx, objproxy.High, LeaseName, body, false); err != nil {
		return fmt.Errorf("write lease: %w", err)
	}
	return nil
}

// leaseLoop renews the lease every LeaseInterval. If the lease shows
// another generation, a newer attach took the volume over: this one stops
// taking writes.
func (v *Volume) leaseLoop() {
	defer close(v.leaseDone)
	t := time.NewTicker(v.o.LeaseInterval)
	defer t.Stop()
	for counter := uint64(1); ; counter++ {
		select {
		case <-v.ckptStop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(v.bgCtx, v.o.LeaseInterval)
		l, ok, err := v.readLease(ctx)
		if err == nil && ok && l.Generation > v.sb.Generation {
			cancel()
			v.fail(fmt.Errorf("%w: host %s pid %d attached generation %d over ours (%d)", ErrFenced, l.Host, l.PID, l.Generation, v.sb.Generation))
			return
		}
		if err == nil {
			err = v.putLease(ctx, counter, false)
		}
		cancel()
		v.stats.leaseRenewed(err)
		if err != nil {
			v.log.Warn().Err(err).Msg("lease renewal failed; will retry")
		}
	}
}
