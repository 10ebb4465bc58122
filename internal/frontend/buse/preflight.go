package buse

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// Preflight checks that the BUSE module is loaded and that device major
// is free, without configuring anything: bs3 runs it before it attaches
// the volume, so that a device that cannot be created fails the start
// before anything is claimed in the bucket.
func Preflight(major int64) error {
	if _, err := os.Stat(configfsRoot); err != nil {
		return ErrNoModule
	}
	dev := filepath.Join(configfsRoot, strconv.FormatInt(major, 10))
	_, err := os.Stat(dev)
	switch {
	case err == nil:
		return fmt.Errorf("BUSE device /dev/buse%d is already configured (%s exists): another bs3 runs it, or one crashed; stop it, or set major to a free number", major, dev)
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("check BUSE device %d: %w", major, err)
	}
	return nil
}
