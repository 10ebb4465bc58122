package buse

import "os"

// Preflight checks that the BUSE module is loaded, without configuring a
// device: bs3 runs it before it attaches the volume, so that a missing
// module fails the start before anything is claimed in the bucket.
func Preflight() error {
	if _, err := os.Stat(configfsRoot); err != nil {
		return ErrNoModule
	}
	return nil
}
