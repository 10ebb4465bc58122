package main

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
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

// logWatcher collects a process's stderr and waits for lines in it.
type logWatcher struct {
	mu    sync.Mutex
	lines []string
	cond  *sync.Cond
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
// run in the running process, SIGTERM stops it cleanly (exit 0, a final
// checkpoint written).
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
		"BS3_FRONTEND=nbd", "BS3_NBD_LISTEN="+addr, "BS3_SIZE=1", "BS3_LOG_LEVEL=debug")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	logs := watch(stderr)
	logs.waitFor(t, "NBD export", 30*time.Second)

	if err := cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "threshold GC run started", 10*time.Second)
	logs.waitFor(t, `"message":"threshold GC run"`, 30*time.Second)

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
