package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/testutil/logcheck"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// buildDaemon builds the bs3 binary once per test run.
func buildDaemon(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "bs3")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// freeAddr returns a loopback TCP address with a port nobody listens on
// right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// stopCleanly sends SIGTERM to a daemon started with cmd and fails the
// test unless it exits with status 0 within 60 s.
func stopCleanly(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("bs3 exited with %v after SIGTERM", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("bs3 did not stop within 60 s of SIGTERM")
	}
}

// syncBuffer is a goroutine-safe output sink (a daemon's stderr, the log
// of serve run in the test).
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// logWatcher collects a process's stderr and waits for lines in it.
type logWatcher struct {
	mu    sync.Mutex
	lines []string
	cond  *sync.Cond
}

// watchStderr collects cmd's stderr through a pipe that cmd.Wait drains
// before it returns. With cmd.StderrPipe, Wait closes the pipe as soon as
// the process exits, and the last lines ("stopped cleanly") were lost
// when the reader lagged under load. Call it before cmd.Start.
func watchStderr(t *testing.T, cmd *exec.Cmd) *logWatcher {
	t.Helper()
	pr, pw := io.Pipe()
	cmd.Stderr = pw
	t.Cleanup(func() { pw.Close() })
	return watch(pr)
}

func watch(r io.Reader) *logWatcher {
	w := &logWatcher{}
	w.cond = sync.NewCond(&w.mu)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			w.mu.Lock()
			w.lines = append(w.lines, sc.Text())
			w.cond.Broadcast()
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *logWatcher) waitFor(t *testing.T, substr string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		w.mu.Lock()
		for _, l := range w.lines {
			if strings.Contains(l, substr) {
				w.mu.Unlock()
				return
			}
		}
		w.mu.Unlock()
		time.Sleep(50 * time.Millisecond)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	t.Fatalf("no log line with %q within %v; log:\n%s", substr, timeout, strings.Join(w.lines, "\n"))
}

// The daemon's signal handling, end to end: SIGUSR1 starts a threshold GC
// run in the running process, SIGUSR2 a defragmentation of gc.defrag_range,
// SIGTERM stops it cleanly (exit 0, a final checkpoint written).
func TestSignals(t *testing.T) {
	bin := buildDaemon(t)
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(bin, "-c", "")
	cmd.Env = append(os.Environ(),
		"BS3_STORE=dir", "BS3_DIR_PATH="+filepath.Join(dir, "objects"),
		"BS3_FRONTEND=nbd", "BS3_NBD_LISTEN="+addr, "BS3_SIZE=1", "BS3_LOG_LEVEL=debug",
		"BS3_GC_DEFRAG_RANGE=4K-1M")
	logs := watchStderr(t, cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	logs.waitFor(t, "NBD export", 30*time.Second)

	if err := cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "threshold GC run started", 10*time.Second)
	logs.waitFor(t, `"message":"threshold GC run"`, 30*time.Second)

	if err := cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "SIGUSR2: defragmentation started", 10*time.Second)
	logs.waitFor(t, `"offset":4096,"length":1044480,"from_block":1,"to_block":256`, 10*time.Second)
	logs.waitFor(t, `"message":"defragmentation run"`, 30*time.Second)

	stopCleanly(t, cmd)
	logs.waitFor(t, "checkpoint written", time.Second)
}

