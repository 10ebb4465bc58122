package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/testutil"
)

func TestCommandsReachDevice(t *testing.T) {
	const bs = 4096
	dev := newMemDevice(8<<20, bs)
	srv := startServer(t, dev, Options{})
	c := connect(t, srv.Addr(), "bs3")

	data := pattern(64<<10, 1)
	if e := c.writeAt(0, data, 0); e != 0 {
		t.Fatalf("write: error %d", e)
	}
	if e := c.writeAt(1<<20, data, 1 /* FUA */); e != 0 {
		t.Fatalf("FUA write: error %d", e)
	}
	if got := dev.snapshot(1<<20, int64(len(data))); !bytes.Equal(got, data) {
		t.Fatalf("FUA write did not reach the device")
	}
	if w, f := dev.writes.Load(), dev.fuaWrites.Load(); w != 2 || f != 1 {
		t.Fatalf("device saw %d writes, %d with fua; want 2 and 1", w, f)
	}
	if e, _ := c.do(3, 0, 0, 0, nil); e != 0 {
		t.Fatalf("flush: error %d", e)
	}
	if n := dev.flushes.Load(); n != 1 {
		t.Fatalf("device saw %d flushes, want 1", n)
	}

	zeros := make([]byte, 8*bs)
	// TRIM → Zero(discard=true); the data reads as zeros.
	if e, _ := c.do(4, 0, 0, 8*bs, nil); e != 0 {
		t.Fatalf("trim: error %d", e)
	}
	if d, z := dev.discards.Load(), dev.writeZeroes.Load(); d != 1 || z != 0 {
		t.Fatalf("after trim: %d discards, %d write-zeroes; want 1, 0", d, z)
	}
	if e, got := c.readAt(0, 8*bs); e != 0 || !bytes.Equal(got, zeros) {
		t.Fatalf("trimmed range does not read as zeros (error %d)", e)
	}
	if e, got := c.readAt(8*bs, 8*bs); e != 0 || !bytes.Equal(got, data[8*bs:16*bs]) {
		t.Fatalf("data after the trimmed range changed (error %d)", e)
	}
	// WRITE_ZEROES with NO_HOLE → discard=false, with FUA.
	if e, _ := c.do(6, 2|1, 1<<20, 8*bs, nil); e != 0 {
		t.Fatalf("write zeroes NO_HOLE: error %d", e)
	}
	if d, z, f := dev.discards.Load(), dev.writeZeroes.Load(), dev.fuaZeroes.Load(); d != 1 || z != 1 || f != 1 {
		t.Fatalf("after write zeroes NO_HOLE|FUA: %d discards, %d write-zeroes, %d fua; want 1, 1, 1", d, z, f)
	}
	if e, got := c.readAt(1<<20, 8*bs); e != 0 || !bytes.Equal(got, zeros) {
		t.Fatalf("zeroed range does not read as zeros (error %d)", e)
	}
	// WRITE_ZEROES without NO_HOLE may punch a hole → discard=true.
	if e, _ := c.do(6, 0, 1<<20+8*bs, 8*bs, nil); e != 0 {
		t.Fatalf("write zeroes: error %d", e)
	}
	if d, z := dev.discards.Load(), dev.writeZeroes.Load(); d != 2 || z != 1 {
		t.Fatalf("after write zeroes: %d discards, %d write-zeroes; want 2, 1", d, z)
	}
	if e, got := c.readAt(1<<20+8*bs, 8*bs); e != 0 || !bytes.Equal(got, zeros) {
		t.Fatalf("zeroed range does not read as zeros (error %d)", e)
	}
	c.disconnect()
}

