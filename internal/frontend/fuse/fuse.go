// Package fuse serves a frontend.Device as a single regular file in a FUSE
// file system, optionally attached to a loop device so the kernel sees a
// block device (/dev/loopN) without the NBD module.
//
// It owns the FUSE mount, the byte-to-block translation for requests not
// aligned to the device block size (read-modify-write under a striped
// lock), and the loop device it attached. It must never change the file's
// size, create other files, cache data (the Device is the only cache), or
// leave a mount or loop device behind after Close.
package fuse

import (
	"bytes"
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/frontend"
)

// DefaultFileName is the name of the file when Options.FileName is empty.
const DefaultFileName = "bs3"

// fuseDevice is the kernel's FUSE character device; a variable so a test
// can point it at a path that does not exist.
var fuseDevice = "/dev/fuse"

// Options configure Mount.
type Options struct {
	Mountpoint string // directory; created if missing
	FileName   string // default "bs3"
	// Loop attaches the file to a loop device with direct I/O and the
	// device block size as its logical sector size.
	Loop   bool
	Logger zerolog.Logger
}

// Mounted is a mounted FUSE file system serving one Device (the type cannot
// share the name of the Mount function).
type Mounted struct {
	log        zerolog.Logger
	server     *gofuse.Server
	mountpoint string
	file       string
	loopDev    string
	served     chan struct{} // closed when the serve loop ends: unmounted
	done       chan error    // one value when the serve loop ends, then closed
	closing    atomic.Bool   // Close has started: the end is ours

	mu           sync.Mutex // serialises Close
	loopDetached bool
	unmounted    bool
}

// Mount mounts a FUSE file system at o.Mountpoint holding one file of
// dev.Size() bytes and, with o.Loop, attaches it to a loop device.
func Mount(dev frontend.Device, o Options) (*Mounted, error) {
	size, bs := dev.Size(), dev.BlockSize()
	if bs <= 0 || size <= 0 || size%bs != 0 {
		return nil, fmt.Errorf("fuse: device size %d is not a positive multiple of block size %d", size, bs)
	}
	name := o.FileName
	if name == "" {
		name = DefaultFileName
	}
	if name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return nil, fmt.Errorf("fuse: invalid file name %q", name)
	}
	if o.Mountpoint == "" {
		return nil, errors.New("fuse: no mountpoint")
	}
	mp, err := filepath.Abs(o.Mountpoint)
	if err != nil {
		return nil, fmt.Errorf("fuse: mountpoint %q: %w", o.Mountpoint, err)
	}
	if err := checkFUSE(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(mp, 0o755); err != nil {
		return nil, fmt.Errorf("fuse: create mountpoint: %w", err)
	}

	lg := o.Logger.With().Str("mountpoint", mp).Logger()
	fs := newFileSystem(dev, name, lg)
	opts := &gofuse.MountOptions{
		FsName: "bs3",
		Name:   "bs3",
		// As root, mount(2) directly so fusermount is not needed; go-fuse
		// falls back to fusermount when that is refused (not root).
		DirectMount: true,
		// 1 MiB requests (go-fuse caps this at the kernel's limit) and as
		// much readahead as the kernel allows.
		MaxWrite:     1 << 20,
		MaxReadAhead: 1 << 20,
		// Direct I/O from the loop device arrives as asynchronous
		// (background) requests; allow a deep queue, the Device is
		// concurrent and each request may wait on the object store.
		MaxBackground:      64,
		ExtraCapabilities:  gofuse.CAP_ASYNC_DIO,
		DisableReadDirPlus: true,
		// Replies come from memory; splicing only costs a pipe per read
		// (and warns for 1 MiB reads, which exceed the pipe size).
		DisableSplice: true,
		Logger:        log.New(logWriter{lg}, "", 0),
	}
	server, err := gofuse.NewServer(fs, mp, opts)
	if err != nil {
		return nil, fmt.Errorf("fuse: mount at %s: %w", mp, err)
	}
	m := &Mounted{
		log:        lg,
		server:     server,
		mountpoint: mp,
		file:       filepath.Join(mp, name),
		served:     make(chan struct{}),
		done:       make(chan error, 1),
	}
	go func() {
		server.Serve()
		close(m.served)
		var err error
		if !m.closing.Load() {
			err = fmt.Errorf("fuse: the file system at %s was unmounted from outside (umount, fusermount -u) or its FUSE connection was aborted", mp)
			lg.Error().Err(err).Msg("FUSE session ended")
		}
		m.done <- err
		close(m.done)
	}()
	if err := server.WaitMount(); err != nil {
		closeErr := m.Close()
		return nil, errors.Join(fmt.Errorf("fuse: wait for mount at %s: %w", mp, err), closeErr)
	}
	lg.Info().Str("file", m.file).Int64("size", size).Int64("block_size", bs).Msg("mounted")

	if o.Loop {
		loopDev, err := attachLoop(m.file, bs, lg)
		if err != nil {
			closeErr := m.Close()
			return nil, errors.Join(err, closeErr)
		}
		m.loopDev = loopDev
	}
	return m, nil
}