// A bad configuration is refused before anything is touched, with the key,
// the value and exit status 2.
func TestBadConfigRefused(t *testing.T) {
	bin := buildDaemon(t)
	cfg := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(cfg, []byte("block_size = 1000\n[s3]\nbucket = \"b\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "-c", cfg).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("bs3 with a bad config: %v, want exit status 2\n%s", err, out)
	}
	if !strings.Contains(string(out), "block_size = 1000") || !strings.Contains(string(out), "512 or 4096") {
		t.Fatalf("message does not name the key, value and what is allowed:\n%s", out)
	}
}

// shutdownDaemon is a bs3 process started by a shutdown test.
type shutdownDaemon struct {
	cmd    *exec.Cmd
	logs   *logWatcher
	exited chan struct{} // closed once Wait returned
	err    error         // Wait's result
	at     time.Time     // when Wait returned
}

// shutdownStart starts bin with the environment settings (BS3_*=...) and
// waits for the log line ready.
func shutdownStart(t *testing.T, bin, ready string, settings ...string) *shutdownDaemon {
	t.Helper()
	cmd := exec.Command(bin, "-c", "")
	cmd.Env = append(os.Environ(), settings...)
	d := &shutdownDaemon{cmd: cmd, logs: watchStderr(t, cmd), exited: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		d.err = cmd.Wait()
		d.at = time.Now()
		close(d.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			cmd.Process.Kill()
			<-d.exited
		}
	})
	d.logs.waitFor(t, ready, 60*time.Second)
	return d
}

// waitExit waits at most limit for the process to exit and returns its
// exit status.
func (d *shutdownDaemon) waitExit(t *testing.T, limit time.Duration) int {
	t.Helper()
	select {
	case <-d.exited:
	case <-time.After(limit):
		d.logs.mu.Lock()
		log := strings.Join(d.logs.lines, "\n")
		d.logs.mu.Unlock()
		t.Fatalf("bs3 did not exit within %v; log:\n%s", limit, log)
	}
	var ee *exec.ExitError
	switch {
	case d.err == nil:
		return 0
	case errors.As(d.err, &ee):
		return ee.ExitCode()
	default:
		t.Fatalf("wait for bs3: %v", d.err)
		return -1
	}
}

func (d *shutdownDaemon) signal(t *testing.T, sig os.Signal) {
	t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// shutdownNBD is a minimal NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME,
// simple replies): unlike qemu-io or nbdcopy it sends exactly the requests
// the test asks for, and no flush when it disconnects.
type shutdownNBD struct {
	c      net.Conn
	handle uint64
}

func shutdownDialNBD(t *testing.T, addr, export string) *shutdownNBD {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial NBD server: %v", err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	var hello [18]byte // NBDMAGIC, IHAVEOPT, handshake flags
	if _, err := io.ReadFull(c, hello[:]); err != nil {
		t.Fatalf("NBD handshake: %v", err)
	}
	if binary.BigEndian.Uint64(hello[:]) != 0x4e42444d41474943 || binary.BigEndian.Uint64(hello[8:]) != 0x49484156454f5054 {
		t.Fatalf("NBD handshake: bad magic % x", hello)
	}
	msg := binary.BigEndian.AppendUint32(nil, 1|2) // fixed newstyle, no zeroes
	msg = binary.BigEndian.AppendUint64(msg, 0x49484156454f5054)
	msg = binary.BigEndian.AppendUint32(msg, 1) // NBD_OPT_EXPORT_NAME
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("NBD handshake: %v", err)
	}
	var info [10]byte // export size, transmission flags
	if _, err := io.ReadFull(c, info[:]); err != nil {
		t.Fatalf("NBD handshake: export %q: %v", export, err)
	}
	c.SetDeadline(time.Time{})
	return &shutdownNBD{c: c}
}

// do sends one request and waits for its simple reply.
func (n *shutdownNBD) do(t *testing.T, cmd, flags uint16, off uint64, data []byte, length uint32) {
	t.Helper()
	n.handle++
	req := binary.BigEndian.AppendUint32(nil, 0x25609513)
	req = binary.BigEndian.AppendUint16(req, flags)
	req = binary.BigEndian.AppendUint16(req, cmd)
	req = binary.BigEndian.AppendUint64(req, n.handle)
	req = binary.BigEndian.AppendUint64(req, off)
	req = binary.BigEndian.AppendUint32(req, length)
	req = append(req, data...)
	n.c.SetDeadline(time.Now().Add(30 * time.Second))
	defer n.c.SetDeadline(time.Time{})
	if _, err := n.c.Write(req); err != nil {
		t.Fatalf("NBD request %d: %v", cmd, err)
	}
	var rep [16]byte
	if _, err := io.ReadFull(n.c, rep[:]); err != nil {
		t.Fatalf("NBD reply to request %d: %v", cmd, err)
	}
	if binary.BigEndian.Uint32(rep[:]) != 0x67446698 || binary.BigEndian.Uint64(rep[8:]) != n.handle {
		t.Fatalf("NBD reply to request %d: bad reply % x", cmd, rep)
	}
	if e := binary.BigEndian.Uint32(rep[4:]); e != 0 {
		t.Fatalf("NBD request %d failed with error %d", cmd, e)
	}
}

