// Command bs3 turns S3-compatible object storage into a Linux block device.
// main only wires things together: configuration → object store → object
// proxy → volume → frontend, and turns signals into a clean stop.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" // served only when profiler = true, on localhost
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/frontend/buse"
	"github.com/bs3/bs3/internal/frontend/fuse"
	"github.com/bs3/bs3/internal/frontend/nbd"
	"github.com/bs3/bs3/internal/frontend/ublk"
	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/metrics"
	"github.com/bs3/bs3/internal/null"
)

// leaseInterval is how often the daemon renews the volume lease
// (engine.LeaseInterval).
const leaseInterval = engine.LeaseInterval

func main() {
	os.Exit(run())
}

// run parses the command line (cli.go) and runs the command.
func run() int {
	return runCLI(os.Args[1:])
}

// newLogger builds the daemon's logger. Each component's logger gets its
// "component" field once, where this file wires the component; packages
// add only their own context (bucket, mountpoint), so a JSON line never
// repeats a key. Durations are logged by Dur as milliseconds (a float),
// in fields whose names end in _ms.
func newLogger(cfg config.Config) zerolog.Logger {
	zerolog.DurationFieldUnit = time.Millisecond
	zerolog.DurationFieldInteger = false
	var w = zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly}
	var log zerolog.Logger
	if cfg.Log.Pretty {
		log = zerolog.New(w)
	} else {
		log = zerolog.New(os.Stderr)
	}
	return log.Level(cfg.LogLevel()).With().Timestamp().Logger()
}

// Exit statuses of bs3.
const (
	exitOK      = 0
	exitFailure = 1 // an error, a frontend that ended by itself, a stop cut short
	exitUsage   = 2 // bad flags or configuration
	exitAborted = 3 // a second SIGINT/SIGTERM gave up the stop
)

// stopGrace is how long, after shutdown_timeout, the stop still waits for
// the steps that honour their context (they return at once with what they
// could not do); the whole stop takes at most shutdown_timeout + stopGrace.
const stopGrace = time.Second

// chunkerStep is the name of the chunker's stop step.
const chunkerStep = "chunker"

// errAborted is returned by serve when it gave up without a clean stop: a
// second SIGINT/SIGTERM, or a start-up that ignored the first one.
var errAborted = errors.New("gave up without a clean stop")

// stopStep is one step of the stop sequence; steps run in reverse order of
// their start, each with the context bounded by shutdown_timeout.
type stopStep struct {
	name string
	fn   func(ctx context.Context) error
	// bounded: fn returns soon after ctx ends (with a report of what it
	// could not do); otherwise it is abandoned when ctx ends.
	bounded bool
}

// frontendEnd is a frontend that ended by itself: the device is gone.
type frontendEnd struct {
	name string
	err  error
}

// daemon is what serve started, for the stop sequence.
type daemon struct {
	cfg       config.Config
	log       zerolog.Logger
	stops     []stopStep
	collector *gc.Collector
	chunker   *chunker.Chunker
	ended     chan frontendEnd // a frontend's end, at most one
	metrics   *metrics.Metrics // nil: [metrics] listen is empty
	// nbdServing: the NBD server took over the listener bound by
	// preflight (startup.go), which then no longer closes it.
	nbdServing atomic.Bool
}

// onStop registers a step that ignores its context: the stop abandons it
// at shutdown_timeout.
func (d *daemon) onStop(name string, fn func(ctx context.Context) error) {
	d.stops = append(d.stops, stopStep{name: name, fn: fn})
}

// onBoundedStop registers a step that returns soon after its context ends.
func (d *daemon) onBoundedStop(name string, fn func(ctx context.Context) error) {
	d.stops = append(d.stops, stopStep{name: name, fn: fn, bounded: true})
}

