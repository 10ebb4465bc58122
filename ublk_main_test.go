package main

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/config"
	"github.com/bs3/bs3/internal/frontend/ublk"
)

// Without the ublk driver, bs3 stops before it attaches the volume (no
// lease taken, nothing written) and says what to do.
func TestUBLKWithoutModule(t *testing.T) {
	if _, err := os.Stat(ublk.DefaultControlPath); err == nil {
		t.Skipf("%s exists: this kernel has the ublk driver", ublk.DefaultControlPath)
	}
	cfg := config.Default()
	cfg.Frontend = config.FrontendUBLK
	cfg.Store = config.StoreDir
	cfg.Dir.Path = t.TempDir()
	cfg.Size = 1
	if err := cfg.Validate(); err != nil {
		t.Fatalf("config: %v", err)
	}
	var log syncBuffer
	err := serve(cfg, false, zerolog.New(&log))
	if err == nil {
		t.Fatal("serve with frontend = ublk and no ublk driver: no error")
	}
	for _, want := range []string{"modprobe ublk_drv", `"nbd"`, `"fuse"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
	var files []string
	if err := filepath.WalkDir(cfg.Dir.Path, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			files = append(files, p)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if len(files) > 0 {
		t.Errorf("the store was written although the frontend cannot start: %q", files)
	}
}