func (n *shutdownNBD) write(t *testing.T, off uint64, data []byte, fua bool) {
	t.Helper()
	var flags uint16
	if fua {
		flags = 1 // NBD_CMD_FLAG_FUA
	}
	n.do(t, 1, flags, off, data, uint32(len(data)))
}

func (n *shutdownNBD) flush(t *testing.T) { t.Helper(); n.do(t, 3, 0, 0, nil, 0) }

// read sends NBD_CMD_READ and returns the payload of its reply.
func (n *shutdownNBD) read(t *testing.T, off uint64, length uint32) []byte {
	t.Helper()
	n.handle++
	req := binary.BigEndian.AppendUint32(nil, 0x25609513)
	req = binary.BigEndian.AppendUint16(req, 0)
	req = binary.BigEndian.AppendUint16(req, 0) // NBD_CMD_READ
	req = binary.BigEndian.AppendUint64(req, n.handle)
	req = binary.BigEndian.AppendUint64(req, off)
	req = binary.BigEndian.AppendUint32(req, length)
	n.c.SetDeadline(time.Now().Add(30 * time.Second))
	defer n.c.SetDeadline(time.Time{})
	if _, err := n.c.Write(req); err != nil {
		t.Fatalf("NBD read: %v", err)
	}
	rep := make([]byte, 16+int(length))
	if _, err := io.ReadFull(n.c, rep[:16]); err != nil {
		t.Fatalf("NBD reply to read: %v", err)
	}
	if binary.BigEndian.Uint32(rep) != 0x67446698 || binary.BigEndian.Uint64(rep[8:]) != n.handle || binary.BigEndian.Uint32(rep[4:]) != 0 {
		t.Fatalf("NBD reply to read: bad or failed reply % x", rep[:16])
	}
	if _, err := io.ReadFull(n.c, rep[16:]); err != nil {
		t.Fatalf("NBD read payload: %v", err)
	}
	return rep[16:]
}

// disconnect sends NBD_CMD_DISC (no reply) and closes the connection.
func (n *shutdownNBD) disconnect(t *testing.T) {
	t.Helper()
	req := binary.BigEndian.AppendUint32(nil, 0x25609513)
	req = binary.BigEndian.AppendUint16(req, 0)
	req = binary.BigEndian.AppendUint16(req, 2)
	req = binary.BigEndian.AppendUint64(req, n.handle+1)
	req = binary.BigEndian.AppendUint64(req, 0)
	req = binary.BigEndian.AppendUint32(req, 0)
	if _, err := n.c.Write(req); err != nil {
		t.Fatalf("NBD disconnect: %v", err)
	}
	n.c.Close()
}

// shutdownOnMinIO starts bs3 with the NBD frontend on a fresh MinIO,
// writes 64 KiB that are stored (a FUA write and a flush), stops MinIO
// and writes another 64 KiB, which is acknowledged but cannot be stored.
func shutdownOnMinIO(t *testing.T, settings ...string) *shutdownDaemon {
	t.Helper()
	bin := buildDaemon(t)
	srv := minio.Start(t)
	addr := freeAddr(t)
	env := append([]string{
		"BS3_STORE=s3", "BS3_S3_REMOTE=" + srv.Endpoint, "BS3_S3_BUCKET=" + srv.Bucket(t),
		"BS3_S3_ACCESS_KEY=" + srv.AccessKey, "BS3_S3_SECRET_KEY=" + srv.SecretKey, "BS3_S3_REGION=" + srv.Region,
		"BS3_FRONTEND=nbd", "BS3_NBD_LISTEN=" + addr, "BS3_SIZE=1", "BS3_LOG_LEVEL=info",
	}, settings...)
	d := shutdownStart(t, bin, "NBD export", env...)
	n := shutdownDialNBD(t, addr, "bs3")
	n.write(t, 0, bytes.Repeat([]byte{0xa1}, 64<<10), true)
	n.flush(t)
	srv.Kill()
	n.write(t, 1<<20, bytes.Repeat([]byte{0xb2}, 64<<10), false)
	n.disconnect(t)
	return d
}

