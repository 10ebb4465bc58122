package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Real NBD clients from Debian (qemu-utils, libnbd-bin, fio) against a
// server. Each helper takes the export's URI and what the export should
// look like, so the same checks run against the in-memory device here and
// against the engine elsewhere in this package.

// clientTimeout bounds one client run; a hang is a failure, not a wait.
const clientTimeout = 5 * time.Minute

// needTool skips the test when a client binary is missing (CI has them).
func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (Debian package %s); skipping the real-client check", name, pkg)
	}
	return p
}

// runTool runs a client and returns its combined output and error.
func runTool(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("%s timed out after %v: %w", name, clientTimeout, ctx.Err())
	}
	return string(out), err
}

// runNbdinfo checks what nbdinfo --json reports about the export: size,
// the advertised capabilities and the block size constraints (minimum 1,
// preferred blockSize, maximum maxRequest).
func runNbdinfo(t *testing.T, uri string, size, blockSize, maxRequest int64) {
	t.Helper()
	needTool(t, "nbdinfo", "libnbd-bin")
	out, err := runTool(t, "nbdinfo", "--json", uri)
	if err != nil {
		t.Fatalf("nbdinfo --json %s: %v\n%s", uri, err, out)
	}
	var info struct {
		Protocol string `json:"protocol"`
		Exports  []struct {
			Size         int64 `json:"export-size"`
			ReadOnly     bool  `json:"is_read_only"`
			CanFlush     bool  `json:"can_flush"`
			CanFUA       bool  `json:"can_fua"`
			CanTrim      bool  `json:"can_trim"`
			CanZero      bool  `json:"can_zero"`
			CanMultiConn bool  `json:"can_multi_conn"`
			CanCache     bool  `json:"can_cache"`
			CanDF        bool  `json:"can_df"`
			MinBS        int64 `json:"block_size_minimum"`
			PrefBS       int64 `json:"block_size_preferred"`
			MaxBS        int64 `json:"block_size_maximum"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("parse nbdinfo output: %v\n%s", err, out)
	}
	if info.Protocol != "newstyle-fixed" {
		t.Errorf("protocol %q, want newstyle-fixed", info.Protocol)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo shows %d exports, want 1\n%s", len(info.Exports), out)
	}
	e := info.Exports[0]
	if e.Size != size {
		t.Errorf("export-size %d, want %d", e.Size, size)
	}
	if e.ReadOnly || !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.CanMultiConn {
		t.Errorf("flags: read_only %v flush %v fua %v trim %v zero %v multi_conn %v; want false and all true",
			e.ReadOnly, e.CanFlush, e.CanFUA, e.CanTrim, e.CanZero, e.CanMultiConn)
	}
	if e.CanCache || e.CanDF {
		t.Errorf("can_cache %v can_df %v: neither is served", e.CanCache, e.CanDF)
	}
	if e.MinBS != 1 || e.PrefBS != blockSize || e.MaxBS != maxRequest {
		t.Errorf("block sizes %d/%d/%d, want 1/%d/%d", e.MinBS, e.PrefBS, e.MaxBS, blockSize, maxRequest)
	}
	if t.Failed() {
		t.Logf("nbdinfo output:\n%s", out)
	}
}

// qemuIO runs qemu-io on uri with the given commands and fails the test
// if it exits non-zero or reports a failed command.
func qemuIO(t *testing.T, uri string, cmds []string) {
	t.Helper()
	args := []string{"-f", "raw", "-d", "unmap"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, uri)
	out, err := runTool(t, "qemu-io", args...)
	if err != nil || qemuIOFailed(out) {
		t.Fatalf("qemu-io failed (%v):\n%s", err, out)
	}
}

// qemuIOFailed spots failures qemu-io reports without an exit status.
func qemuIOFailed(out string) bool {
	return strings.Contains(out, "Pattern verification failed") ||
		strings.Contains(out, "failed:") || strings.Contains(out, "error")
}

// runQemuIOPatterns writes patterns at many offsets and lengths (aligned,
// sub-block ones that qemu turns into read-modify-write, overlapping ones,
// concurrent aio writes, FUA writes, write-zeroes with and without unmap,
// discards, the last block) and verifies them in the same session and in
// a new one. The export must be at least 16 MiB and fresh data is
// written everywhere checked, so prior contents do not matter.
func runQemuIOPatterns(t *testing.T, uri string, size int64) {
	t.Helper()
	needTool(t, "qemu-io", "qemu-utils")
	if size < 16<<20 {
		t.Fatalf("runQemuIOPatterns needs at least 16 MiB, export has %d", size)
	}
	last := size - 4096
	writes := []string{
		"write -P 0x11 0 4k",
		"write -P 0x22 4k 60k",
		"write -P 0x33 1M 1M",
		"write -f -P 0x44 3M 128k", // FUA
		fmt.Sprintf("write -P 0x55 %d 4k", last),
		// Sub-block write inside a written block: with the advertised
		// minimum block size of 1, qemu sends it as it is and the server
		// reads, merges and writes back the block.
		"write -P 0x77 5M 8k",
		"write -P 0x66 5243392 1k", // 5M+512
		// Later write wins where they overlap.
		"write -P 0x88 6M 256k",
		"write -P 0x99 6356992 64k", // 6M+64k
		// Concurrent requests on one connection.
		"aio_write -P 0xa1 8M 64k",
		"aio_write -P 0xa2 9M 128k",
		"aio_write -P 0xa3 10M 4k",
		"aio_write -P 0xa4 10489856 1M", // 10M+12k
		"aio_write -P 0xa5 12M 512k",
		"aio_flush",
		// Zeroes: without and with unmap, and discard.
		"write -P 0xbb 13M 3M",
		"write -z 13M 1M",
		"write -z -u 14M 512k",
		"discard 15M 512k",
		"flush",
	}
	verify := []string{
		"read -P 0x11 0 4k",
		"read -P 0x22 4k 60k",
		"read -P 0x33 1M 1M",
		"read -P 0x44 3M 128k",
		fmt.Sprintf("read -P 0x55 %d 4k", last),
		"read -P 0x77 5M 512",
		"read -P 0x66 5243392 1k",
		"read -P 0x77 5244416 6656", // rest of the 8k
		"read -P 0x88 6M 64k",
		"read -P 0x99 6356992 64k",
		"read -P 0x88 6422528 128k",
		"read -P 0xa1 8M 64k",
		"read -P 0xa2 9M 128k",
		"read -P 0xa3 10M 4k",
		"read -P 0xa4 10489856 1M",
		"read -P 0xa5 12M 512k",
		"read -P 0 13M 1M",
		"read -P 0 14M 512k",
		"read -P 0xbb 15204352 512k", // 14M+512k
		"read -P 0 15M 512k",
		"read -P 0xbb 16252928 512k", // 15M+512k
	}
	qemuIO(t, uri, append(writes, verify...))
	// A new connection sees the same data.
	qemuIO(t, uri, verify)

	// The verification can fail: a wrong pattern must be reported.
	out, err := runTool(t, "qemu-io", "-f", "raw", "-c", "read -P 0x12 0 4k", uri)
	if err == nil && !qemuIOFailed(out) {
		t.Fatalf("qemu-io accepted a wrong pattern; the checks above prove nothing:\n%s", out)
	}
}

// runNbdcopy copies a random file of n bytes to the start of the export
// with nbdcopy (several connections, many requests in flight) and back,
// and compares checksums.
func runNbdcopy(t *testing.T, uri string, n int64) {
	t.Helper()
	needTool(t, "nbdcopy", "libnbd-bin")
	dir := t.TempDir()
	in := filepath.Join(dir, "in.img")
	f, err := os.Create(in)
	if err != nil {
		t.Fatalf("create input: %v", err)
	}
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(f, h), rand.Reader, n); err != nil {
		t.Fatalf("write input: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close input: %v", err)
	}
	want := h.Sum(nil)

	if out, err := runTool(t, "nbdcopy", "--flush", in, uri); err != nil {
		t.Fatalf("nbdcopy %s → export: %v\n%s", in, err, out)
	}
	out := filepath.Join(dir, "out.img")
	if o, err := runTool(t, "nbdcopy", uri, out); err != nil {
		t.Fatalf("nbdcopy export → %s: %v\n%s", out, err, o)
	}
	g, err := os.Open(out)
	if err != nil {
		t.Fatalf("open output: %v", err)
	}
	defer g.Close()
	h2 := sha256.New()
	if got, err := io.CopyN(h2, g, n); err != nil {
		t.Fatalf("read %d bytes of output (got %d): %v", n, got, err)
	}
	if got := h2.Sum(nil); !bytes.Equal(got, want) {
		t.Fatalf("copied-back data differs: sha256 %x, want %x", got, want)
	}
}

// runFio runs fio's nbd engine: 4 KiB random writes, 32 in flight, over
// the first n bytes, verified with crc32c.
func runFio(t *testing.T, uri string, n int64) {
	t.Helper()
	needTool(t, "fio", "fio")
	if out, err := runTool(t, "fio", "--enghelp=nbd"); err != nil {
		t.Skipf("fio has no nbd engine (%v): %s", err, out)
	}
	out, err := runTool(t, "fio", "--name=nbd-verify", "--ioengine=nbd", "--uri="+uri,
		"--rw=randwrite", "--bs=4k", "--iodepth=32", fmt.Sprintf("--size=%d", n),
		"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
		"--output-format=json")
	if err != nil {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	// fio may print warnings before the JSON document.
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	i := strings.Index(out, "{")
	if i < 0 {
		t.Fatalf("no JSON in fio output:\n%s", out)
	}
	if err := json.NewDecoder(strings.NewReader(out[i:])).Decode(&res); err != nil {
		t.Fatalf("parse fio output: %v\n%s", err, out)
	}
	if len(res.Jobs) != 1 {
		t.Fatalf("fio reported %d jobs, want 1\n%s", len(res.Jobs), out)
	}
	j := res.Jobs[0]
	if j.Error != 0 || j.Write.IOBytes != n || j.Read.IOBytes != n {
		t.Fatalf("fio job error %d, wrote %d, verified %d; want 0, %d, %d\n%s",
			j.Error, j.Write.IOBytes, j.Read.IOBytes, n, n, out)
	}
}

// runRealClients runs every real-client check against one export. size
// must be at least 64 MiB.
func runRealClients(t *testing.T, uri string, size, blockSize, maxRequest int64) {
	t.Run("nbdinfo", func(t *testing.T) { runNbdinfo(t, uri, size, blockSize, maxRequest) })
	t.Run("qemu-io", func(t *testing.T) { runQemuIOPatterns(t, uri, size) })
	t.Run("nbdcopy", func(t *testing.T) { runNbdcopy(t, uri, 64<<20) })
	t.Run("fio", func(t *testing.T) { runFio(t, uri, 64<<20) })
}

func TestRealClientsTCP(t *testing.T) {
	const size = 128 << 20
	dev := newTestDevice(t, size, 4096)
	srv := startServer(t, dev, Options{})
	runRealClients(t, srv.URI(), size, 4096, DefaultMaxRequest)
	md := dev.(*memDevice)
	t.Run("clients exercised every command", func(t *testing.T) {
		needTool(t, "qemu-io", "qemu-utils")
		if md.fuaWrites.Load() == 0 || md.flushes.Load() == 0 || md.discards.Load() == 0 || md.writeZeroes.Load() == 0 {
			t.Fatalf("clients never exercised FUA (%d), flush (%d), discard (%d) or write-zeroes (%d)",
				md.fuaWrites.Load(), md.flushes.Load(), md.discards.Load(), md.writeZeroes.Load())
		}
	})
	if n := md.invalid.Load(); n != 0 {
		t.Fatalf("%d invalid requests reached the device", n)
	}
}

func TestRealClientsUnix512(t *testing.T) {
	const size = 64 << 20
	dev := newTestDevice(t, size, 512)
	srv := startServer(t, dev, Options{Listen: "unix:" + filepath.Join(t.TempDir(), "nbd.sock"), MaxRequest: 4 << 20})
	t.Run("nbdinfo", func(t *testing.T) { runNbdinfo(t, srv.URI(), size, 512, 4<<20) })
	t.Run("qemu-io", func(t *testing.T) { runQemuIOPatterns(t, srv.URI(), size) })
}
