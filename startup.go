package main

// Start-up order and systemd readiness (docs/ARCHITECTURE.md §15).

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"
	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/frontend/buse"
	"github.com/bs3/bs3/internal/frontend/fuse"
	"github.com/bs3/bs3/internal/frontend/nbd"
	"github.com/bs3/bs3/internal/frontend/ublk"
)

// prepared is what preflight took for the frontend.
type prepared struct {
	nbdListener net.Listener // bound NBD address, handed to nbd.New
	nbdTLS      *tls.Config  // loaded certificates (nil: TLS off)
}

// preflight checks, or takes, what the frontend needs before the volume
// is attached: the NBD address is bound (the listener is handed to the
// server later) and its TLS certificates loaded, the FUSE mountpoint and
// loop devices are checked, the ublk driver and the BUSE module must be
// loaded. An attach bumps the generation and claims keys, so a frontend
// that cannot start must fail first.
func (d *daemon) preflight() (prepared, error) {
	cfg := d.cfg
	var p prepared
	switch cfg.Frontend {
	case config.FrontendNBD:
		if cfg.NBD.TLS != config.NBDTLSOff {
			var err error
			if p.nbdTLS, err = nbd.LoadTLS(cfg.NBD.TLSCert, cfg.NBD.TLSKey, cfg.NBD.TLSCA); err != nil {
				return p, fmt.Errorf("start NBD server: %w; nothing was attached", err)
			}
		}
		ln, err := nbd.Listen(cfg.NBD.Listen, cfg.NBD.SocketGroup)
		if err != nil {
			return p, fmt.Errorf("start NBD server: %w; is another bs3 or NBD server using that address? (set nbd.listen); nothing was attached", err)
		}
		d.onStop("NBD listener", func(context.Context) error {
			if d.nbdServing.Load() {
				return nil // closed with the server
			}
			return ln.Close()
		})
		p.nbdListener = ln
	case config.FrontendFUSE:
		if err := fuse.Preflight(fuse.Options{Mountpoint: cfg.FUSE.Mountpoint, Loop: cfg.FUSE.Loop}); err != nil {
			return p, fmt.Errorf("start FUSE frontend: %w; nothing was attached", err)
		}
	case config.FrontendUBLK:
		// Without the driver there is nothing to serve, and the lease
		// need not be taken.
		if err := ublk.Available(ublk.DefaultControlPath); err != nil {
			return p, fmt.Errorf("start ublk frontend: %w; nothing was attached", err)
		}
	case config.FrontendBUSE:
		if err := buse.Preflight(int64(cfg.Major)); err != nil {
			return p, err
		}
	}
	return p, nil
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