// During an object store outage SIGTERM still stops bs3 within
// shutdown_timeout (plus its 1 s grace), with exit status 1 and a log
// that says exactly which writes were not stored and whether an
// acknowledged write is lost.
func TestShutdownBoundedDuringOutage(t *testing.T) {
	const timeout = 5 * time.Second
	for _, tc := range []struct {
		durable bool
		want    string
	}{
		{false, "writes not stored: 1 acknowledged writes (65536 bytes) were not stored and are lost"},
		{true, "writes not stored: no flushed write is lost; 1 unflushed writes (65536 bytes) were not stored"},
	} {
		t.Run(fmt.Sprintf("durable=%v", tc.durable), func(t *testing.T) {
			d := shutdownOnMinIO(t, fmt.Sprintf("BS3_WRITE_DURABLE=%v", tc.durable),
				fmt.Sprintf("BS3_SHUTDOWN_TIMEOUT=%d", int(timeout/time.Second)))
			start := time.Now()
			d.signal(t, syscall.SIGTERM)
			// The margin is for a loaded test machine; the daemon itself
			// gives up after timeout + stopGrace.
			status := d.waitExit(t, timeout+stopGrace+10*time.Second)
			took := d.at.Sub(start)
			if status != exitFailure {
				t.Errorf("exit status %d after a stop cut short, want %d", status, exitFailure)
			}
			if took < timeout-time.Second {
				t.Errorf("bs3 exited after %v, before shutdown_timeout (%v): it did not wait for the store", took, timeout)
			}
			d.logs.waitFor(t, tc.want, time.Second)
			d.logs.waitFor(t, `"not_finished":[`, time.Second)
			d.logs.waitFor(t, `"first_key":`, time.Second)
			t.Logf("stopped %v after SIGTERM", took)
			d.logs.mu.Lock()
			for _, l := range d.logs.lines {
				if strings.Contains(l, "not stored") || strings.Contains(l, "cut short") || strings.Contains(l, "stop step failed") {
					t.Log(l)
				}
			}
			d.logs.mu.Unlock()
		})
	}
}

// A second SIGTERM during a stop that waits for an unreachable store ends
// bs3 at once, with exit status 3, after logging what was not stored.
func TestShutdownSecondSignalAborts(t *testing.T) {
	d := shutdownOnMinIO(t, "BS3_SHUTDOWN_TIMEOUT=600")
	d.signal(t, syscall.SIGTERM)
	// Go merges a signal that arrives before the first one was taken, so
	// the second is sent once the stop has begun.
	d.logs.waitFor(t, `"message":"stopping"`, 10*time.Second)
	start := time.Now()
	d.signal(t, syscall.SIGTERM)
	status := d.waitExit(t, 10*time.Second)
	if status != exitAborted {
		t.Errorf("exit status %d after a second SIGTERM, want %d", status, exitAborted)
	}
	t.Logf("exited %v after the second SIGTERM", d.at.Sub(start))
	d.logs.waitFor(t, "second signal: giving up the stop at once", time.Second)
	d.logs.waitFor(t, "1 acknowledged writes (65536 bytes) were not stored and are lost", time.Second)
}

