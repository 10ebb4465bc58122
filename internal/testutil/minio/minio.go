// Package minio runs a real MinIO server on loopback for tests: every test
// that touches S3 goes through it, so the s3 store, conditional writes and
// outages are exercised against a real implementation, not a mock.
//
// It owns the MinIO binary (built once from the Go module proxy into
// $HOME/.cache/bs3/bin, or $BS3_MINIO), the server processes it starts, and
// their temporary data directories. It must never be imported by non-test
// code, and never leave a server running after its test (servers are killed
// in tb.Cleanup, and with the test process via the parent-death signal).
package minio

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/bs3/bs3/internal/store/s3"
)

// The MinIO release the tests run against; scripts/deps.sh installs the same one.
const (
	Module  = "github.com/minio/minio"
	Version = "v0.0.0-20260212201848-7aac2a2c5b7c"
)

// startTimeout bounds how long a server may take to become ready.
const startTimeout = 60 * time.Second

var buildMu sync.Mutex // serializes builds within one test binary

// Binary returns the path of the MinIO binary: $BS3_MINIO if set, else
// $HOME/.cache/bs3/bin/minio, which it builds with `go install` if missing.
// A file lock on the directory makes parallel test binaries build once.
// It fails the test (not skips) if there is no binary and none can be built.
func Binary(tb testing.TB) string {
	tb.Helper()
	if p := os.Getenv("BS3_MINIO"); p != "" {
		if err := checkExec(p); err != nil {
			tb.Fatalf("BS3_MINIO=%s: %v", p, err)
		}
		return p
	}
	home, err := os.UserHomeDir()
	if err != nil {
		tb.Fatalf("locate MinIO binary: %v", err)
	}
	dir := filepath.Join(home, ".cache", "bs3", "bin")
	bin := filepath.Join(dir, "minio")
	if checkExec(bin) == nil {
		return bin
	}

	buildMu.Lock()
	defer buildMu.Unlock()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatalf("create %s: %v", dir, err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		tb.Fatalf("open build lock: %v", err)
	}
	defer lock.Close()
	// Blocks while another test binary builds; the lock is released when
	// the file is closed, or when that process dies.
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		tb.Fatalf("lock %s: %v", lock.Name(), err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN) //nolint:errcheck // closing releases it anyway
	if checkExec(bin) == nil {
		return bin // built by someone else while we waited
	}

	// Build into a private directory and rename, so an interrupted build
	// never leaves a truncated binary at the final path.
	tmp, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		tb.Fatalf("create build directory: %v", err)
	}
	defer os.RemoveAll(tmp)
	tb.Logf("building MinIO %s@%s into %s (a few minutes the first time)", Module, Version, dir)
	cmd := exec.Command("go", "install", Module+"@"+Version)
	cmd.Dir = tmp // outside any module, so the install is independent of ours
	cmd.Env = append(os.Environ(), "GOBIN="+tmp)
	out, err := cmd.CombinedOutput()
	if err != nil {
		tb.Fatalf("build MinIO (go install %s@%s): %v\n%s", Module, Version, err, out)
	}
	if err := os.Rename(filepath.Join(tmp, "minio"), bin); err != nil {
		tb.Fatalf("install MinIO binary: %v", err)
	}
	return bin
}

func checkExec(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", p)
	}
	return nil
}

// Server is a MinIO server on 127.0.0.1 with a temporary data directory.
type Server struct {
	Endpoint  string // http://127.0.0.1:PORT
	AccessKey string
	SecretKey string
	Region    string
	DataDir   string
	LogPath   string // MinIO's stdout and stderr, across restarts

	bin         string
	addr        string
	consoleAddr string
	certsDir    string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// Start starts a fresh server and waits until it serves S3 requests. The
// server is killed when the test ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	bin := Binary(tb)
	base := tb.TempDir()
	s := &Server{
		AccessKey: "bs3-" + randHex(6),
		SecretKey: randHex(16),
		Region:    "us-east-1",
		DataDir:   filepath.Join(base, "data"),
		LogPath:   filepath.Join(base, "minio.log"),
		bin:       bin,
		certsDir:  filepath.Join(base, "certs"),
	}
	tb.Cleanup(func() {
		s.Kill()
		if tb.Failed() {
			tb.Logf("MinIO log tail (%s):\n%s", s.LogPath, s.logTail(20))
		}
	})
	// Another process may take a port between our probe and MinIO's bind;
	// try a few port pairs before giving up.
	var err error
	for range 3 {
		s.addr, s.consoleAddr = freePort(tb), freePort(tb)
		s.Endpoint = "http://" + s.addr
		if err = s.start(); err == nil {
			if err = s.waitReady(); err == nil {
				return s
			}
		}
		s.Kill()
		if !strings.Contains(s.logTail(50), "address already in use") {
			break
		}
	}
	tb.Fatalf("start MinIO: %v\nlog tail (%s):\n%s", err, s.LogPath, s.logTail(40))
	return nil
}

func freePort(tb testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("find a free port: %v", err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		tb.Fatalf("find a free port: %v", err)
	}
	return addr
}

func randHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return hex.EncodeToString(b)
}

