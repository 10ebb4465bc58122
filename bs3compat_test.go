package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/testutil/logcheck"
)

// A BS3 user's configuration drives the daemon end to end: the integer
// log level takes effect, BS3's environment names are honoured, the
// retired key is named in a warning, and every line is clean JSON with
// each key once.
func TestBS3ConfigDropIn(t *testing.T) {
	bin := buildDaemon(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	// Keys and types as BS3 wrote them; only where the objects go and
	// how the device is exposed come from bs3's variables below.
	body := `major = 0
threads = 0
cpus_per_node = 2
size = 1
block_size = 4096
queue_depth = 256
null = false
[write]
durable = false
shared_buffer_size = 32
chunk_size = 4
collision_chunk_size = 1
[gc]
step = 1024
live_data = 0.3
idle_timeout = 200
wait = 600
[log]
level = 0
pretty = false
`
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	cmd := exec.Command(bin, "-c", cfg)
	cmd.Env = append(os.Environ(),
		"BS3_STORE=dir", "BS3_DIR_PATH="+filepath.Join(dir, "objects"),
		"BS3_FRONTEND=nbd", "BS3_NBD_LISTEN="+addr,
		"BS3_QUEUEDEPTH=64", "BS3_GC_LIVEDATA=0.4") // BS3's names
	logs := watchStderr(t, cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	logs.waitFor(t, "nbd server listening", 30*time.Second)
	logs.waitFor(t, `"level":"warn","key":"cpus_per_node"`, time.Second)
	logs.waitFor(t, `"queue_depth":64`, time.Second)   // BS3_QUEUEDEPTH over the file's 256
	logs.waitFor(t, `"gc.live_data":0.4`, time.Second) // BS3_GC_LIVEDATA
	logs.waitFor(t, `"log.level":"debug"`, time.Second)

	stopCleanly(t, cmd)
	// Waits are generous: under load the last lines can take a while to
	// reach the reader; a line that appears returns at once.
	logs.waitFor(t, "stopped cleanly", 30*time.Second)
	logs.waitFor(t, `"level":"debug"`, 30*time.Second) // level = 0 took effect
	// The log lines (bs3 also prints the export for a human, as text).
	var all []string
	logs.mu.Lock()
	for _, l := range logs.lines {
		if strings.HasPrefix(l, "{") {
			all = append(all, l)
		}
	}
	logs.mu.Unlock()
	if len(all) < 5 {
		t.Fatalf("only %d JSON log lines", len(all))
	}
	for _, p := range logcheck.Lines(strings.NewReader(strings.Join(all, "\n"))) {
		t.Errorf("log line: %s", p)
	}
}
