package main

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/metrics"
)

// metricsStopTimeout bounds how long the stop waits for scrapes in
// progress.
const metricsStopTimeout = 2 * time.Second

// startMetrics serves /metrics on [metrics] listen. With the key empty
// (the default) it returns a nil *metrics.Metrics, which every hook
// treats as "off", and a stop that does nothing. The address is bound
// here, before the volume is attached, so a taken address fails the
// start without touching the bucket.
func startMetrics(cfg config.Config, log zerolog.Logger) (*metrics.Metrics, func(), error) {
	addr := cfg.Metrics.Listen
	if addr == "" {
		return nil, func() {}, nil
	}
	log = log.With().Str("component", "metrics").Logger()
	m := metrics.New(log)
	srv, err := metrics.Listen(addr, m)
	if err != nil {
		hint := "check the address"
		if errors.Is(err, syscall.EADDRINUSE) {
			hint = "address in use: another process (or another bs3) serves there; choose another port"
		}
		return nil, nil, fmt.Errorf("[metrics] listen = %q: %w (%s, or set it empty to turn metrics off)", addr, err, hint)
	}
	log.Info().Str("addr", srv.Addr()).Str("path", metrics.Path).Msg("serving Prometheus metrics")
	return m, func() {
		ctx, cancel := context.WithTimeout(context.Background(), metricsStopTimeout)
		defer cancel()
		if err := srv.Close(ctx); err != nil {
			log.Warn().Err(err).Msg("metrics server did not stop cleanly")
		}
	}, nil
}
