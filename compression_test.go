package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestCompressionWiring runs the daemon over a dir store with zstd: the
// data objects are stored compressed and the marker exists; restarted
// with codec "none" the data reads back; bs3 check passes; an unknown
// codec is refused naming the allowed ones.
func TestCompressionWiring(t *testing.T) {
	bin := buildDaemon(t)
	objects := t.TempDir()
	addr := freeAddr(t)
	base := []string{"BS3_STORE=dir", "BS3_DIR_PATH=" + objects, "BS3_FRONTEND=nbd", "BS3_NBD_LISTEN=" + addr, "BS3_SIZE=1", "BS3_LOG_LEVEL=info"}
	block := func(i uint64) []byte {
		return []byte(fmt.Sprintf("%-4096s", strings.Repeat(fmt.Sprintf("block %d of a compressible volume; ", i), 120)))[:4096]
	}
	const blocks = 256
	d := shutdownStart(t, bin, "NBD export", append(base, "BS3_COMPRESSION_CODEC=zstd")...)
	n := shutdownDialNBD(t, addr, "bs3")
	for i := range uint64(blocks) {
		n.write(t, i*4096, block(i), false)
	}
	n.flush(t)
	n.disconnect(t)
	d.signal(t, syscall.SIGTERM)
	if code := d.waitExit(t, time.Minute); code != 0 {
		t.Fatalf("exit status %d", code)
	}
	if _, err := os.Stat(filepath.Join(objects, "compression")); err != nil {
		t.Fatalf("no compression marker object: %v", err)
	}
	var stored int64
	compressedObjects := 0
	dirs, _ := filepath.Glob(filepath.Join(objects, "????????", "????????"))
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		stored += int64(len(b))
		// The volume is checksummed (the default): the compressed body
		// starts after the first segment's 16-byte salt (ARCHITECTURE §16.6).
		if len(b) > 16 && bytes.HasPrefix(b[16:], []byte("BS3CMPR\x00")) {
			compressedObjects++
		}
	}
	if compressedObjects == 0 || stored*2 > blocks*4096 {
		t.Fatalf("%d compressed data objects, %d bytes stored for %d written", compressedObjects, stored, blocks*4096)
	}

	d = shutdownStart(t, bin, "NBD export", append(base, "BS3_COMPRESSION_CODEC=none")...)
	n = shutdownDialNBD(t, addr, "bs3")
	for i := range uint64(blocks) {
		if got := n.read(t, i*4096, 4096); !bytes.Equal(got, block(i)) {
			t.Fatalf("block %d differs after a restart with codec none", i)
		}
	}
	n.disconnect(t)
	d.signal(t, syscall.SIGTERM)
	if code := d.waitExit(t, time.Minute); code != 0 {
		t.Fatalf("exit status %d", code)
	}

	cmd := exec.Command(bin, "-c", "", "check")
	cmd.Env = append(os.Environ(), base...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("bs3 check of a compressed volume: %v\n%s", err, out)
	}

	cmd = exec.Command(bin, "-c", "")
	cmd.Env = append(os.Environ(), append(base, "BS3_COMPRESSION_CODEC=gzip")...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 0 {
		t.Fatalf("start with codec gzip: %v, want a refusal\n%s", err, out)
	}
	if !strings.Contains(string(out), "compression.codec") || !strings.Contains(string(out), "none, zstd, lz4, s2") {
		t.Fatalf("refusal does not name the key and the allowed codecs:\n%s", out)
	}
}
