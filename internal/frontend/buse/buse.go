// Package buse attaches an engine to the BUSE kernel module
// (/dev/buseN) through github.com/asch/buse/lib/go/buse. The kernel module
// builds the write chunks itself; this package only checks that the module
// is there, passes the options through and stops the device cleanly.
package buse

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	"github.com/asch/buse/lib/go/buse"
	"github.com/rs/zerolog"
)

// configfsRoot is where the BUSE module exposes its devices.
const configfsRoot = "/sys/kernel/config/buse"

// ErrNoModule means the BUSE kernel module is not loaded.
var ErrNoModule = errors.New("the BUSE kernel module is not loaded (no " + configfsRoot + "): load it with `modprobe buse` (it builds on Linux 5.11–5.18 only), or set frontend = \"nbd\" or frontend = \"fuse\" in the configuration")

// Options are passed through to the BUSE library.
type Options = buse.Options

// Device is a running BUSE device.
type Device struct {
	b        buse.Buse
	major    int64
	done     chan struct{} // closed when the queues have stopped
	ended    chan error    // one value when they have, then closed
	stopping atomic.Bool   // Stop has started: the end is ours
	log      zerolog.Logger
}

// Start checks for the module, configures /dev/buse<Major> and serves it
// in the background.
func Start(rw buse.BuseReadWriter, o Options, log zerolog.Logger) (*Device, error) {
	if _, err := os.Stat(configfsRoot); err != nil {
		return nil, ErrNoModule
	}
	b, err := buse.New(rw, o)
	if err != nil {
		return nil, fmt.Errorf("configure /dev/buse%d: %w", o.Major, err)
	}
	d := &Device{b: b, major: o.Major, done: make(chan struct{}), ended: make(chan error, 1), log: log}
	go func() {
		b.Run()
		close(d.done)
		d.ended <- d.endErr()
		close(d.ended)
	}()
	log.Info().Str("device", fmt.Sprintf("/dev/buse%d", o.Major)).Msg("BUSE device running")
	return d, nil
}

// endErr says why the queues stopped: nil after Stop, an error otherwise.
func (d *Device) endErr() error {
	if d.stopping.Load() {
		return nil
	}
	err := fmt.Errorf("BUSE device /dev/buse%d stopped serving requests (powered off from outside, e.g. through %s/%d/power?)", d.major, configfsRoot, d.major)
	d.log.Error().Err(err).Msg("BUSE device ended")
	return err
}

// Done returns a channel that receives one value when the device's queues
// stop and is closed after it: nil when Stop stopped them, an error when
// they stopped by themselves, after which the device serves nothing.
func (d *Device) Done() <-chan error { return d.ended }

// Stop powers the device off, waits for the queues to drain and removes
// the device.
func (d *Device) Stop() error {
	d.stopping.Store(true)
	if err := d.b.StopDevice(); err != nil {
		return fmt.Errorf("stop BUSE device: %w", err)
	}
	<-d.done
	if err := d.b.RemoveDevice(); err != nil {
		return fmt.Errorf("remove BUSE device: %w", err)
	}
	return nil
}