// serve attaches the volume, runs the frontend until SIGINT/SIGTERM or
// until the frontend ends by itself, and then stops everything in reverse
// order within shutdown_timeout. It returns nil after a clean stop on a
// signal, errAborted (wrapped) when a second signal cut the stop short,
// and another error otherwise.
func serve(cfg config.Config, shrink bool, log zerolog.Logger) error {
	log.Info().Object("config", cfg).Msg("starting bs3")
	if cfg.Profiler {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(cfg.ProfilerPort))
		go func() {
			log.Info().Str("addr", addr).Msg("pprof profiler listening")
			if err := http.ListenAndServe(addr, nil); err != nil {
				log.Warn().Err(err).Msg("profiler stopped")
			}
		}()
	}

	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(signals)

	// ctx is the start-up's context; cancelled by a stop signal during
	// start-up, and otherwise kept until serve returns, as parts built
	// from it may hold on to it.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := &daemon{cfg: cfg, log: log, ended: make(chan frontendEnd, 1)}
	m, stopMetrics, err := startMetrics(cfg, log)
	if err != nil {
		return err
	}
	defer stopMetrics()
	d.metrics = m
	stopSig, err := d.startOrSignal(ctx, cancel, shrink, signals)
	if errors.Is(err, errAborted) {
		return err
	}
	var reason error // why bs3 stops; nil for a signal
	switch {
	case stopSig != nil:
		if err != nil {
			log.Info().Err(err).Msg("start-up interrupted")
		}
	case err != nil:
		reason = err
	default:
		stopWatchdog := notifyReady(log) // systemd: the device is usable
		reason = d.wait(signals)
		stopWatchdog()
	}
	notifyStopping(log)
	if err := d.stop(signals); err != nil {
		if reason != nil {
			return fmt.Errorf("%w; then the stop failed: %w", reason, err)
		}
		return err
	}
	return reason
}

// startOrSignal runs start with ctx, and calls cancel at the first
// SIGINT/SIGTERM (an object store that does not answer must not make
// start-up deaf to signals). It returns that signal, if any, and start's
// error. If start does not return within shutdown_timeout of the signal,
// or a second signal comes, it returns errAborted without waiting for it.
func (d *daemon) startOrSignal(ctx context.Context, cancel context.CancelFunc, shrink bool, signals <-chan os.Signal) (os.Signal, error) {
	started := make(chan error, 1)
	go func() { started <- d.start(ctx, shrink) }()
	var stopSig os.Signal
	var deadline <-chan time.Time
	for {
		select {
		case err := <-started:
			return stopSig, err
		case <-deadline:
			d.log.Error().Dur("shutdown_timeout_ms", d.cfg.ShutdownTimeoutDuration()).Msg("start-up did not stop within shutdown_timeout of the signal; exiting without a clean stop")
			return stopSig, fmt.Errorf("start-up did not stop within %v: %w", d.cfg.ShutdownTimeoutDuration(), errAborted)
		case sig := <-signals:
			switch {
			case sig == syscall.SIGUSR1 || sig == syscall.SIGUSR2:
				d.log.Warn().Str("signal", sig.String()).Msg("GC signal during start-up: ignored")
			case stopSig != nil:
				d.log.Error().Str("signal", sig.String()).Msg("second signal during start-up: exiting at once, without a clean stop")
				return stopSig, errAborted
			default:
				d.log.Info().Str("signal", sig.String()).Msg("stopping: start-up interrupted")
				stopSig = sig
				cancel()
				deadline = time.After(d.cfg.ShutdownTimeoutDuration())
			}
		}
	}
}

