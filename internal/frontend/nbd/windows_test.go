package nbd

import (
	"bytes"
	"context"
	"hash/crc32"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/testutil"
)

// windowDevice is a memDevice that takes payloads in windows
// (frontend.WindowWriter) and keeps count of them: every window it hands
// out must come back, through WriteWindows or RecycleWindows, exactly
// once, and WriteWindows gets each window's checksum.
type windowDevice struct {
	*memDevice
	win int

	mu          sync.Mutex
	out         map[*byte]bool // windows handed out and not yet back
	writes      int
	badCRC      int
	doubleTaken int
}

func newWindowDevice(size, bs int64, win int) *windowDevice {
	return &windowDevice{memDevice: newMemDevice(size, bs), win: win, out: map[*byte]bool{}}
}

func (d *windowDevice) PayloadWindow() []byte {
	w := make([]byte, d.win)
	d.mu.Lock()
	d.out[&w[0]] = true
	d.mu.Unlock()
	return w
}

func (d *windowDevice) back(wins [][]byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, w := range wins {
		if w == nil || !d.out[&w[:1][0]] {
			d.doubleTaken++
			continue
		}
		delete(d.out, &w[:1][0])
	}
}

func (d *windowDevice) WriteWindows(ctx context.Context, wins [][]byte, crcs []uint32, n, off int64, fua bool) error {
	defer d.back(wins)
	table := crc32.MakeTable(crc32.Castagnoli)
	d.mu.Lock()
	d.writes++
	for i, w := range wins {
		if len(crcs) != len(wins) || crc32.Checksum(w, table) != crcs[i] {
			d.badCRC++
		}
	}
	d.mu.Unlock()
	var joined []byte
	for _, w := range wins {
		joined = append(joined, w...)
	}
	if int64(len(joined)) != n {
		d.invalid.Add(1)
	}
	return d.WriteAt(ctx, joined, off, fua)
}

func (d *windowDevice) RecycleWindows(wins [][]byte) { d.back(wins) }

func (d *windowDevice) outstanding() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.out)
}

// Writes of a window or more are read into the device's windows with
// their checksums and written where they belong; every window comes back
// to the device exactly once, also from a write refused after its
// payload was read and from a client that stalls inside a payload.
func TestWriteIntoDeviceWindows(t *testing.T) {
	const bs, win = 4096, 64 << 10
	dev := newWindowDevice(8<<20, bs, win)
	srv := startServer(t, dev, Options{stallTimeout: time.Second})
	if dev.outstanding() != 0 {
		t.Fatalf("%d windows out after the server started", dev.outstanding())
	}
	c := connect(t, srv.Addr(), "bs3")
	c.shortDeadline(10 * time.Second)
	// Sizes around the window, a partial last window, an unaligned
	// request (general path) and one that takes the inline path.
	for i, sz := range []int{win, win + bs, 3*win - bs, 1 << 20, 8 * bs} {
		c.mustRoundTrip(uint64(i)*(1<<20), sz, byte(i+1))
	}
	if errno := c.writeAt(uint64(5<<20+100), pattern(win, 9), 0); errno != 0 {
		t.Fatalf("unaligned write: errno %d", errno)
	}
	// Refused after its payload was read: it ends past the device.
	if errno := c.writeAt(uint64(8<<20-bs), pattern(2*win, 3), 0); errno != errInval {
		t.Fatalf("write past the end: errno %d, want EINVAL", errno)
	}
	c.disconnect()
	dev.mu.Lock()
	writes, bad, twice := dev.writes, dev.badCRC, dev.doubleTaken
	dev.mu.Unlock()
	if writes < 4 {
		t.Errorf("%d writes came in windows, want the 4 aligned ones of a window or more", writes)
	}
	if bad != 0 || twice != 0 {
		t.Errorf("%d windows with a wrong or missing checksum, %d given back twice or unknown", bad, twice)
	}
	if got := dev.snapshot(5<<20+100, win); !bytes.Equal(got, pattern(win, 9)) {
		t.Error("the unaligned write did not land")
	}

	// A client that stops inside a windowed payload is dropped, and the
	// windows it was being read into come back.
	stuck := connect(t, srv.Addr(), "bs3")
	stuck.send(1, 0, 1, 0, 4*win, pattern(win+100, 77))
	testutil.WaitWithin(t, ioDeadline, "the stalled connection's windows to come back", func() bool {
		return srv.activeConns() == 0 && dev.outstanding() == 0
	})
	if got := dev.snapshot(0, 100); bytes.Equal(got, pattern(win+100, 77)[:100]) {
		t.Error("the half-received write reached the device")
	}
	if dev.invalid.Load() != 0 {
		t.Errorf("%d invalid calls reached the device", dev.invalid.Load())
	}
}
