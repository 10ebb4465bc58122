// Command bs3 turns S3-compatible object storage into a Linux block device.
// main only wires things together: configuration → object store → object
// proxy → volume → frontend, and turns signals into a clean stop.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" // served only when profiler = true, on localhost
	"os"
	"os/signal"
	"path"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/frontend/buse"
	"github.com/bs3/bs3/internal/frontend/fuse"
	"github.com/bs3/bs3/internal/frontend/nbd"
	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/null"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/dir"
	s3store "github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/volume"
)

const defaultConfigPath = "/etc/bs3/config.toml"

// leaseInterval is how often the daemon renews the volume lease; a second
// daemon on the same volume waits 2.5 intervals before it may attach over
// a lease that was not released.
const leaseInterval = 5 * time.Second

func main() {
	os.Exit(run())
}

func run() int {
	fs := flag.NewFlagSet("bs3", flag.ContinueOnError)
	cfgPath := fs.String("c", defaultConfigPath, "configuration file (TOML)")
	shrink := fs.Bool("shrink", false, "allow attaching with a size smaller than the volume's (drops the data past the new end)")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: bs3 [-c FILE] [--shrink]\n\nflags:\n")
		fs.PrintDefaults()
		fmt.Fprintln(os.Stderr)
		config.Usage(os.Stderr)
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3: %v\n", err)
		return 2
	}
	log := newLogger(cfg)
	if err := serve(cfg, *shrink, log); err != nil {
		log.Error().Err(err).Msg("bs3 stopped with an error")
		return 1
	}
	return 0
}

func newLogger(cfg config.Config) zerolog.Logger {
	var w = zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly}
	var log zerolog.Logger
	if cfg.Log.Pretty {
		log = zerolog.New(w)
	} else {
		log = zerolog.New(os.Stderr)
	}
	return log.Level(cfg.LogLevel()).With().Timestamp().Logger()
}