func (s *Server) start() error {
	logf, err := os.OpenFile(s.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open MinIO log: %w", err)
	}
	cmd := exec.Command(s.bin, "server", s.DataDir,
		"--address", s.addr,
		"--console-address", s.consoleAddr,
		"--certs-dir", s.certsDir)
	env := []string{}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MINIO_") { // no outside settings leak in
			env = append(env, kv)
		}
	}
	cmd.Env = append(env,
		"MINIO_ROOT_USER="+s.AccessKey,
		"MINIO_ROOT_PASSWORD="+s.SecretKey,
		"MINIO_BROWSER=off",
		"MINIO_UPDATE=off",
	)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Die with the test binary even if it is killed before Cleanup runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(logf, "=== bs3 test harness: starting MinIO on %s at %s\n", s.addr, time.Now().Format(time.RFC3339Nano))
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("run %s: %w", s.bin, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait() // the exit status of a killed server says nothing
		logf.Close()
		close(done)
	}()
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
	return nil
}

// waitReady polls the health endpoints: /minio/health/live answers as soon
// as the HTTP server is up, /minio/health/cluster only once buckets and IAM
// are loaded and S3 requests will be served.
func (s *Server) waitReady() error {
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(startTimeout)
	for _, path := range []string{"/minio/health/live", "/minio/health/cluster"} {
		for {
			resp, err := client.Get(s.Endpoint + path)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			select {
			case <-done:
				return errors.New("MinIO exited during start-up")
			default:
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("MinIO at %s not ready after %v (last %s: %v)", s.Endpoint, startTimeout, path, errOrStatus(resp, err))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

func errOrStatus(resp *http.Response, err error) string {
	if err != nil {
		return err.Error()
	}
	return resp.Status
}

// Kill stops the server with SIGKILL (a crash, as far as MinIO can tell)
// and waits for it to exit. Killing a stopped server does nothing.
func (s *Server) Kill() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill() // fails only if it already exited
	<-done
}

// Restart starts the server again on the same port and data directory
// (killing it first if it runs) and waits until it is ready.
func (s *Server) Restart(tb testing.TB) {
	tb.Helper()
	s.Kill()
	if err := s.start(); err != nil {
		tb.Fatalf("restart MinIO: %v", err)
	}
	if err := s.waitReady(); err != nil {
		s.Kill()
		tb.Fatalf("restart MinIO: %v\nlog tail (%s):\n%s", err, s.LogPath, s.logTail(40))
	}
}

var bucketSeq atomic.Int64

// Bucket returns a fresh, valid and unique bucket name derived from the
// test name. The bucket is not created; the s3 store creates it when
// opened with CreateBucket (as Store does).
func (s *Server) Bucket(tb testing.TB) string {
	var b strings.Builder
	dash := true // no leading or doubled '-'
	for _, r := range strings.ToLower(tb.Name()) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
			dash = false
		} else if !dash {
			b.WriteByte('-')
			dash = true
		}
	}
	name := strings.TrimSuffix(b.String(), "-")
	if len(name) > 40 {
		name = strings.TrimSuffix(name[:40], "-")
	}
	return fmt.Sprintf("t-%s-%d-%s", name, bucketSeq.Add(1), randHex(3))
}

// Store opens the s3 store on bucket of this server (creating the bucket),
// with 64 connections; its idle connections are closed when the test ends.
func (s *Server) Store(tb testing.TB, bucket string) *s3.Store {
	tb.Helper()
	return s.StoreWith(tb, s.Options(tb, bucket))
}

// Options are the s3 store options Store uses for bucket, for callers that
// change one (PayloadChecksum, MaxConns) before StoreWith.
func (s *Server) Options(tb testing.TB, bucket string) s3.Options {
	return s3.Options{
		Endpoint:     s.Endpoint,
		Region:       s.Region,
		Bucket:       bucket,
		AccessKey:    s.AccessKey,
		SecretKey:    s.SecretKey,
		MaxConns:     64,
		CreateBucket: true,
		Logger:       zerolog.New(zerolog.NewTestWriter(tb)).Level(zerolog.WarnLevel),
	}
}

// StoreWith opens an s3 store with o and closes it at the end of the test.
func (s *Server) StoreWith(tb testing.TB, o s3.Options) *s3.Store {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := s3.New(ctx, o)
	if err != nil {
		tb.Fatalf("open s3 store on MinIO: %v", err)
	}
	tb.Cleanup(st.Close)
	return st
}

// CPUSeconds is the CPU time (user + system) the running server process
// has used, from /proc: benchmarks on a shared machine report it beside
// their own, since the server's CPU is taken from the same cores.
func (s *Server) CPUSeconds() (float64, error) {
	s.mu.Lock()
	cmd := s.cmd
	s.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return 0, errors.New("MinIO is not running")
	}
	return procCPUSeconds(cmd.Process.Pid)
}

// procCPUSeconds reads utime and stime of process pid from
// /proc/pid/stat, in clock ticks of 1/100 s (USER_HZ on Linux).
func procCPUSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read CPU time of pid %d: %w", pid, err)
	}
	// The command name (field 2) is in parentheses and may hold spaces:
	// fields are counted after its closing parenthesis.
	rest := b[bytes.LastIndexByte(b, ')')+1:]
	f := strings.Fields(string(rest))
	if len(f) < 13 {
		return 0, fmt.Errorf("read CPU time of pid %d: %d fields in %q", pid, len(f), b)
	}
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	var ticks float64
	for _, x := range f[11:13] {
		v, err := strconv.ParseUint(x, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("read CPU time of pid %d: %w", pid, err)
		}
		ticks += float64(v)
	}
	return ticks / 100, nil
}

// logTail returns the last n lines of the server's log.
func (s *Server) logTail(n int) string {
	b, err := os.ReadFile(s.LogPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
