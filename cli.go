package main

// The command line: `bs3 [serve] -c FILE [--shrink]` runs the daemon (the
// default command, so `bs3 -c FILE` keeps working), `bs3 status`,
// `bs3 check` and `bs3 gc` look at or nudge a volume
// (docs/ARCHITECTURE.md §15).
//
// kong rather than cobra: the commands and their flags are one struct
// with help in tags, a default command that takes its own flags is built
// in (`default:"withargs"`), and it brings no further dependencies.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/alecthomas/kong"
	"github.com/rs/zerolog"
	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/inspect"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store/sealed"
)

// cli is bs3's command line.
type cli struct {
	Config string    `short:"c" name:"config" default:"/etc/bs3/config.toml" placeholder:"FILE" help:"Configuration file (TOML); \"\" reads only the BS3_* environment."`
	Serve  serveCmd  `cmd:"" default:"withargs" help:"Run the daemon: attach the volume and serve the device (the default command)."`
	Status statusCmd `cmd:"" help:"Show the volume's state in the bucket: identity, size, generation, lease holder, checkpoints, objects, live fraction. Read-only: safe while a daemon is attached."`
	Check  checkCmd  `cmd:"" help:"Verify the volume in the bucket (an fsck): every object header, key contiguity, claim windows, checkpoints against a replay, superblock. Exit status 0 when healthy, 1 with the damaged keys named."`
	GC     gcCmd     `cmd:"" name:"gc" help:"Ask the daemon running on this host for a threshold GC run (SIGUSR1)."`
	Passwd passwdCmd `cmd:"" help:"Change the key or passphrase of an encrypted volume: [encryption] in the configuration names the current one, a flag the new one. Only the superblock's wrapped data key is rewritten, no data. Refused while a daemon holds the lease."`
}

type passwdCmd struct {
	NewKeyFile        string `name:"new-key-file" placeholder:"FILE" help:"The new key: a file of 32 raw bytes or 64 hex digits, mode 0600."`
	NewPassphraseFile string `name:"new-passphrase-file" placeholder:"FILE" help:"The new passphrase (stretched with Argon2id), in a file of mode 0600."`
}

type serveCmd struct {
	Shrink bool `help:"Allow attaching with a size smaller than the volume's (drops the data past the new end)."`
}

type statusCmd struct {
	JSON bool `name:"json" help:"Print JSON instead of text."`
}

type checkCmd struct {
	JSON   bool `name:"json" help:"Print the report as JSON."`
	Repair bool `help:"Also do the repairs that are provably safe, and only those: remove the S3 store's probe objects older than an hour left by interrupted starts. Missing, truncated or corrupt objects and checkpoints are never 'repaired' (that would drop data silently); restore them from an older object version or a backup. Refused while a daemon holds the lease."`
}

type gcCmd struct{}

// runCLI parses args and runs the chosen command; it returns the exit
// status.
func runCLI(args []string) int {
	var c cli
	parser, err := kong.New(&c,
		kong.Name("bs3"),
		kong.Description("bs3 turns S3-compatible object storage into a Linux block device."),
		kong.UsageOnError(),
		kong.Help(func(o kong.HelpOptions, ctx *kong.Context) error {
			if err := kong.DefaultHelpPrinter(o, ctx); err != nil {
				return err
			}
			if sel := ctx.Selected(); sel == nil || sel.Name == "serve" {
				fmt.Fprintln(ctx.Stdout)
				config.Usage(ctx.Stdout)
			}
			return nil
		}),
	)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3: %v\n", err)
		return exitFailure
	}
	kctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3: %v\n", err)
		return exitUsage
	}
	cfg, err := config.Load(c.Config)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3: %v\n", err)
		return exitUsage
	}
	switch kctx.Command() {
	case "status":
		return c.Status.run(cfg)
	case "check":
		return c.Check.run(cfg)
	case "gc":
		return c.GC.run(cfg)
	case "passwd":
		return c.Passwd.run(cfg)
	}
	log := newLogger(cfg)
	cfg.LogNotices(log) // retired BS3 keys: accepted, said so
	if err := serve(cfg, c.Serve.Shrink, log); err != nil {
		if errors.Is(err, errAborted) {
			log.Error().Err(err).Int("exit_status", exitAborted).Msg("bs3 stopped without a clean stop")
			return exitAborted
		}
		log.Error().Err(err).Int("exit_status", exitFailure).Msg("bs3 stopped with an error")
		return exitFailure
	}
	return exitOK
}

// toolTimeout bounds a whole status or check run against a store that
// stops answering; each request is also retried only a few times.
const toolTimeout = time.Hour

