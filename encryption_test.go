package main

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestEncryptionWiring runs the daemon over a dir store with a key file
// and a disk cache: what it writes is not in the objects nor in the cache
// files in the clear, and the same volume started without the key is
// refused with a message that says so.
func TestEncryptionWiring(t *testing.T) {
	bin := buildDaemon(t)
	objects := t.TempDir()
	key := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(key, bytes.Repeat([]byte{0x5a}, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	cacheDir := t.TempDir()
	base := []string{"BS3_STORE=dir", "BS3_DIR_PATH=" + objects, "BS3_FRONTEND=nbd", "BS3_NBD_LISTEN=" + addr, "BS3_SIZE=1", "BS3_LOG_LEVEL=info",
		"BS3_CACHE_DIR=" + cacheDir}
	d := shutdownStart(t, bin, "NBD export", append(base, "BS3_ENCRYPTION_KEY_FILE="+key)...)
	pattern := bytes.Repeat([]byte("bs3 secret block "), 4096/17+1)[:4096]
	n := shutdownDialNBD(t, addr, "bs3")
	for i := range uint64(16) {
		n.write(t, i*4096, pattern, false)
	}
	n.flush(t)
	n.disconnect(t)
	d.signal(t, syscall.SIGTERM)
	if code := d.waitExit(t, time.Minute); code != 0 {
		t.Fatalf("exit status %d", code)
	}

	for what, dir := range map[string]string{"object": objects, "cache file": cacheDir} {
		found := 0
		err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
			if err != nil || e.IsDir() {
				return err
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			found++
			if bytes.Contains(b, pattern[:64]) {
				t.Errorf("%s %s holds written data in the clear", what, p)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if found == 0 {
			t.Fatalf("no %s was written", what)
		}
	}

	cmd := exec.Command(bin, "-c", "")
	cmd.Env = append(os.Environ(), base...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 0 {
		t.Fatalf("start without the key: %v, want a refusal\n%s", err, out)
	}
	if !strings.Contains(string(out), "volume is encrypted: set [encryption] key_file or passphrase_file") {
		t.Fatalf("refusal does not say the volume is encrypted:\n%s", out)
	}

	// bs3 passwd moves the volume to a passphrase: the old key stops
	// opening it, the passphrase opens it and the data reads back.
	pass := filepath.Join(t.TempDir(), "pass")
	if err := os.WriteFile(pass, []byte("correct horse battery staple\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd = exec.Command(bin, "-c", "", "passwd", "--new-passphrase-file", pass)
	cmd.Env = append(os.Environ(), append(base, "BS3_ENCRYPTION_KEY_FILE="+key)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("bs3 passwd: %v\n%s", err, out)
	}
	cmd = exec.Command(bin, "-c", "")
	cmd.Env = append(os.Environ(), append(base, "BS3_ENCRYPTION_KEY_FILE="+key)...)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "key") {
		t.Fatalf("start with the old key after passwd: %v, want a refusal naming the key\n%s", err, out)
	}
	d = shutdownStart(t, bin, "NBD export", append(base, "BS3_ENCRYPTION_PASSPHRASE_FILE="+pass)...)
	n = shutdownDialNBD(t, addr, "bs3")
	for i := range uint64(16) {
		if got := n.read(t, i*4096, 4096); !bytes.Equal(got, pattern) {
			t.Fatalf("block %d after passwd differs from what was written", i)
		}
	}
	n.disconnect(t)
	d.signal(t, syscall.SIGTERM)
	if code := d.waitExit(t, time.Minute); code != 0 {
		t.Fatalf("exit status %d", code)
	}
}