// start builds everything, registering each part's stop step as soon as
// the part exists, so that the stop sequence undoes a partial start too.
func (d *daemon) start(ctx context.Context, shrink bool) error {
	cfg, log := d.cfg, d.log
	// The frontend's resources first: a start that cannot serve the
	// device must fail before the attach bumps the generation and claims
	// keys (docs/ARCHITECTURE.md §15).
	prep, err := d.preflight()
	if err != nil {
		return err
	}
	var dev frontend.Device
	var rw buse.Callbacks
	if cfg.Null {
		n := null.New(cfg.SizeBytes(), int64(cfg.BlockSize))
		dev, rw = n, buse.NewAdapter(n)
		log.Warn().Msg("null backend: writes are discarded, reads return zeros")
	} else {
		o := engine.FromConfig(cfg, shrink, log)
		o.Proxy.Observer = d.metrics.StoreObserver()
		e, err := engine.Open(ctx, o)
		if err != nil {
			return err
		}
		// Each part's stop step, in the order of their start; the stop
		// runs them in reverse, as engine.Close does.
		d.onStop("object proxy", func(context.Context) error { e.Proxy.Close(); return nil })
		if rc := e.Cache; rc != nil {
			d.onStop("read cache", func(context.Context) error { rc.Close(); return nil })
		}
		d.onBoundedStop("volume", e.Volume.Close)
		rw = buse.NewAdapter(e.Volume)
		d.collector = gc.New(e.Volume, gc.Options{
			Step:     cfg.GC.Step,
			LiveData: cfg.GC.LiveData,
			Wait:     cfg.GCWait(),
			Logger:   log.With().Str("component", "gc").Logger(),
		})
		d.collector.Start()
		d.onStop("garbage collector", func(context.Context) error { d.collector.Stop(); return nil })
		if e.Chunker != nil {
			d.chunker = e.Chunker
			d.onBoundedStop(chunkerStep, e.Chunker.Shutdown)
			dev = e.Chunker
		}
		if err := d.metrics.AddEngine(metrics.Engine{Proxy: e.Proxy, Volume: e.Volume, Chunker: d.chunker, Cache: e.Cache, GC: d.collector}); err != nil {
			return err
		}
	}
	dev, rw = d.metrics.Device(dev), d.metrics.Buse(rw, chunk.Layout{ChunkSize: cfg.ChunkBytes(), BlockSize: int64(cfg.BlockSize)})

	switch cfg.Frontend {
	case config.FrontendBUSE:
		b, err := buse.Start(rw, buse.Options{
			Durable:        cfg.Write.Durable,
			WriteChunkSize: cfg.ChunkBytes(),
			BlockSize:      int64(cfg.BlockSize),
			IOMin:          int64(cfg.IOMinBytes()),
			IOOpt:          int64(cfg.IOOptBytes()),
			Threads:        cfg.Threads,
			Major:          int64(cfg.Major),
			WriteShmSize:   cfg.WriteBufferBytes(),
			ReadShmSize:    cfg.ReadBufferBytes(),
			Size:           cfg.SizeBytes(),
			CollisionArea:  cfg.CollisionBytes(),
			QueueDepth:     int64(cfg.QueueDepth),
			Scheduler:      cfg.Scheduler,
		}, log.With().Str("component", "buse").Logger())
		if err != nil {
			return err
		}
		d.onStop("BUSE device", func(context.Context) error { return b.Stop() })
		d.watchEnd(config.FrontendBUSE, b.Done())
	case config.FrontendNBD:
		srv, err := nbd.New(dev, nbd.Options{
			Listen: cfg.NBD.Listen, Listener: prep.nbdListener, Export: cfg.NBD.Export,
			HandshakeTimeout: cfg.NBD.HandshakeTimeoutDuration(),
			MaxConnections:   cfg.NBD.MaxConnections,
			MaxBuffered:      cfg.NBD.MaxBufferedBytes(),
			TLS:              prep.nbdTLS,
			TLSRequired:      cfg.NBD.TLS == config.NBDTLSRequire,
			SocketGroup:      cfg.NBD.SocketGroup,
			Logger:           log.With().Str("component", "nbd").Logger(),
		})
		if err != nil {
			return fmt.Errorf("start NBD server: %w", err)
		}
		served := make(chan error, 1)
		go func() {
			err := srv.Serve()
			if err == nil {
				// Serve returns nil only after Close; if that ever
				// changes, an end before the stop is still an end.
				err = errors.New("NBD server stopped accepting connections")
			}
			served <- err
		}()
		d.nbdServing.Store(true) // the server owns the listener now
		d.onStop("NBD server", func(context.Context) error { return srv.Close() })
		d.watchEnd(config.FrontendNBD, served)
		fmt.Fprintf(os.Stderr, "\nbs3: NBD export %q on %s\n  try: nbdinfo nbd://%s/%s   or   nbd-client %s /dev/nbd0 -N %s -b %d\n\n",
			cfg.NBD.Export, srv.Addr(), srv.Addr(), cfg.NBD.Export, srv.Addr(), cfg.NBD.Export, cfg.BlockSize)
	case config.FrontendUBLK:
		u, err := ublk.Start(dev, ublk.Options{
			ID:         cfg.Major,
			Queues:     cfg.Threads,
			QueueDepth: cfg.QueueDepth,
			BlockSize:  int64(cfg.BlockSize),
			IOMin:      int64(cfg.IOMinBytes()),
			IOOpt:      int64(cfg.IOOptBytes()),
			Logger:     log.With().Str("component", "ublk").Logger(),
		})
		if err != nil {
			return fmt.Errorf("start ublk frontend: %w", err)
		}
		d.onStop("ublk device", func(context.Context) error { return u.Stop() })
		d.watchEnd(config.FrontendUBLK, u.Done())
		fmt.Fprintf(os.Stderr, "\nbs3: block device %s\n  try: mkfs.ext4 %s && mkdir -p /mnt/bs3 && mount %s /mnt/bs3\n  stop with Ctrl-C (unmount the filesystem first)\n\n",
			u.Path(), u.Path(), u.Path())
	case config.FrontendFUSE:
		m, err := fuse.Mount(dev, fuse.Options{Mountpoint: cfg.FUSE.Mountpoint, Loop: cfg.FUSE.Loop, Logger: log.With().Str("component", "fuse").Logger()})
		if err != nil {
			return fmt.Errorf("start FUSE frontend: %w", err)
		}
		d.onStop("FUSE mount", func(context.Context) error { return m.Close() })
		d.watchEnd(config.FrontendFUSE, m.Done())
		if m.LoopDevice() != "" {
			fmt.Fprintf(os.Stderr, "\nbs3: block device %s (backed by %s)\n  try: mkfs.ext4 %s && mkdir -p /mnt/bs3 && mount %s /mnt/bs3\n  stop with Ctrl-C (unmount the filesystem first)\n\n",
				m.LoopDevice(), m.FilePath(), m.LoopDevice(), m.LoopDevice())
		} else {
			fmt.Fprintf(os.Stderr, "\nbs3: device file %s\n\n", m.FilePath())
		}
	}
	return nil
}