// openInspect opens the bucket read-only for status and check: no bucket
// creation, no probe objects, no temporary-file cleanup.
func openInspect(cfg config.Config) (*objproxy.Proxy, context.Context, func(), error) {
	log := newToolLogger(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	if cfg.Null {
		cancel()
		return nil, nil, nil, errors.New("null = true: there is no volume to look at")
	}
	// An encrypted volume is read through its key, checked against the
	// superblock (sealed.Open writes nothing).
	e, err := engine.Open(ctx, engine.ToolOptions(cfg, log))
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	objs := e.Proxy
	return objs, ctx, func() { objs.Close(); cancel() }, nil
}

// newToolLogger logs to stderr for the subcommands: warnings and errors
// only, unless log.level asks for less, so their output stays readable.
func newToolLogger(cfg config.Config) zerolog.Logger {
	log := newLogger(cfg)
	return log.Level(max(cfg.LogLevel(), zerolog.WarnLevel))
}

func fallback(cfg config.Config) inspect.Fallback {
	return inspect.Fallback{Size: cfg.SizeBytes(), BlockSize: int64(cfg.BlockSize), ChunkSize: cfg.ChunkBytes()}
}

func (s statusCmd) run(cfg config.Config) int {
	objs, ctx, done, err := openInspect(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3 status: %v\n", err)
		return exitFailure
	}
	defer done()
	st, err := inspect.ReadStatus(ctx, objs, fallback(cfg))
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3 status: %v\n", err)
		return exitFailure
	}
	if s.JSON {
		err = writeJSON(os.Stdout, st)
	} else {
		err = st.WriteText(os.Stdout)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3 status: %v\n", err)
		return exitFailure
	}
	return exitOK
}

func (c checkCmd) run(cfg config.Config) int {
	objs, ctx, done, err := openInspect(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3 check: %v\n", err)
		return exitFailure
	}
	defer done()
	bar := newProgress()
	rep, err := inspect.Check(ctx, objs, inspect.CheckOptions{Fallback: fallback(cfg), Progress: bar.update})
	bar.finish()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3 check: %v\n", err)
		return exitFailure
	}
	var repaired []string
	if c.Repair {
		if l, err := inspect.ReadLease(ctx, objs); err == nil && l.Present && !(l.Readable && l.Released) {
			fmt.Fprintf(os.Stderr, "bs3 check --repair: the lease (host %s pid %d) was not released; watching it for %v to see whether its holder is alive\n", l.Host, l.PID, leaseInterval*5/2)
		}
		live, l, err := inspect.LeaseLive(ctx, objs, leaseInterval)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bs3 check --repair: %v\n", err)
			return exitFailure
		}
		if live {
			fmt.Fprintf(os.Stderr, "bs3 check --repair: refusing to write: host %s pid %d holds the volume's lease and renews it; stop that daemon first (systemctl stop bs3 there)\n", l.Host, l.PID)
			return exitFailure
		}
		if repaired, err = inspect.Repair(ctx, objs, rep, time.Now()); err != nil {
			fmt.Fprintf(os.Stderr, "bs3 check --repair: %v\n", err)
			return exitFailure
		}
	}
	if c.JSON {
		err = writeJSON(os.Stdout, struct {
			*inspect.Report
			Healthy     bool     `json:"healthy"`
			DamagedKeys []int64  `json:"damaged_keys"`
			Repaired    []string `json:"repaired,omitempty"`
		}{rep, rep.Healthy(), rep.DamagedKeys(), repaired})
	} else {
		err = rep.WriteText(os.Stdout)
		for _, r := range repaired {
			fmt.Fprintf(os.Stdout, "REPAIRED %s\n", r)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3 check: %v\n", err)
		return exitFailure
	}
	if !rep.Healthy() {
		return exitFailure
	}
	return exitOK
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// progress draws a bar on stderr for check's phases, only when stderr is
// a terminal (a log file or journal gets the summary only).
type progress struct {
	bar   *progressbar.ProgressBar
	phase string
}

func newProgress() *progress {
	if !term.IsTerminal(int(os.Stderr.Fd())) {
		return nil
	}
	return &progress{}
}

func (p *progress) update(phase string, done, total int64) {
	if p == nil {
		return
	}
	if p.bar == nil || p.phase != phase {
		if p.bar != nil {
			_ = p.bar.Finish() // drawing only
		}
		p.phase = phase
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(os.Stderr),
			progressbar.OptionSetDescription(phase),
			progressbar.OptionShowCount(),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
	}
	_ = p.bar.Set64(done) // drawing only
}

func (p *progress) finish() {
	if p != nil && p.bar != nil {
		_ = p.bar.Finish() // drawing only
	}
}

// run finds the daemon attached to this volume on this host from the
// lease and sends it SIGUSR1.
func (gcCmd) run(cfg config.Config) int {
	objs, ctx, done, err := openInspect(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3 gc: %v\n", err)
		return exitFailure
	}
	defer done()
	l, err := inspect.ReadLease(ctx, objs)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bs3 gc: %v\n", err)
		return exitFailure
	}
	pid, why := localDaemon(l)
	if pid == 0 {
		fmt.Fprintf(os.Stderr, "bs3 gc: %s.\nA threshold GC runs inside the daemon that has the volume attached: on the host that runs it, `bs3 gc -c FILE`, or `systemctl kill -s USR1 bs3` for the systemd service.\n", why)
		return exitFailure
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		fmt.Fprintf(os.Stderr, "bs3 gc: signal pid %d: %v (as root, or `systemctl kill -s USR1 bs3`)\n", pid, err)
		return exitFailure
	}
	fmt.Printf("asked bs3 pid %d (generation %d) for a threshold GC run; its log says when it starts and ends (journalctl -u bs3)\n", pid, l.Generation)
	return exitOK
}