// serve attaches the volume, runs the frontend until SIGINT/SIGTERM, and
// stops everything in reverse order.
func serve(cfg config.Config, shrink bool, log zerolog.Logger) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
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
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGUSR1)
	defer signal.Stop(signals)

	var stops []func() error // run in reverse order at the end
	defer func() {
		for i := len(stops) - 1; i >= 0; i-- {
			if err := stops[i](); err != nil {
				log.Error().Err(err).Msg("stop")
			}
		}
	}()

	var dev frontend.Device
	var collector *gc.Collector
	var rw interface {
		BuseRead(int64, int64, []byte) error
		BuseWrite(int64, []byte) error
		BusePreRun()
		BusePostRemove()
	}
	if cfg.Null {
		n := null.New(cfg.SizeBytes(), int64(cfg.BlockSize))
		dev, rw = n, n
		log.Warn().Msg("null backend: writes are discarded, reads return zeros")
	} else {
		st, err := openStore(ctx, cfg, log)
		if err != nil {
			return err
		}
		objs := objproxy.New(st, objproxy.Options{
			Uploaders:   cfg.S3.Uploaders,
			Downloaders: cfg.S3.Downloaders,
			Logger:      log.With().Str("component", "objproxy").Logger(),
		})
		stops = append(stops, func() error { objs.Close(); return nil })
		buffers := int(cfg.WriteBufferBytes() / cfg.ChunkBytes() * int64(cfg.ThreadCount()))
		vol, err := volume.Open(ctx, objs, volume.Options{
			Size:               cfg.SizeBytes(),
			BlockSize:          int64(cfg.BlockSize),
			ChunkSize:          cfg.ChunkBytes(),
			Shrink:             shrink,
			ConditionalWrites:  cfg.S3.ConditionalWrites,
			SkipCheckpoint:     cfg.SkipCheckpoint,
			CheckpointInterval: cfg.CheckpointInterval(),
			CheckpointObjects:  int64(cfg.Checkpoint.Objects),
			MaxInflight:        int64(buffers),
			MapIdleTimeout:     cfg.GCIdleTimeout(),
			LeaseInterval:      leaseInterval,
			Logger:             log,
		})
		if err != nil {
			return fmt.Errorf("attach volume: %w", err)
		}
		stops = append(stops, func() error { return vol.Close(context.Background()) })
		rw = vol
		collector = gc.New(vol, gc.Options{
			Step:     cfg.GC.Step,
			LiveData: cfg.GC.LiveData,
			Wait:     cfg.GCWait(),
			Logger:   log,
		})
		collector.Start()
		stops = append(stops, func() error { collector.Stop(); return nil })
		if cfg.Frontend != config.FrontendBUSE {
			ch := chunker.New(vol, chunker.Options{
				Durable:       cfg.Write.Durable,
				Buffers:       buffers,
				CollisionArea: cfg.CollisionBytes(),
				Logger:        log.With().Str("component", "chunker").Logger(),
			})
			stops = append(stops, ch.Close)
			dev = ch
		}
	}

	switch cfg.Frontend {
	case config.FrontendBUSE:
		d, err := buse.Start(rw, buse.Options{
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
		}, log)
		if err != nil {
			return err
		}
		stops = append(stops, d.Stop)
	case config.FrontendNBD:
		srv, err := nbd.New(dev, nbd.Options{Listen: cfg.NBD.Listen, Export: cfg.NBD.Export, Logger: log.With().Str("component", "nbd").Logger()})
		if err != nil {
			return fmt.Errorf("start NBD server: %w", err)
		}
		go func() {
			if err := srv.Serve(); err != nil {
				log.Error().Err(err).Msg("NBD server stopped")
			}
		}()
		stops = append(stops, srv.Close)
		fmt.Fprintf(os.Stderr, "\nbs3: NBD export %q on %s\n  try: nbdinfo nbd://%s/%s   or   nbd-client %s /dev/nbd0 -N %s -b %d\n\n",
			cfg.NBD.Export, srv.Addr(), srv.Addr(), cfg.NBD.Export, srv.Addr(), cfg.NBD.Export, cfg.BlockSize)
	case config.FrontendFUSE:
		m, err := fuse.Mount(dev, fuse.Options{Mountpoint: cfg.FUSE.Mountpoint, Loop: cfg.FUSE.Loop, Logger: log.With().Str("component", "fuse").Logger()})
		if err != nil {
			return fmt.Errorf("start FUSE frontend: %w", err)
		}
		stops = append(stops, m.Close)
		if m.LoopDevice() != "" {
			fmt.Fprintf(os.Stderr, "\nbs3: block device %s (backed by %s)\n  try: mkfs.ext4 %s && mkdir -p /mnt/bs3 && mount %s /mnt/bs3\n  stop with Ctrl-C (unmount the filesystem first)\n\n",
				m.LoopDevice(), m.FilePath(), m.LoopDevice(), m.LoopDevice())
		} else {
			fmt.Fprintf(os.Stderr, "\nbs3: device file %s\n\n", m.FilePath())
		}
	}

	for sig := range signals {
		if sig == syscall.SIGUSR1 {
			if collector == nil {
				log.Warn().Msg("SIGUSR1: no garbage collection with the null backend")
				continue
			}
			if collector.Trigger() {
				log.Info().Msg("SIGUSR1: threshold GC started")
			}
			continue
		}
		log.Info().Str("signal", sig.String()).Msg("stopping")
		return nil
	}
	return nil
}

// openStore builds the configured object store, under the volume prefix.
func openStore(ctx context.Context, cfg config.Config, log zerolog.Logger) (store.Store, error) {
	switch cfg.Store {
	case config.StoreDir:
		st, err := dir.New(cfg.Dir.Path)
		if err != nil {
			return nil, fmt.Errorf("open dir store %s: %w", cfg.Dir.Path, err)
		}
		return store.WithPrefix(st, cfg.S3.Prefix), nil
	default:
		st, err := s3store.New(ctx, s3store.Options{
			Endpoint:     cfg.S3.Remote,
			Region:       cfg.S3.Region,
			Bucket:       cfg.S3.Bucket,
			AccessKey:    cfg.S3.AccessKey,
			SecretKey:    cfg.S3.SecretKey,
			MaxConns:     cfg.S3.Uploaders + cfg.S3.Downloaders,
			CreateBucket: true,
			// Over TLS the transport protects the body, so the SHA-256 of
			// every 4 MiB chunk (the largest CPU cost of a PUT) is skipped;
			// over plain HTTP the signature is the only integrity check.
			UnsignedPayload: !strings.HasPrefix(cfg.S3.Remote, "http://"),
			Logger:          log.With().Str("component", "s3").Logger(),
		})
		if err != nil {
			return nil, err
		}
		if cfg.S3.ConditionalWrites {
			if err := st.ProbeConditionalWrites(ctx, path.Join(cfg.S3.Prefix, "conditional-write-probe")); err != nil {
				return nil, fmt.Errorf("%w\n(the store must refuse overwrites with If-None-Match: * to fence a second writer; if it cannot, set s3.conditional_writes = false and make sure only one bs3 attaches this volume)", err)
			}
		}
		return store.WithPrefix(st, cfg.S3.Prefix), nil
	}
}
