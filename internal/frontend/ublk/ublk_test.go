package ublk

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/bs3/bs3/internal/frontend"
)

// fakeDevice records the calls the frontend makes.
type fakeDevice struct {
	mu    sync.Mutex
	calls []string
	err   error
}

func (f *fakeDevice) Size() int64      { return 1 << 30 }
func (f *fakeDevice) BlockSize() int64 { return 4096 }
func (f *fakeDevice) record(s string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, s)
	return f.err
}
func (f *fakeDevice) ReadAt(_ context.Context, p []byte, off int64) error {
	for i := range p {
		p[i] = 0xab
	}
	return f.record(fmt.Sprintf("read %d %d", off, len(p)))
}
func (f *fakeDevice) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	return f.record(fmt.Sprintf("write %d %d fua=%t", off, len(p), fua))
}
func (f *fakeDevice) Zero(_ context.Context, off, n int64, discard, fua bool) error {
	return f.record(fmt.Sprintf("zero %d %d discard=%t fua=%t", off, n, discard, fua))
}
func (f *fakeDevice) Flush(context.Context) error { return f.record("flush") }

func TestStartWithoutModule(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "ublk-control")
	_, err := Start(&fakeDevice{}, Options{QueueDepth: 8, BlockSize: 4096, ControlPath: missing, Logger: zerolog.Nop()})
	if !errors.Is(err, ErrNoModule) {
		t.Fatalf("Start without a control device: got %v, want ErrNoModule", err)
	}
	for _, want := range []string{"modprobe ublk_drv", `frontend = "nbd"`, `frontend = "fuse"`, missing} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if err := Available(missing); !errors.Is(err, ErrNoModule) {
		t.Errorf("Available: got %v, want ErrNoModule", err)
	}
}

func TestOptionsRefused(t *testing.T) {
	base := Options{QueueDepth: 8, BlockSize: 4096, ControlPath: "/nonexistent/ublk-control", Logger: zerolog.Nop()}
	for _, c := range []struct {
		name string
		mod  func(*Options)
		want string
	}{
		{"block size", func(o *Options) { o.BlockSize = 1024 }, "block size 1024"},
		{"block size differs", func(o *Options) { o.BlockSize = 512 }, "differs"},
		{"queue depth", func(o *Options) { o.QueueDepth = 0 }, "queue depth 0"},
		{"queue depth too deep", func(o *Options) { o.QueueDepth = 5000 }, "queue depth 5000"},
		{"io_min", func(o *Options) { o.IOMin = 6144 }, "io_min/io_opt 6144"},
		{"id", func(o *Options) { o.ID = -1 }, "device id -1"},
		{"max io", func(o *Options) { o.MaxIOBytes = 1000 }, "max I/O size 1000"},
	} {
		o := base
		c.mod(&o)
		_, err := Start(&fakeDevice{}, o)
		if err == nil || errors.Is(err, ErrNoModule) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error naming %q before the control device is opened", c.name, err, c.want)
		}
	}
}

func TestServeMapsRequests(t *testing.T) {
	f := &fakeDevice{}
	d := &Device{dev: f, log: zerolog.Nop(), ctx: context.Background()}
	buf := make([]byte, 64<<10)
	for _, c := range []struct {
		desc ioDesc
		want string
		res  int32
	}{
		{ioDesc{OpFlags: opRead, StartSector: 8, NrSectors: 16}, "read 4096 8192", 8192},
		{ioDesc{OpFlags: opWrite, StartSector: 16, NrSectors: 8}, "write 8192 4096 fua=false", 4096},
		{ioDesc{OpFlags: opWrite | ioFlagFUA, StartSector: 16, NrSectors: 8}, "write 8192 4096 fua=true", 4096},
		{ioDesc{OpFlags: opFlush}, "flush", 0},
		{ioDesc{OpFlags: opDiscard, StartSector: 8, NrSectors: 2048}, "zero 4096 1048576 discard=true fua=false", 0},
		{ioDesc{OpFlags: opWriteZeroes, StartSector: 8, NrSectors: 8}, "zero 4096 4096 discard=false fua=false", 0},
	} {
		f.calls = nil
		if res := d.serve(buf, c.desc); res != c.res {
			t.Errorf("%s: result %d, want %d", c.want, res, c.res)
		}
		if len(f.calls) != 1 || f.calls[0] != c.want {
			t.Errorf("op %d: calls %q, want [%q]", c.desc.OpFlags, f.calls, c.want)
		}
	}
	if buf[0] != 0xab || buf[8191] != 0xab {
		t.Errorf("read did not fill the request's buffer")
	}

	f.calls = nil
	if res := d.serve(buf, ioDesc{OpFlags: opWriteSame, NrSectors: 8}); res != -int32(unix.EOPNOTSUPP) {
		t.Errorf("WRITE_SAME: result %d, want -EOPNOTSUPP", res)
	}
	if len(f.calls) != 0 {
		t.Errorf("WRITE_SAME reached the device: %q", f.calls)
	}
	if res := d.serve(buf, ioDesc{OpFlags: opRead, NrSectors: 256}); res != -int32(unix.EINVAL) {
		t.Errorf("read larger than its buffer: result %d, want -EINVAL", res)
	}
	f.err = frontend.ErrInvalid
	if res := d.serve(buf, ioDesc{OpFlags: opWrite, NrSectors: 8}); res != -int32(unix.EINVAL) {
		t.Errorf("refused write: result %d, want -EINVAL", res)
	}
	f.err = errors.New("store down")
	if res := d.serve(buf, ioDesc{OpFlags: opFlush}); res != -int32(unix.EIO) {
		t.Errorf("failed flush: result %d, want -EIO", res)
	}
}

// The ring itself, on the host kernel: an eventfd read completes through
// a 128-byte SQE and a 32-byte CQE, the way a queue thread is woken.
func TestRingEventfdRead(t *testing.T) {
	r, err := newRing(4)
	if err != nil {
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EINVAL) {
			t.Skipf("io_uring with SQE128/CQE32 unavailable here: %v", err)
		}
		t.Fatal(err)
	}
	defer func() {
		if err := r.close(); err != nil {
			t.Errorf("close: %v", err)
		}
	}()
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	for round := uint64(1); round <= 6; round++ { // more rounds than entries: the rings wrap
		s, _, err := r.next()
		if err != nil {
			t.Fatal(err)
		}
		s.Opcode = opReadFile
		s.Fd = int32(efd)
		s.Addr = uint64(uintptr(unsafe.Pointer(&buf[0])))
		s.Len = 8
		s.UserData = wakeTag | round
		if err := r.enter(false); err != nil {
			t.Fatal(err)
		}
		var v [8]byte
		v[0] = byte(round)
		if _, err := unix.Write(efd, v[:]); err != nil {
			t.Fatal(err)
		}
		var got []cqe
		for len(got) == 0 {
			if err := r.enter(true); err != nil {
				t.Fatal(err)
			}
			r.reap(func(c *cqe) { got = append(got, *c) })
		}
		if len(got) != 1 || got[0].UserData != wakeTag|round || got[0].Res != 8 || buf[0] != byte(round) {
			t.Fatalf("round %d: CQEs %+v, buffer %d; want one with user_data %#x, res 8, buffer %d", round, got, buf[0], wakeTag|round, round)
		}
	}
}
