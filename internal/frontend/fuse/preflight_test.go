package fuse

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{
		`/mnt/a\040b`: "/mnt/a b",
		`/plain`:      "/plain",
		`/tab\011x`:   "/tab\tx",
		`/trail\04`:   `/trail\04`,
	} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}

// Preflight refuses a mountpoint that is a file or already has something
// mounted on it, and creates a missing one, all before anything mounts.
func TestPreflightMountpoint(t *testing.T) {
	if _, err := os.Stat(fuseDevice); err != nil {
		t.Skipf("no %s: %v", fuseDevice, err)
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Preflight(Options{Mountpoint: file}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("Preflight on a file: %v, want 'not a directory'", err)
	}
	missing := filepath.Join(dir, "new", "mp")
	if err := Preflight(Options{Mountpoint: missing}); err != nil {
		t.Errorf("Preflight on a missing mountpoint: %v", err)
	} else if fi, err := os.Stat(missing); err != nil || !fi.IsDir() {
		t.Errorf("Preflight did not create the mountpoint %s: %v", missing, err)
	}
	if err := Preflight(Options{}); err == nil {
		t.Error("Preflight without a mountpoint passed")
	}

	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	busy := filepath.Join(dir, "busy")
	if err := os.Mkdir(busy, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "bs3test", busy).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs: %v %s", err, out)
	}
	defer func() {
		if out, err := exec.Command("umount", busy).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", busy, err, out)
		}
	}()
	err := Preflight(Options{Mountpoint: busy})
	if err == nil || !strings.Contains(err.Error(), "busy") || !strings.Contains(err.Error(), busy) {
		t.Errorf("Preflight on a mounted directory: %v, want busy naming %s", err, busy)
	}
}