// watchEnd forwards the end of the frontend name, reported on ended, to
// d.ended. Ends during the stop sequence are the stop's own and nobody
// reads them.
func (d *daemon) watchEnd(name string, ended <-chan error) {
	go func() {
		err, ok := <-ended
		if !ok || err == nil {
			err = fmt.Errorf("%s frontend ended", name)
		}
		select {
		case d.ended <- frontendEnd{name: name, err: err}:
		default:
		}
	}()
}

// wait serves SIGUSR1 (threshold GC) and SIGUSR2 (defragmentation of
// gc.defrag_range) until SIGINT/SIGTERM (nil) or until the frontend ends
// by itself (an error naming it).
func (d *daemon) wait(signals <-chan os.Signal) error {
	for {
		select {
		case sig := <-signals:
			if sig == syscall.SIGUSR1 {
				if d.collector == nil {
					d.log.Warn().Msg("SIGUSR1: no garbage collection with the null backend")
					continue
				}
				if d.collector.Trigger() {
					d.log.Info().Msg("SIGUSR1: threshold GC started")
				}
				continue
			}
			if sig == syscall.SIGUSR2 {
				if d.collector == nil {
					d.log.Warn().Msg("SIGUSR2: no defragmentation with the null backend")
					continue
				}
				// Validate checked the range.
				off, n, _ := d.cfg.GCDefragRange()
				if d.collector.TriggerDefrag(gc.Range{Offset: off, Length: n}) {
					d.log.Info().Int64("offset", off).Int64("length", n).Msg("SIGUSR2: defragmentation started")
				}
				continue
			}
			d.log.Info().Str("signal", sig.String()).Dur("shutdown_timeout_ms", d.cfg.ShutdownTimeoutDuration()).Msg("stopping")
			return nil
		case e := <-d.ended:
			d.log.Error().Str("frontend", e.name).Err(e.err).Dur("shutdown_timeout_ms", d.cfg.ShutdownTimeoutDuration()).
				Msg("frontend ended by itself, the device is gone: stopping bs3 (it will exit with status 1)")
			return fmt.Errorf("%s frontend ended: %w", e.name, e.err)
		}
	}
}

