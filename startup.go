package main

// Start-up order and systemd readiness (docs/ARCHITECTURE.md §13).

import (
	"context"
	"fmt"
	"net"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"
	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/frontend/buse"
	"github.com/bs3/bs3/internal/frontend/fuse"
	"github.com/bs3/bs3/internal/frontend/nbd"
)

// preflight checks, or takes, what the frontend needs before the volume
// is attached: the NBD address is bound (the listener is returned and
// handed to the server later), the FUSE mountpoint and loop devices are
// checked, the BUSE module must be loaded. An attach bumps the generation
// and claims keys, so a frontend that cannot start must fail first.
func (d *daemon) preflight() (net.Listener, error) {
	cfg := d.cfg
	switch cfg.Frontend {
	case config.FrontendNBD:
		ln, err := nbd.Listen(cfg.NBD.Listen)
		if err != nil {
			return nil, fmt.Errorf("start NBD server: %w; is another bs3 or NBD server using that address? (set nbd.listen); nothing was attached", err)
		}
		d.onStop("NBD listener", func(context.Context) error {
			if d.nbdServing.Load() {
				return nil // closed with the server
			}
			return ln.Close()
		})
		return ln, nil
	case config.FrontendFUSE:
		if err := fuse.Preflight(fuse.Options{Mountpoint: cfg.FUSE.Mountpoint, Loop: cfg.FUSE.Loop}); err != nil {
			return nil, fmt.Errorf("start FUSE frontend: %w; nothing was attached", err)
		}
	case config.FrontendBUSE:
		if err := buse.Preflight(); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// notifyReady tells systemd (Type=notify) that the device is usable, and
// pings its watchdog every half WATCHDOG_USEC when the unit sets one. It
// returns the function that stops the pings. Without NOTIFY_SOCKET (not
// under systemd) it does nothing.
//
// The pings say the process is alive and its main loop started; they do
// not stop when the volume fails, since a restart then would drop the
// acknowledged writes the chunker still serves from memory.
func notifyReady(log zerolog.Logger) (stop func()) {
	if _, err := sd.SdNotify(false, sd.SdNotifyReady); err != nil {
		log.Warn().Err(err).Msg("could not tell systemd the device is ready")
	}
	interval, err := sd.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn().Err(err).Msg("systemd watchdog settings unreadable; not pinging it")
	}
	if err != nil || interval <= 0 {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(interval / 2)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if _, err := sd.SdNotify(false, sd.SdNotifyWatchdog); err != nil {
					log.Warn().Err(err).Msg("systemd watchdog ping failed")
				}
			}
		}
	}()
	return func() { close(done) }
}

// notifyStopping tells systemd that a stop began (it then waits up to
// TimeoutStopSec, which the unit sets above shutdown_timeout).
func notifyStopping(log zerolog.Logger) {
	if _, err := sd.SdNotify(false, sd.SdNotifyStopping); err != nil {
		log.Warn().Err(err).Msg("could not tell systemd the stop began")
	}
}
