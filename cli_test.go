package main

// The subcommands (status, check, gc), the start-up order (a frontend that
// cannot start attaches nothing) and systemd readiness, end to end with
// the real binary: status and check against a real MinIO beside or after a
// daemon, readiness with a fake NOTIFY_SOCKET.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// tool runs a bs3 subcommand with the scenario's settings and returns its
// stdout, stderr and exit status.
func (e *attachEnv) tool(args ...string) (string, string, int) {
	e.t.Helper()
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BS3_") {
			env = append(env, kv)
		}
	}
	env = append(env, e.base...)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.bin, args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return stdout.String(), stderr.String(), 0
	case errors.As(err, &ee):
		return stdout.String(), stderr.String(), ee.ExitCode()
	}
	e.t.Fatalf("bs3 %v: %v\n%s", args, err, stderr.String())
	return "", "", -1
}

// statusJSON is the part of `bs3 status --json` the tests look at.
type statusJSON struct {
	VolumeID   string `json:"volume_id"`
	Size       int64  `json:"size"`
	BlockSize  int64  `json:"block_size"`
	Generation uint64 `json:"generation"`
	Objects    string `json:"objects"`
	Lease      struct {
		Present  bool   `json:"present"`
		Host     string `json:"host"`
		PID      int    `json:"pid"`
		Released bool   `json:"released"`
	} `json:"lease"`
	Checkpoints []struct {
		Name string `json:"name"`
	} `json:"checkpoints"`
	Watermark   int64 `json:"watermark"`
	DataObjects int64 `json:"data_objects"`
	DataBytes   int64 `json:"data_bytes"`
	LiveBlocks  int64 `json:"live_blocks"`
}

// `bs3 status` beside an attached daemon: it reports the volume, the
// daemon as lease holder and the data written, writes nothing to the
// bucket, and the daemon keeps its volume (no new generation, writes and
// reads still work).
func TestStatusWhileAttached(t *testing.T) {
	e := attachSetup(t, "BS3_GC_WAIT=3600", "BS3_CHECKPOINT_INTERVAL=1")
	d := e.start("daemon")
	d.waitAttached()
	attachWrite(t, d, []string{"write -P 0x5a 0 256k", "flush"})
	// A checkpoint covering the write (interval 1 s) gives the live count.
	deadline := time.Now().Add(30 * time.Second)
	var st statusJSON
	for {
		out, errOut, code := e.tool("status", "-c", "", "--json")
		if code != 0 {
			t.Fatalf("bs3 status exited %d beside an attached daemon:\n%s%s", code, out, errOut)
		}
		st = statusJSON{}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("bs3 status --json: %v\n%s", err, out)
		}
		if st.LiveBlocks >= 64 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	host, _ := os.Hostname()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sbRaw := make([]byte, 4096)
	n, err := e.st.GetRange(ctx, "superblock", 0, sbRaw)
	if err != nil {
		t.Fatal(err)
	}
	var sb struct {
		VolumeID string `json:"volume_id"`
	}
	if err := json.Unmarshal(sbRaw[:n], &sb); err != nil {
		t.Fatal(err)
	}
	switch {
	case st.VolumeID != sb.VolumeID || st.VolumeID == "":
		t.Errorf("status volume id %q, superblock says %q", st.VolumeID, sb.VolumeID)
	case st.Size != 1<<30 || st.BlockSize != attachBlock:
		t.Errorf("status size %d block size %d, want %d and %d", st.Size, st.BlockSize, 1<<30, attachBlock)
	case st.Generation != 1:
		t.Errorf("status generation %d, want 1 (one attach)", st.Generation)
	case st.Objects != "checksummed (none-crc32c), not encrypted": // [integrity] checksums is on by default
		t.Errorf("status says objects are %q, want checksummed", st.Objects)
	case !st.Lease.Present || st.Lease.Released || st.Lease.PID != d.cmd.Process.Pid || st.Lease.Host != host:
		t.Errorf("status lease %+v, want held by pid %d on %s", st.Lease, d.cmd.Process.Pid, host)
	case len(st.Checkpoints) == 0 || st.Watermark <= 0:
		t.Errorf("status shows no checkpoint (%+v, watermark %d) although one is written every second", st.Checkpoints, st.Watermark)
	case st.DataBytes < 256<<10:
		t.Errorf("status counts %d data bytes in %d objects, less than the 256 KiB written", st.DataBytes, st.DataObjects)
	case st.LiveBlocks < 64:
		t.Errorf("status counts %d live blocks, want at least the 64 written", st.LiveBlocks)
	}
	text, _, code := e.tool("status", "-c", "")
	if code != 0 || !strings.Contains(text, fmt.Sprintf("held by host %s pid %d", host, d.cmd.Process.Pid)) {
		t.Errorf("bs3 status (text) exited %d without naming the holder:\n%s", code, text)
	}

	// Nothing but the daemon's own lease renewals changed the bucket.
	before := e.names()
	if _, _, code := e.tool("status", "-c", ""); code != 0 {
		t.Fatalf("bs3 status exited %d", code)
	}
	after := e.names()
	delete(before, "lease")
	delete(after, "lease")
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Errorf("bs3 status changed the bucket:\nbefore %v\nafter  %v", before, after)
	}
	// check beside the daemon finds no damage; --repair refuses to write
	// while the daemon renews its lease.
	if out, errOut, code := e.tool("check", "-c", ""); code != 0 {
		t.Errorf("bs3 check beside an attached daemon exited %d:\n%s%s", code, out, errOut)
	}
	if out, errOut, code := e.tool("check", "-c", "", "--repair"); code == 0 || !strings.Contains(errOut, fmt.Sprintf("refusing to write: host %s pid %d", host, d.cmd.Process.Pid)) {
		t.Errorf("bs3 check --repair beside an attached daemon exited %d without refusing:\n%s%s", code, out, errOut)
	}
	// The daemon still owns the volume: it writes and reads back.
	attachWrite(t, d, []string{"write -P 0x6b 1M 4k", "flush", "read -P 0x6b 1M 4k", "read -P 0x5a 0 256k"})
	if d.exited() {
		t.Fatalf("the daemon exited after bs3 status:\n%s", d.out.tail(20))
	}
	d.stop()
	if strings.Contains(d.out.String(), "fenced") || strings.Contains(d.out.String(), "owned by another writer") {
		t.Errorf("the daemon was fenced beside bs3 status:\n%s", d.out.tail(20))
	}
}