// stop runs the stop steps within shutdown_timeout (+ stopGrace for the
// steps that report after it). A second SIGINT/SIGTERM gives up at once
// with errAborted, after logging what the chunker still holds.
func (d *daemon) stop(signals <-chan os.Signal) error {
	timeout := d.cfg.ShutdownTimeoutDuration()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	hard, cancelHard := context.WithTimeout(context.Background(), timeout+stopGrace)
	defer cancelHard()
	done := make(chan error, 1)
	go func() { done <- d.runStops(ctx, hard) }()
	for {
		select {
		case err := <-done:
			return err
		case sig := <-signals:
			if sig == syscall.SIGUSR1 || sig == syscall.SIGUSR2 {
				d.log.Warn().Str("signal", sig.String()).Msg("GC signal while stopping: ignored")
				continue
			}
			d.log.Error().Str("signal", sig.String()).Msg("second signal: giving up the stop at once")
			d.logUnstoredNow()
			return errAborted
		}
	}
}

// runStops runs the steps in reverse order. A step that fails is logged
// and the next one runs anyway. A step that ignores ctx is abandoned when
// ctx ends (a frontend stuck behind writes that wait for the store must
// not eat the time the chunker needs to report); a bounded one when hard
// ends. When the time runs out it logs which steps did not finish and,
// from the chunker, exactly which writes were not stored.
func (d *daemon) runStops(ctx, hard context.Context) error {
	start := time.Now()
	var errs []error
	var cut []string
	// What is known of the writes the frontend handed over: "stored",
	// "reported" (the chunker logged what was not stored) or "unknown".
	writes := "unknown"
	for i := len(d.stops) - 1; i >= 0; i-- {
		s := d.stops[i]
		res := make(chan error, 1)
		go func() { res <- s.fn(ctx) }()
		limit := ctx.Done()
		if s.bounded {
			limit = hard.Done()
		}
		var err error
		select {
		case err = <-res:
		case <-limit:
			err = fmt.Errorf("abandoned at the shutdown timeout: %w", ctx.Err())
		}
		var ns *chunker.NotStoredError
		switch {
		case errors.As(err, &ns):
			writes = "reported"
			d.logUnstored(ns.Unstored)
		case s.name == chunkerStep && err == nil:
			writes = "stored"
		}
		if err == nil {
			d.log.Debug().Str("step", s.name).Msg("stopped")
			continue
		}
		if ctx.Err() != nil {
			cut = append(cut, s.name)
		}
		d.log.Error().Str("step", s.name).Err(err).Msg("stop step failed")
		errs = append(errs, fmt.Errorf("stop %s: %w", s.name, err))
	}
	if len(cut) > 0 {
		ev := d.log.Error().Strs("not_finished", cut).Dur("shutdown_timeout_ms", d.cfg.ShutdownTimeoutDuration()).Dur("took_ms", time.Since(start))
		switch writes {
		case "stored":
			ev.Msg("shutdown cut short by shutdown_timeout; every write the frontend handed over was stored, but the final checkpoint and lease release may be missing (the next start replays the objects since the last checkpoint and waits for the lease to expire)")
		case "reported":
			ev.Msg("shutdown cut short by shutdown_timeout")
		default:
			ev.Msg("shutdown cut short by shutdown_timeout; which writes were not stored is unknown (BUSE keeps them in the kernel module, or the chunker did not answer)")
		}
	} else if len(errs) == 0 {
		d.log.Info().Dur("took_ms", time.Since(start)).Msg("stopped cleanly")
	}
	return errors.Join(errs...)
}

// logUnstored logs what the chunker could not store and what that means.
func (d *daemon) logUnstored(u chunker.Unstored) {
	d.log.Error().Object("not_stored", u).Msg("writes not stored: " + u.Summary())
}

// logUnstoredNow logs what the chunker holds right now, waiting at most a
// moment for it (the process exits next).
func (d *daemon) logUnstoredNow() {
	if d.chunker == nil {
		return
	}
	got := make(chan chunker.Unstored, 1)
	go func() { got <- d.chunker.Unstored() }()
	select {
	case u := <-got:
		if u.Chunks > 0 {
			d.logUnstored(u)
		} else {
			d.log.Info().Msg("every write the frontend handed over was stored")
		}
	case <-time.After(200 * time.Millisecond):
		d.log.Error().Msg("could not tell which writes were not stored: the chunker is busy")
	}
}