// localDaemon returns the pid of the lease holder when it is a live bs3
// process on this host, or 0 and why not.
func localDaemon(l inspect.LeaseInfo) (int, string) {
	host, err := os.Hostname()
	if err != nil {
		return 0, fmt.Sprintf("cannot tell this host's name: %v", err)
	}
	switch {
	case !l.Present:
		return 0, "the volume has no lease: no daemon has attached it"
	case !l.Readable:
		return 0, "the volume's lease is unreadable"
	case l.Released:
		return 0, fmt.Sprintf("no daemon holds the volume (the last one, pid %d on %s, stopped cleanly)", l.PID, l.Host)
	case l.Host != host:
		return 0, fmt.Sprintf("the volume is attached on host %s (pid %d), not on this host (%s)", l.Host, l.PID, host)
	}
	comm, err := os.ReadFile("/proc/" + strconv.Itoa(l.PID) + "/comm")
	if err != nil {
		return 0, fmt.Sprintf("the lease names pid %d on this host, but no such process runs (the daemon crashed?)", l.PID)
	}
	if name := strings.TrimSpace(string(comm)); name != "bs3" {
		return 0, fmt.Sprintf("the lease names pid %d on this host, but that process is %q, not bs3 (the daemon is gone and the pid was reused)", l.PID, name)
	}
	return l.PID, ""
}

// run rewraps the volume's data key under the new key or passphrase. The
// volume must be detached: a daemon attaching meanwhile would read the
// superblock this rewrites.
func (c passwdCmd) run(cfg config.Config) int {
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "bs3 passwd: %v\n", err)
		return exitFailure
	}
	old := sealed.KeyConfig{KeyFile: cfg.Encryption.KeyFile, PassphraseFile: cfg.Encryption.PassphraseFile}
	next := sealed.KeyConfig{KeyFile: c.NewKeyFile, PassphraseFile: c.NewPassphraseFile}
	switch {
	case (c.NewKeyFile == "") == (c.NewPassphraseFile == ""):
		fmt.Fprintln(os.Stderr, "bs3 passwd: give exactly one of --new-key-file and --new-passphrase-file")
		return exitUsage
	case !old.Enabled():
		return fail(errors.New("[encryption] key_file or passphrase_file must name the volume's current key or passphrase"))
	case cfg.Null:
		return fail(errors.New("null = true: there is no volume"))
	}
	log := newToolLogger(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	// The proxy reads the lease over the raw store: the key is checked
	// by Passwd itself.
	e, err := engine.Open(ctx, engine.Options{Config: &cfg, ReadOnly: true, NoVolume: true, Logger: log,
		Proxy: objproxy.Options{Uploaders: 1, Downloaders: 2, MaxAttempts: 5}})
	if err != nil {
		return fail(err)
	}
	raw, objs := e.Raw, e.Proxy
	defer objs.Close()
	live, l, err := inspect.LeaseLive(ctx, objs, leaseInterval)
	if err != nil {
		return fail(err)
	}
	if live {
		return fail(fmt.Errorf("host %s pid %d holds the volume's lease and renews it; stop that daemon first (systemctl stop bs3 there)", l.Host, l.PID))
	}
	if err := sealed.Passwd(ctx, raw, old, next); err != nil {
		return fail(err)
	}
	fmt.Fprintln(os.Stdout, "bs3 passwd: the volume's data key is now wrapped by the new key; point [encryption] at it before the next start")
	return exitOK
}