// checkFUSE turns a missing or inaccessible /dev/fuse into an error that
// tells the operator what to do.
func checkFUSE() error {
	f, err := os.OpenFile(fuseDevice, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("FUSE is not available: %w; load the fuse module (modprobe fuse) or use frontend = nbd", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", fuseDevice, err)
	}
	return nil
}

// FilePath is the path of the device file: <mountpoint>/<file>.
func (m *Mounted) FilePath() string { return m.file }

// LoopDevice is the attached loop device ("/dev/loopN"), or "" without
// Options.Loop.
func (m *Mounted) LoopDevice() string { return m.loopDev }

// Wait blocks until the file system is unmounted, by Close or from outside
// (umount).
func (m *Mounted) Wait() { <-m.served }

// Done returns a channel that receives one value when the FUSE session
// ends and is closed after it: nil when Close ended it, an error when it
// ended by itself (unmounted from outside, connection aborted), after
// which the device is gone.
func (m *Mounted) Done() <-chan error { return m.done }

// Close detaches the loop device and then unmounts the file system, waiting
// until the kernel has let go of it. It is idempotent; after an error (the
// loop device or the mount is still in use) it may be called again.
func (m *Mounted) Close() error {
	m.closing.Store(true)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.loopDev != "" && !m.loopDetached {
		if err := detachLoop(m.loopDev, m.file); err != nil {
			return err
		}
		m.loopDetached = true
		m.log.Info().Str("loop", m.loopDev).Msg("loop device detached")
	}
	if m.unmounted {
		return nil
	}
	select {
	case <-m.served:
		// Unmounted from outside already.
	default:
		if err := m.server.Unmount(); err != nil {
			return fmt.Errorf("fuse: unmount %s: %w", m.mountpoint, err)
		}
		<-m.served
	}
	m.unmounted = true
	m.log.Info().Msg("unmounted")
	return nil
}

// attachLoop attaches file to a free loop device with the given logical
// sector size, asking for direct I/O (no second copy of the data in the
// page cache, and asynchronous requests to FUSE). If direct I/O is refused
// it falls back to buffered I/O and says so.
func attachLoop(file string, sectorSize int64, lg zerolog.Logger) (string, error) {
	ss := strconv.FormatInt(sectorSize, 10)
	dev, err := losetup("--find", "--show", "--direct-io=on", "--sector-size", ss, file)
	if err != nil {
		lg.Warn().Err(err).Msg("loop device with direct I/O refused; retrying with buffered I/O")
		dev, err = losetup("--find", "--show", "--direct-io=off", "--sector-size", ss, file)
		if err != nil {
			return "", fmt.Errorf("fuse: attach loop device to %s: %w", file, err)
		}
	}
	if !strings.HasPrefix(dev, "/dev/loop") {
		return "", fmt.Errorf("fuse: losetup printed %q, not a loop device", dev)
	}
	direct, err := loopDirectIO(dev)
	switch {
	case err != nil:
		lg.Warn().Err(err).Str("loop", dev).Msg("cannot tell whether the loop device uses direct I/O")
	case !direct:
		// losetup only warns when the kernel keeps buffered I/O.
		lg.Warn().Str("loop", dev).Msg("loop device uses buffered I/O: direct I/O was refused")
	}
	lg.Info().Str("loop", dev).Bool("direct_io", direct).Int64("sector_size", sectorSize).Msg("loop device attached")
	return dev, nil
}

// loopDirectIO reports whether the loop device does direct I/O on its
// backing file, as the kernel shows in sysfs.
func loopDirectIO(dev string) (bool, error) {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "dio"))
	if err != nil {
		return false, err
	}
	return strings.TrimSpace(string(b)) == "1", nil
}

// loopBackingFile is the file the loop device is attached to, or "" when
// it is not attached.
func loopBackingFile(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// detachLoop detaches dev unless it is no longer attached to file (someone
// detached it already).
func detachLoop(dev, file string) error {
	_, err := losetup("--detach", dev)
	if err == nil {
		return nil
	}
	if loopBackingFile(dev) != file {
		return nil
	}
	return fmt.Errorf("fuse: detach loop device %s: %w", dev, err)
}

// losetup runs losetup(8) and returns its trimmed standard output.
func losetup(args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("losetup", args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("losetup %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(stdout.String()), nil
}

// logWriter carries go-fuse's own log lines into zerolog.
type logWriter struct{ log zerolog.Logger }

func (w logWriter) Write(p []byte) (int, error) {
	w.log.Warn().Str("source", "go-fuse").Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}