func TestDeviceErrorsMapToNBDErrors(t *testing.T) {
	const bs = 4096
	dev := newMemDevice(8<<20, bs)
	srv := startServer(t, dev, Options{})
	c := connect(t, srv.Addr(), "bs3")
	boom := errors.New("object store unreachable")
	dev.setHook(func(op string, off, _ int64) error {
		switch {
		case off == 1<<20:
			return fmt.Errorf("%s: %w", op, boom)
		case off == 2<<20:
			return fmt.Errorf("%s: %w", op, frontend.ErrInvalid)
		case op == "flush":
			return boom
		}
		return nil
	})
	for _, k := range []struct {
		name string
		typ  uint16
		off  uint64
		want uint32
	}{
		{"read EIO", 0, 1 << 20, nbdEIO},
		{"write EIO", 1, 1 << 20, nbdEIO},
		{"trim EIO", 4, 1 << 20, nbdEIO},
		{"write zeroes EIO", 6, 1 << 20, nbdEIO},
		{"read ErrInvalid", 0, 2 << 20, nbdEINVAL},
		{"write ErrInvalid", 1, 2 << 20, nbdEINVAL},
		{"flush EIO", 3, 0, nbdEIO},
	} {
		var payload []byte
		length := uint32(bs)
		if k.typ == 1 {
			payload = pattern(bs, 5)
		}
		if k.typ == 3 {
			length = 0
		}
		// A failed read sends no data: the next reply must follow at once.
		if e, _ := c.do(k.typ, 0, k.off, length, payload); e != k.want {
			t.Fatalf("%s: error %d, want %d", k.name, e, k.want)
		}
	}
	c.mustRoundTrip(0, bs, 6)
	c.disconnect()
}

// TestOutOfOrderReplies holds one read in the device while a later one
// completes: the later reply must come first, each with its own handle
// and data.
func TestOutOfOrderReplies(t *testing.T) {
	const bs = 4096
	dev := newMemDevice(8<<20, bs)
	a, b := pattern(16*bs, 7), pattern(4*bs, 8)
	copy(dev.data[1<<20:], a)
	copy(dev.data[2<<20:], b)
	entered, release := make(chan struct{}), make(chan struct{})
	dev.setHook(func(op string, off, _ int64) error {
		if op == "read" && off == 1<<20 {
			close(entered)
			<-release
		}
		return nil
	})
	srv := startServer(t, dev, Options{})
	c := connect(t, srv.Addr(), "bs3")

	c.send(0, 0, 111, 1<<20, uint32(len(a)), nil)
	<-entered
	c.send(0, 0, 222, 2<<20, uint32(len(b)), nil)
	// A write behind the blocked read completes too.
	w := pattern(bs, 9)
	c.send(1, 0, 333, 3<<20, bs, w)
	seen := map[uint64]bool{}
	for range 2 {
		e, h := c.recvReply()
		if e != 0 {
			t.Fatalf("reply %d: error %d", h, e)
		}
		switch h {
		case 222:
			if got := c.readN(len(b)); !bytes.Equal(got, b) {
				t.Fatalf("read 222 returned wrong data")
			}
		case 333:
		default:
			t.Fatalf("reply for handle %d while 111 is held in the device; want 222 or 333", h)
		}
		seen[h] = true
	}
	if !seen[222] || !seen[333] {
		t.Fatalf("replies seen %v, want 222 and 333", seen)
	}
	close(release)
	e, h := c.recvReply()
	if e != 0 || h != 111 {
		t.Fatalf("last reply: handle %d error %d, want 111 and 0", h, e)
	}
	if got := c.readN(len(a)); !bytes.Equal(got, a) {
		t.Fatalf("read 111 returned wrong data")
	}
	if got := dev.snapshot(3<<20, bs); !bytes.Equal(got, w) {
		t.Fatalf("write 333 not applied")
	}
	c.disconnect()
}

// TestConcurrentPipelined runs several connections that each keep many
// writes and then reads in flight, with the device completing them in a
// shuffled order; every reply must carry its request's handle and data.
func TestConcurrentPipelined(t *testing.T) {
	const (
		bs        = 4096
		conns     = 4
		perConn   = 300
		region    = 16 << 20 // each connection owns one region
		maxBlocks = 8
	)
	dev := newMemDevice(conns*region, bs)
	shuffleCompletions(dev)
	srv := startServer(t, dev, Options{})
	pipelineConns(t, srv, conns, region, perConn, maxBlocks, bs)
}