// Unmounting the FUSE file system from outside ends the device: bs3
// notices, closes the volume cleanly (final checkpoint) and exits 1 so
// that systemd restarts it.
func TestShutdownWhenFUSEUnmounted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: the FUSE frontend needs root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("skipping: /dev/fuse is not available (%v)", err)
	}
	umount, err := exec.LookPath("fusermount3")
	if err != nil {
		if umount, err = exec.LookPath("umount"); err != nil {
			t.Skip("skipping: neither fusermount3 nor umount is on PATH")
		}
	}
	bin := buildDaemon(t)
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	d := shutdownStart(t, bin, "bs3: device file",
		"BS3_STORE=dir", "BS3_DIR_PATH="+filepath.Join(dir, "objects"), "BS3_SIZE=1", "BS3_LOG_LEVEL=info",
		"BS3_FRONTEND=fuse", "BS3_FUSE_MOUNTPOINT="+mnt, "BS3_FUSE_LOOP=false")
	f, err := os.OpenFile(filepath.Join(mnt, "bs3"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xc3}, 8192), 4096); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	args := []string{mnt}
	if filepath.Base(umount) == "fusermount3" {
		args = []string{"-u", mnt}
	}
	if out, err := exec.Command(umount, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", umount, args, err, out)
	}
	status := d.waitExit(t, 60*time.Second)
	if status != exitFailure {
		t.Errorf("exit status %d after the FUSE file system was unmounted, want %d", status, exitFailure)
	}
	d.logs.waitFor(t, `"frontend":"fuse"`, time.Second)
	d.logs.waitFor(t, "unmounted from outside", time.Second)
	d.logs.waitFor(t, "checkpoint written", time.Second)
	d.logs.waitFor(t, "stopped cleanly", time.Second)
}

// shutdownListenerFD finds the descriptor of this process's TCP socket
// listening on port, through /proc/net/tcp and /proc/self/fd.
func shutdownListenerFD(t *testing.T, port int) int {
	t.Helper()
	tcp, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Skipf("skipping: no /proc/net/tcp: %v", err)
	}
	inode := ""
	for line := range strings.Lines(string(tcp)) {
		f := strings.Fields(line)
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
		if len(f) > 9 && f[3] == "0A" && strings.HasSuffix(f[1], fmt.Sprintf(":%04X", port)) {
			inode = f[9]
		}
	}
	if inode == "" {
		t.Fatalf("no socket listens on port %d in /proc/net/tcp", port)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range fds {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && target == "socket:["+inode+"]" {
			fd, err := strconv.Atoi(e.Name())
			if err != nil {
				t.Fatal(err)
			}
			return fd
		}
	}
	t.Fatalf("the socket listening on port %d (inode %s) is not this process's", port, inode)
	return -1
}