// checkJSON is the part of `bs3 check --json` the tests look at.
type checkJSON struct {
	Healthy     bool    `json:"healthy"`
	DamagedKeys []int64 `json:"damaged_keys"`
	Findings    []struct {
		Severity string `json:"severity"`
		Key      int64  `json:"key"`
		Object   string `json:"object"`
		Message  string `json:"message"`
	} `json:"findings"`
}

func (e *attachEnv) check() (checkJSON, string, int) {
	e.t.Helper()
	out, errOut, code := e.tool("check", "-c", "", "--json")
	var c checkJSON
	if err := json.Unmarshal([]byte(out), &c); err != nil {
		e.t.Fatalf("bs3 check --json (exit %d): %v\n%s%s", code, err, out, errOut)
	}
	text, _, _ := e.tool("check", "-c", "")
	return c, text, code
}

// `bs3 check` passes a healthy volume, names a truncated data object by
// its key, and names a corrupt checkpoint; each time it exits non-zero
// only for the damage.
func TestCheck(t *testing.T) {
	e := attachSetup(t)
	d := e.start("writer")
	d.waitAttached()
	attachWrite(t, d, []string{"write -P 0x11 0 1M", "flush", "write -P 0x22 512k 1M", "flush", "write -P 0x33 3M 64k", "flush"})
	d.stop()
	// A second attach: claim records, placeholders and two checkpoints
	// that the replay between them must reproduce.
	d = e.start("second")
	d.waitAttached()
	attachWrite(t, d, []string{"write -P 0x44 256k 4k", "flush"})
	d.stop()

	c, text, code := e.check()
	if code != 0 || !c.Healthy || len(c.DamagedKeys) != 0 {
		t.Fatalf("bs3 check of a healthy volume: exit %d, healthy %v, damaged keys %v:\n%s", code, c.Healthy, c.DamagedKeys, text)
	}
	if !strings.Contains(text, "healthy") || !strings.Contains(text, "replays") {
		t.Errorf("bs3 check text does not say healthy:\n%s", text)
	}

	snap := e.objects()
	// Truncate the largest data object (1 MiB of data).
	var victim string
	var key uint64
	for name, o := range snap {
		if k, ok := attachDataKey(name); ok && (victim == "" || o.size > snap[victim].size) {
			victim, key = name, k
		}
	}
	if victim == "" || snap[victim].size < 1<<20 {
		t.Fatalf("no data object of 1 MiB in the bucket: %v", attachSorted(snap))
	}
	e.put(victim, snap[victim].body[:snap[victim].size-4096])
	c, text, code = e.check()
	if code == 0 || c.Healthy {
		t.Errorf("bs3 check passed a volume with data object %s truncated:\n%s", victim, text)
	}
	if len(c.DamagedKeys) != 1 || c.DamagedKeys[0] != int64(key) {
		t.Errorf("bs3 check names damaged keys %v, want [%d] (%s truncated):\n%s", c.DamagedKeys, key, victim, text)
	}
	if !strings.Contains(text, fmt.Sprintf("key %d: truncated", key)) {
		t.Errorf("bs3 check text does not say key %d is truncated:\n%s", key, text)
	}
	e.restore(snap)

	// Corrupt one byte in the middle of the newest checkpoint.
	var ckpts []string
	for name := range snap {
		if attachIsCheckpoint(name) {
			ckpts = append(ckpts, name)
		}
	}
	sort.Strings(ckpts)
	if len(ckpts) == 0 {
		t.Fatal("no checkpoint in the bucket after a clean stop")
	}
	newest := ckpts[len(ckpts)-1]
	body := append([]byte(nil), snap[newest].body...)
	body[len(body)/2] ^= 0xff
	e.put(newest, body)
	c, text, code = e.check()
	if code == 0 || c.Healthy {
		t.Errorf("bs3 check passed a volume whose checkpoint %s is corrupt:\n%s", newest, text)
	}
	named := false
	for _, f := range c.Findings {
		if f.Severity == "damage" && f.Object == newest && strings.Contains(f.Message, "checksum") {
			named = true
		}
	}
	if !named || !strings.Contains(text, newest) {
		t.Errorf("bs3 check does not name the corrupt checkpoint %s:\n%s", newest, text)
	}
	e.restore(snap)
	if c, text, code := e.check(); code != 0 || !c.Healthy {
		t.Errorf("bs3 check after restoring the bucket: exit %d:\n%s", code, text)
	}
}