// shuffleCompletions makes a quarter of dev's calls take up to 200 µs, so
// requests complete in a shuffled order; correctness must not depend on it.
func shuffleCompletions(dev *memDevice) {
	dev.setHook(func(string, int64, int64) error {
		if rand.IntN(4) == 0 {
			time.Sleep(time.Duration(rand.IntN(200)) * time.Microsecond)
		}
		return nil
	})
}

// pipelineConns runs pipeline on conns connections to srv at once, each
// in its own region of the device, and fails t with every error.
func pipelineConns(t *testing.T, srv *Server, conns, region, perConn, maxBlocks, bs int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for ci := range conns {
		c := connect(t, srv.Addr(), "bs3")
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- pipeline(c, uint64(ci*region), region, perConn, maxBlocks, bs, uint64(ci))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

type pendingReq struct {
	typ  uint16
	off  uint64
	data []byte // written data (write) or expected data (read)
}

// pipeline sends n random writes within [base, base+region) without waiting,
// then reads each back the same way, checking every reply by handle. It
// returns an error instead of failing the test (it runs off the test
// goroutine).
func pipeline(c *rawClient, base uint64, region, n, maxBlocks, bs int, id uint64) error {
	model := make([]byte, region)
	var mu sync.Mutex
	pending := map[uint64]pendingReq{}
	replies := make(chan error, 1)

	recv := func(count int) {
		for range count {
			h := make([]byte, 16)
			if _, err := io.ReadFull(c.r, h); err != nil {
				replies <- fmt.Errorf("conn %d: read reply: %w", id, err)
				return
			}
			if m := binary.BigEndian.Uint32(h); m != 0x67446698 {
				replies <- fmt.Errorf("conn %d: reply magic %#x", id, m)
				return
			}
			errno, handle := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
			mu.Lock()
			p, ok := pending[handle]
			delete(pending, handle)
			mu.Unlock()
			if !ok {
				replies <- fmt.Errorf("conn %d: reply for unknown or repeated handle %#x", id, handle)
				return
			}
			if errno != 0 {
				replies <- fmt.Errorf("conn %d: handle %#x failed with %d", id, handle, errno)
				return
			}
			if p.typ == 0 {
				got := make([]byte, len(p.data))
				if _, err := io.ReadFull(c.r, got); err != nil {
					replies <- fmt.Errorf("conn %d: read data: %w", id, err)
					return
				}
				if !bytes.Equal(got, p.data) {
					replies <- fmt.Errorf("conn %d: read %d@%d (handle %#x) returned wrong data", id, len(got), p.off, handle)
					return
				}
			}
		}
		replies <- nil
	}

	send := func(typ uint16, handle, off uint64, data []byte) error {
		mu.Lock()
		pending[handle] = pendingReq{typ: typ, off: off, data: data}
		mu.Unlock()
		hdr := make([]byte, 28)
		binary.BigEndian.PutUint32(hdr[0:], 0x25609513)
		binary.BigEndian.PutUint16(hdr[6:], typ)
		binary.BigEndian.PutUint64(hdr[8:], handle)
		binary.BigEndian.PutUint64(hdr[16:], off)
		binary.BigEndian.PutUint32(hdr[24:], uint32(len(data)))
		if typ == 1 {
			hdr = append(hdr, data...)
		}
		_, err := c.nc.Write(hdr)
		return err
	}

	rng := rand.New(rand.NewPCG(id, 42))
	type span struct{ off, n int }
	spans := make([]span, n)
	// Writes to distinct blocks so the final model does not depend on the
	// order in which concurrent overlapping writes land.
	perm := rng.Perm(region / bs / maxBlocks)
	for i := range spans {
		slot := perm[i%len(perm)]
		spans[i] = span{off: slot * maxBlocks * bs, n: (1 + rng.IntN(maxBlocks)) * bs}
	}
	if n > len(perm) {
		return fmt.Errorf("n %d exceeds %d distinct slots", n, len(perm))
	}
	go recv(n)
	for i, s := range spans {
		data := make([]byte, s.n)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		copy(model[s.off:], data)
		if err := send(1, id<<32|uint64(i), base+uint64(s.off), data); err != nil {
			return fmt.Errorf("conn %d: send write: %w", id, err)
		}
	}
	if err := <-replies; err != nil {
		return err
	}
	go recv(n)
	for i, s := range spans {
		want := model[s.off : s.off+s.n]
		if err := send(0, id<<32|uint64(n+i), base+uint64(s.off), want); err != nil {
			return fmt.Errorf("conn %d: send read: %w", id, err)
		}
	}
	return <-replies
}

// TestCloseWaitsForInFlight holds a write in the device while Close runs:
// Close must not return before the write completes, the client must get
// the write's reply, and the data must be on the device.
func TestCloseWaitsForInFlight(t *testing.T) {
	const bs = 4096
	dev := newMemDevice(8<<20, bs)
	entered, release := make(chan struct{}), make(chan struct{})
	dev.setHook(func(op string, off, _ int64) error {
		if op == "write" && off == 1<<20 {
			close(entered)
			<-release
		}
		return nil
	})
	srv, err := New(dev, Options{Listen: "127.0.0.1:0", Export: "bs3", Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve() }()

	c := connect(t, srv.Addr(), "bs3")
	w := pattern(8*bs, 11)
	c.send(1, 0, 77, 1<<20, uint32(len(w)), w)
	<-entered
	// A second, idle connection must be closed too.
	idle := connect(t, srv.Addr(), "bs3")

	closed := make(chan error, 1)
	go func() { closed <- srv.Close() }()
	// Serve returns as soon as the listener is closed.
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a write was still in the device", err)
	default:
	}
	idle.expectClosed()
	close(release)
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	e, h := c.recvReply()
	if e != 0 || h != 77 {
		t.Fatalf("reply handle %d error %d, want 77 and 0", h, e)
	}
	c.expectClosed()
	if got := dev.snapshot(1<<20, int64(len(w))); !bytes.Equal(got, w) {
		t.Fatalf("in-flight write not applied")
	}
	if _, err := net.Dial("tcp", srv.Addr()); err == nil {
		t.Fatalf("server still accepts after Close")
	}
	if err := srv.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestCloseDropsPartialWrite closes the server while a write's payload is
// only partly received: the write must not reach the device.
func TestCloseDropsPartialWrite(t *testing.T) {
	const bs = 4096
	dev := newMemDevice(8<<20, bs)
	srv, err := New(dev, Options{Listen: "127.0.0.1:0", Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	go func() {
		if err := srv.Serve(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	c := connect(t, srv.Addr(), DefaultExport)
	c.mustRoundTrip(0, bs, 1) // the connection is in the transmission phase
	w := pattern(8*bs, 12)
	c.send(1, 0, 5, 1<<20, uint32(len(w)), w[:len(w)/2])
	if err := srv.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	c.expectClosed()
	if got := dev.snapshot(1<<20, int64(len(w))); !bytes.Equal(got, make([]byte, len(w))) {
		t.Fatalf("half-received write reached the device")
	}
	if n := dev.writes.Load(); n != 1 {
		t.Fatalf("device saw %d writes, want 1 (the round trip only)", n)
	}
}

func TestUnixSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "nbd.sock")

	// A stale socket left by a crashed daemon is replaced.
	stale, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := stale.Close(); err != nil {
		t.Fatalf("close stale listener: %v", err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket file missing: %v", err)
	}

	dev := newMemDevice(8<<20, 4096)
	srv := startServer(t, dev, Options{Listen: "unix:" + path})
	if got := srv.Addr(); got != "unix:"+path {
		t.Fatalf("Addr %q, want %q", got, "unix:"+path)
	}
	if got, want := srv.URI(), "nbd+unix:///bs3?socket="; !strings.HasPrefix(got, want) {
		t.Fatalf("URI %q, want prefix %q", got, want)
	}
	c := connect(t, srv.Addr(), "bs3")
	c.mustRoundTrip(0, 64<<10, 3)

	// A live socket is not stolen.
	if _, err := New(dev, Options{Listen: "unix:" + path, Logger: testLogger(t)}); err == nil {
		t.Fatalf("New on a socket another server listens on succeeded")
	}
	c.mustRoundTrip(0, 4096, 4)
	c.disconnect()

	// A regular file is never deleted.
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("keep"), 0o600); err != nil {
		t.Fatalf("write file: %v", err)
	}
	if _, err := New(dev, Options{Listen: "unix:" + file, Logger: testLogger(t)}); err == nil {
		t.Fatalf("New on a regular file succeeded")
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep" {
		t.Fatalf("regular file changed: %q %v", b, err)
	}
}

func TestNewValidates(t *testing.T) {
	for _, k := range []struct {
		name string
		dev  frontend.Device
		o    Options
	}{
		{"block size not a power of two", newMemDevice(3000*16, 3000), Options{}},
		{"block size over 64 KiB", newMemDevice(1<<20, 128<<10), Options{}},
		{"size not a multiple of the block size", newMemDevice(4096*3+512, 4096), Options{}},
		{"max request not a multiple of the block size", newMemDevice(1<<20, 4096), Options{MaxRequest: 6000}},
		{"max request below the block size", newMemDevice(1<<20, 4096), Options{MaxRequest: 512}},
		{"max request over 4 GiB", newMemDevice(1<<20, 4096), Options{MaxRequest: 8 << 30}},
		{"bad address", newMemDevice(1<<20, 4096), Options{Listen: "127.0.0.1:notaport"}},
		{"empty address", newMemDevice(1<<20, 4096), Options{Listen: ""}},
		{"long export name", newMemDevice(1<<20, 4096), Options{Export: strings.Repeat("x", 5000)}},
	} {
		t.Run(k.name, func(t *testing.T) {
			o := k.o
			if o.Listen == "" && k.name != "empty address" {
				o.Listen = "127.0.0.1:0"
			}
			o.Logger = testLogger(t)
			s, err := New(k.dev, o)
			if err == nil {
				if cerr := s.Close(); cerr != nil {
					t.Errorf("Close: %v", cerr)
				}
				t.Fatalf("New succeeded, want an error")
			}
		})
	}
}

func TestDefaults(t *testing.T) {
	dev := newMemDevice(64<<20, 512)
	srv := startServer(t, dev, Options{Export: DefaultExport})
	c := dialRaw(t, srv.Addr())
	c.greet(3)
	c.sendOpt(6, infoData("bs3", 3))
	ei, final := c.readInfoReplies(6)
	if final.typ != repACK {
		t.Fatalf("NBD_OPT_INFO: %#x", final.typ)
	}
	if ei.minBS != 1 || ei.prefBS != 512 || ei.maxBS != 32<<20 {
		t.Fatalf("block sizes %d/%d/%d, want 1/512/33554432", ei.minBS, ei.prefBS, ei.maxBS)
	}
	if !strings.HasPrefix(srv.URI(), "nbd://127.0.0.1:") || !strings.HasSuffix(srv.URI(), "/bs3") {
		t.Fatalf("URI %q", srv.URI())
	}
	if strings.HasSuffix(srv.Addr(), ":0") {
		t.Fatalf("Addr %q does not show the real port", srv.Addr())
	}
	// A full 32 MiB read and write are accepted.
	c.goExport("bs3")
	big := pattern(32<<20, 13)
	if e := c.writeAt(0, big, 0); e != 0 {
		t.Fatalf("32 MiB write: error %d", e)
	}
	if e, got := c.readAt(0, 32<<20); e != 0 || !bytes.Equal(got, big) {
		t.Fatalf("32 MiB read: error %d or wrong data", e)
	}
}

// TestRepliesMixedInFlight keeps writes (whose replies are batched while
// another goroutine sends) and reads (whose replies carry data and are
// sent alone) in flight together on one connection, with completions
// shuffled: every request gets exactly one reply, each read its own data,
// and every write lands.
func TestRepliesMixedInFlight(t *testing.T) {
	const (
		bs = 4096
		n  = 600
	)
	dev := newMemDevice(8<<20, bs)
	fill := make([]byte, 4<<20) // the read half: known content
	for i := range fill {
		fill[i] = byte(i*13 + i/bs)
	}
	if err := dev.WriteAt(context.Background(), fill, 4<<20, false); err != nil {
		t.Fatal(err)
	}
	dev.setHook(func(string, int64, int64) error {
		if rand.IntN(3) == 0 {
			time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
		}
		return nil
	})
	srv := startServer(t, dev, Options{})
	c := connect(t, srv.Addr(), "bs3")

	type want struct {
		read bool
		data []byte
	}
	var mu sync.Mutex
	pending := map[uint64]want{}
	done := make(chan error, 1)
	go func() {
		for range n {
			h := make([]byte, 16)
			if _, err := io.ReadFull(c.r, h); err != nil {
				done <- fmt.Errorf("read reply: %w", err)
				return
			}
			handle := binary.BigEndian.Uint64(h[8:])
			mu.Lock()
			w, ok := pending[handle]
			delete(pending, handle)
			mu.Unlock()
			if binary.BigEndian.Uint32(h) != 0x67446698 || !ok || binary.BigEndian.Uint32(h[4:]) != 0 {
				done <- fmt.Errorf("bad reply %x (known handle %v)", h, ok)
				return
			}
			if w.read {
				got := make([]byte, len(w.data))
				if _, err := io.ReadFull(c.r, got); err != nil || !bytes.Equal(got, w.data) {
					done <- fmt.Errorf("read handle %d: wrong data (%v)", handle, err)
					return
				}
			}
		}
		done <- nil
	}()
	written := make([]byte, 4<<20)
	for i := range uint64(n) {
		blk := uint64(i % 1024)
		hdr := make([]byte, 28)
		binary.BigEndian.PutUint32(hdr[0:], 0x25609513)
		binary.BigEndian.PutUint64(hdr[8:], i)
		binary.BigEndian.PutUint64(hdr[16:], blk*bs)
		binary.BigEndian.PutUint32(hdr[24:], bs)
		w := want{read: i%2 == 1}
		if w.read {
			binary.BigEndian.PutUint64(hdr[16:], 4<<20+blk*bs) // reads go to the upper half
			w.data = fill[blk*bs : (blk+1)*bs]
		} else {
			binary.BigEndian.PutUint16(hdr[6:], 1)
			data := bytes.Repeat([]byte{byte(i)}, bs)
			copy(written[blk*bs:], data)
			hdr = append(hdr, data...)
		}
		mu.Lock()
		pending[i] = w
		mu.Unlock()
		if _, err := c.nc.Write(hdr); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := dev.snapshot(0, 4<<20); !bytes.Equal(got, written) {
		t.Fatal("writes did not all land")
	}
	c.disconnect()
}

// sendingConns is the number of connections whose replies are being
// written right now (tests).
func (s *Server) sendingConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.conns {
		c.wmu.Lock()
		if c.sending {
			n++
		}
		c.wmu.Unlock()
	}
	return n
}

// Small read replies that complete while a large reply is being written
// go into the sender's batch, copied: their requests end (budget and slot
// returned) without waiting for the socket, and once the client reads,
// every reply arrives whole with its own data, the small ones after the
// large one.
func TestSmallRepliesBatchedBehindLargeOne(t *testing.T) {
	const (
		bs    = 4096
		big   = 32 << 20 // far more than the socket buffers: its write blocks until the client reads
		small = 48
	)
	dev := newMemDevice(64<<20, bs)
	content := pattern(64<<20, 11)
	copy(dev.data, content)
	srv := startServer(t, dev, Options{})
	c := connect(t, srv.Addr(), "bs3")

	c.send(0, 0, 1, 0, big, nil)
	testutil.WaitWithin(t, ioDeadline, "the large reply to be written", func() bool { return srv.sendingConns() == 1 })
	type want struct{ off, n int }
	wants := map[uint64]want{}
	for i := range small {
		w := want{off: big + i*3*bs, n: bs * (1 + i%4)} // 4 to 16 KiB
		wants[uint64(100+i)] = w
		c.send(0, 0, uint64(100+i), uint64(w.off), uint32(w.n), nil)
	}
	// Only the large read still holds its buffer: the small ones have
	// replied into the batch and returned theirs.
	testutil.WaitWithin(t, ioDeadline, "the small reads to end while the large reply is still being written", func() bool {
		return srv.buffered.used.Load() == big && dev.reads.Load() == small+1
	})
	if srv.sendingConns() != 1 {
		t.Fatal("the large reply was written before the client read it")
	}

	if e, h := c.recvReply(); e != 0 || h != 1 {
		t.Fatalf("first reply: handle %d error %d, want the large read's", h, e)
	}
	if got := c.readN(big); !bytes.Equal(got, content[:big]) {
		t.Fatal("the large read returned wrong data")
	}
	for range small {
		e, h := c.recvReply()
		w, ok := wants[h]
		if e != 0 || !ok {
			t.Fatalf("reply handle %d error %d: not a pending small read", h, e)
		}
		delete(wants, h)
		if got := c.readN(w.n); !bytes.Equal(got, content[w.off:w.off+w.n]) {
			t.Fatalf("small read %d returned wrong data", h)
		}
	}
	c.disconnect()
}

// goroutineID is the calling goroutine's number, from its stack header.
func goroutineID() string {
	b := make([]byte, 64)
	b = b[:runtime.Stack(b, false)]
	f := strings.Fields(string(b))
	if len(f) < 2 || f[0] != "goroutine" {
		return ""
	}
	return f[1]
}

// Requests run on workers that outlive them: one after another they
// reuse the same few goroutines (a goroutine per request grew a new stack
// each time), and the workers end with their connection.
func TestWorkersReusedAndEndWithConnection(t *testing.T) {
	const bs, n = 4096, 200
	dev := newMemDevice(8<<20, bs)
	var mu sync.Mutex
	ids := map[string]int{}
	dev.setHook(func(op string, _, _ int64) error {
		if op == "read" {
			mu.Lock()
			ids[goroutineID()]++
			mu.Unlock()
		}
		return nil
	})
	srv := startServer(t, dev, Options{})
	before := runtime.NumGoroutine()
	c := connect(t, srv.Addr(), "bs3")
	for i := range n {
		if e, _ := c.readAt(uint64(i%64)*bs, bs); e != 0 {
			t.Fatalf("read %d: error %d", i, e)
		}
	}
	mu.Lock()
	distinct := len(ids)
	mu.Unlock()
	// A worker may not be back waiting when the next request comes in
	// (then another starts), but most requests find one idle.
	if distinct > n/10 {
		t.Fatalf("%d sequential reads ran on %d goroutines; want a few reused workers", n, distinct)
	}
	c.disconnect()
	testutil.WaitWithin(t, ioDeadline, "the connection and its workers to end", func() bool {
		return srv.activeConns() == 0 && runtime.NumGoroutine() <= before
	})
}