// When the NBD server's listening socket stops listening, Serve returns;
// serve notices, closes the volume cleanly and returns an error naming the
// frontend (bs3 exits 1). The socket is shut down with shutdown(2), which
// puts it in the state an outside kill (ss -K, SOCK_DESTROY) leaves it
// in: accept fails with EINVAL. serve runs in the test process, which
// owns the socket.
func TestShutdownWhenNBDServerEnds(t *testing.T) {
	dir := t.TempDir()
	addr := freeAddr(t)
	cfg := config.Default()
	cfg.Store, cfg.Dir.Path, cfg.Size = config.StoreDir, filepath.Join(dir, "objects"), 1
	cfg.Frontend, cfg.NBD.Listen = config.FrontendNBD, addr
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	served := make(chan error, 1)
	go func() { served <- serve(cfg, false, zerolog.New(&logs)) }()
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(logs.String(), "nbd server listening") {
		select {
		case err := <-served:
			t.Fatalf("serve returned before the NBD server listened: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the NBD server did not start; log:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	n := shutdownDialNBD(t, addr, "bs3")
	n.write(t, 0, bytes.Repeat([]byte{0xd4}, 4096), false)
	n.disconnect(t)

	_, p, _ := net.SplitHostPort(addr)
	port, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Shutdown(shutdownListenerFD(t, port), syscall.SHUT_RDWR); err != nil {
		t.Fatalf("shutdown(2) the NBD listener: %v", err)
	}
	select {
	case err = <-served:
	case <-time.After(60 * time.Second):
		t.Fatalf("serve did not return after the NBD server ended; log:\n%s", logs.String())
	}
	if err == nil || !strings.Contains(err.Error(), "nbd frontend ended") {
		t.Fatalf("serve = %v, want an error naming the nbd frontend", err)
	}
	log := logs.String()
	for _, want := range []string{`"frontend":"nbd"`, "frontend ended by itself", "checkpoint written", "stopped cleanly"} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
	// Every line of the whole run is one JSON object without a repeated
	// key (each component named once, where serve wires it).
	for _, p := range logcheck.Lines(strings.NewReader(log)) {
		t.Errorf("log line: %s", p)
	}
	for _, want := range []string{`"component":"nbd"`, `"component":"volume"`, `"took_ms":`} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
}

// A frontend whose stop hangs (its requests wait for a store that does not
// answer, and it ignores contexts) is abandoned at shutdown_timeout, and
// the chunker still gets to report what it could not store; the whole
// stop takes at most shutdown_timeout + stopGrace.
func TestShutdownStuckFrontendLeavesTimeToReport(t *testing.T) {
	cfg := config.Default()
	cfg.ShutdownTimeout = 1
	var logs syncBuffer
	d := &daemon{cfg: cfg, log: zerolog.New(&logs)}
	stuck := make(chan struct{})
	defer close(stuck)
	d.onBoundedStop(chunkerStep, func(ctx context.Context) error {
		<-ctx.Done()
		return &chunker.NotStoredError{Err: ctx.Err(), Unstored: chunker.Unstored{
			Chunks: 1, FirstKey: 7, LastKey: 7, Writes: 2, Bytes: 8192, Acked: 2, AckedBytes: 8192, FirstByte: 0, EndByte: 8192}}
	})
	d.onStop("NBD server", func(context.Context) error { <-stuck; return nil })
	start := time.Now()
	err := d.stop(make(chan os.Signal))
	took := time.Since(start)
	if limit := cfg.ShutdownTimeoutDuration() + stopGrace + time.Second; took > limit {
		t.Errorf("stop took %v, more than shutdown_timeout + stopGrace (+1 s slack) = %v", took, limit)
	}
	if err == nil || !strings.Contains(err.Error(), "stop NBD server") || !strings.Contains(err.Error(), "stop chunker") {
		t.Errorf("stop = %v, want errors for both steps", err)
	}
	log := logs.String()
	for _, want := range []string{
		"writes not stored: 2 acknowledged writes (8192 bytes) were not stored and are lost",
		`"not_finished":["NBD server","chunker"]`,
	} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
}

// The unit gives bs3 more time to stop than bs3 gives itself, so systemd's
// SIGKILL never cuts the report of a stop that ran out of time, and
// restarts bs3 when a frontend ended (exit status 1).
func TestShutdownSystemdUnit(t *testing.T) {
	unit, err := os.ReadFile("contrib/systemd/bs3.service")
	if err != nil {
		t.Fatal(err)
	}
	var stopSec time.Duration
	restart := ""
	for line := range strings.Lines(string(unit)) {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok || strings.HasPrefix(k, "#") {
			continue
		}
		switch k {
		case "TimeoutStopSec":
			s, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("TimeoutStopSec=%s: want whole seconds: %v", v, err)
			}
			stopSec = time.Duration(s) * time.Second
		case "Restart":
			restart = v
		}
	}
	need := config.Default().ShutdownTimeoutDuration() + stopGrace + 20*time.Second
	if stopSec < need {
		t.Errorf("TimeoutStopSec is %v, want at least shutdown_timeout + %v + a 20 s margin = %v", stopSec, stopGrace, need)
	}
	if restart != "on-failure" && restart != "always" {
		t.Errorf("Restart=%q: bs3 exits 1 when its frontend ends and must be restarted", restart)
	}
}

// nbdGreets reports whether an NBD server at addr sends its greeting
// (NBDMAGIC) within timeout: the export is being served.
func nbdGreets(addr string, timeout time.Duration) bool {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return false
	}
	defer c.Close()
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return false
	}
	var magic [8]byte
	if _, err := io.ReadFull(c, magic[:]); err != nil {
		return false
	}
	return string(magic[:]) == "NBDMAGIC"
}