// A frontend that cannot start fails the start before the attach: with
// the NBD address taken, bs3 exits with an error naming the address and
// the bucket is exactly as before (no attach record, no claim, no lease
// or superblock rewrite).
func TestStartFailsBeforeAttachWhenNBDAddressInUse(t *testing.T) {
	e := attachSetup(t)
	e.cycle("first")
	before := e.objects()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	addr := busy.Addr().String()
	d := e.start("blocked", "BS3_NBD_LISTEN="+addr)
	select {
	case <-d.done:
	case <-time.After(attachSettleTimeout):
		t.Fatalf("bs3 did not exit within %v with its NBD address taken:\n%s", attachSettleTimeout, d.out.tail(20))
	}
	if code := d.cmd.ProcessState.ExitCode(); code == 0 {
		t.Errorf("bs3 exited 0 with its NBD address taken")
	}
	out := d.out.String()
	if !strings.Contains(out, addr) || !strings.Contains(out, "address already in use") {
		t.Errorf("the error does not name the busy address %s:\n%s", addr, d.out.tail(20))
	}
	if strings.Contains(out, "claimed keys") || strings.Contains(out, "loaded checkpoint") {
		t.Errorf("bs3 attached before it found the NBD address taken:\n%s", d.out.tail(20))
	}
	attachCheckSame(t, "a start with the NBD address taken", before, e.objects())
	e.cycle("after") // the volume is still fine
}

// Readiness (systemd Type=notify): READY=1 comes only once the NBD export
// serves, then watchdog pings at half of WATCHDOG_USEC, and STOPPING=1
// when SIGTERM starts the stop. The bucket holds a lease that was not
// released, so the attach first waits 12.5 s for its holder: a READY=1
// sent before the attach finished would find the export silent.
func TestSystemdNotify(t *testing.T) {
	bin := buildDaemon(t)
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "objects"), 0o700); err != nil {
		t.Fatal(err)
	}
	lease := `{"volume_id":"gone","generation":0,"host":"elsewhere","pid":1,"counter":7,"released":false,"renewed":"2020-01-01T00:00:00Z"}`
	if err := os.WriteFile(filepath.Join(dir, "objects", "lease"), []byte(lease), 0o600); err != nil {
		t.Fatal(err)
	}
	sockPath := filepath.Join(dir, "notify.sock")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	msgs := make(chan string, 64)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := sock.ReadFromUnix(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	addr := freeAddr(t)
	cmd := exec.Command(bin, "serve", "-c", "")
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BS3_") && !strings.HasPrefix(kv, "NOTIFY_SOCKET=") && !strings.HasPrefix(kv, "WATCHDOG_") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "NOTIFY_SOCKET="+sockPath, "WATCHDOG_USEC=400000",
		"BS3_STORE=dir", "BS3_DIR_PATH="+filepath.Join(dir, "objects"),
		"BS3_FRONTEND=nbd", "BS3_NBD_LISTEN="+addr, "BS3_SIZE=1")
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
		}
	}()
	next := func(want string) string {
		t.Helper()
		select {
		case m := <-msgs:
			return m
		case err := <-exited:
			t.Fatalf("bs3 exited (%v) before sending %s:\n%s", err, want, out.String())
		case <-time.After(60 * time.Second):
			t.Fatalf("no %s from bs3 within 60 s:\n%s", want, out.String())
		}
		return ""
	}
	first := next("READY=1")
	if !strings.Contains(first, "READY=1") {
		t.Fatalf("first notification is %q, want READY=1", first)
	}
	if !nbdGreets(addr, 2*time.Second) {
		t.Fatalf("READY=1 was sent but the NBD export at %s does not greet:\n%s", addr, out.String())
	}
	if !strings.Contains(out.String(), "lease holder is gone") {
		t.Fatalf("READY=1 came before the attach waited out the stale lease:\n%s", out.String())
	}
	if m := next("WATCHDOG=1"); !strings.Contains(m, "WATCHDOG=1") {
		t.Fatalf("notification after READY=1 is %q, want WATCHDOG=1", m)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for {
		m := next("STOPPING=1")
		if strings.Contains(m, "STOPPING=1") {
			break
		}
		if !strings.Contains(m, "WATCHDOG=1") {
			t.Fatalf("unexpected notification %q while waiting for STOPPING=1", m)
		}
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("bs3 exited with %v after SIGTERM:\n%s", err, out.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("bs3 did not stop within 60 s of SIGTERM")
	}
}
