package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/enginetest"
)

func TestSplit(t *testing.T) {
	const bs = 4096
	for _, k := range []struct {
		off, n int64
		want   []span
	}{
		{0, bs, []span{{dev: 0, at: 0, n: bs}}},
		{bs, 3 * bs, []span{{dev: bs, at: 0, n: 3 * bs}}},
		{512, 512, []span{{dev: 0, at: 0, n: 512, inner: 512, partial: true}}},
		{bs - 3, 7, []span{
			{dev: 0, at: 0, n: 3, inner: bs - 3, partial: true},
			{dev: bs, at: 3, n: 4, inner: 0, partial: true},
		}},
		{100, 3 * bs, []span{
			{dev: 0, at: 0, n: bs - 100, inner: 100, partial: true},
			{dev: bs, at: bs - 100, n: 2 * bs},
			{dev: 3 * bs, at: 3*bs - 100, n: 100, inner: 0, partial: true},
		}},
		{2 * bs, bs + 1, []span{
			{dev: 2 * bs, at: 0, n: bs},
			{dev: 3 * bs, at: bs, n: 1, partial: true},
		}},
		{bs + 1, bs - 1, []span{{dev: bs, at: 0, n: bs - 1, inner: 1, partial: true}}},
	} {
		spans, count := split(k.off, k.n, bs)
		got := spans[:count]
		if fmt.Sprint(got) != fmt.Sprint(k.want) {
			t.Errorf("split(%d, %d) = %+v, want %+v", k.off, k.n, got, k.want)
		}
	}
}

// unalignedModel drives one connection with requests of every alignment
// against a model of the device bytes in a few regions. It returns the
// regions it used.
type unalignedModel struct {
	t     *testing.T
	c     *rawClient
	size  int64
	bs    int64
	model map[int64]byte // sparse: bytes ever touched or read
}

func newUnalignedModel(t *testing.T, c *rawClient, size, bs int64) *unalignedModel {
	return &unalignedModel{t: t, c: c, size: size, bs: bs, model: map[int64]byte{}}
}

// load reads [off, off+n) with an aligned read so the model starts from
// whatever the device holds.
func (m *unalignedModel) load(off, n int64) {
	m.t.Helper()
	e, data := m.c.readAt(uint64(off), uint32(n))
	if e != 0 {
		m.t.Fatalf("initial read %d@%d: error %d", n, off, e)
	}
	for i, b := range data {
		m.model[off+int64(i)] = b
	}
}

func (m *unalignedModel) write(off int64, p []byte, flags uint16) {
	m.t.Helper()
	if e := m.c.writeAt(uint64(off), p, flags); e != 0 {
		m.t.Fatalf("write %d@%d (flags %#x): error %d", len(p), off, flags, e)
	}
	for i, b := range p {
		m.model[off+int64(i)] = b
	}
}

func (m *unalignedModel) zero(off, n int64, flags uint16) {
	m.t.Helper()
	if e, _ := m.c.do(6, flags, uint64(off), uint32(n), nil); e != 0 {
		m.t.Fatalf("write zeroes %d@%d (flags %#x): error %d", n, off, flags, e)
	}
	for i := off; i < off+n; i++ {
		m.model[i] = 0
	}
}

// trim discards only the whole blocks inside the range; the partial ones
// keep their contents (the server's documented choice).
func (m *unalignedModel) trim(off, n int64) {
	m.t.Helper()
	if e, _ := m.c.do(4, 0, uint64(off), uint32(n), nil); e != 0 {
		m.t.Fatalf("trim %d@%d: error %d", n, off, e)
	}
	lo := (off + m.bs - 1) / m.bs * m.bs
	hi := (off + n) / m.bs * m.bs
	for i := lo; i < hi; i++ {
		m.model[i] = 0
	}
}

func (m *unalignedModel) check(off, n int64) {
	m.t.Helper()
	e, got := m.c.readAt(uint64(off), uint32(n))
	if e != 0 {
		m.t.Fatalf("read %d@%d: error %d", n, off, e)
	}
	for i, b := range got {
		want, ok := m.model[off+int64(i)]
		if !ok {
			m.t.Fatalf("read %d@%d: byte %d outside the loaded regions", n, off, off+int64(i))
		}
		if b != want {
			m.t.Fatalf("read %d@%d: byte at %d is %#x, model has %#x", n, off, off+int64(i), b, want)
		}
	}
}

// runUnaligned writes, zeroes, trims and reads sub-block and odd ranges at
// the start and the end of the device and checks every read against the
// model. The device must be at least 1 MiB.
func runUnaligned(t *testing.T, addr string, size, bs int64, seed uint64) {
	c := connect(t, addr, "bs3")
	m := newUnalignedModel(t, c, size, bs)
	const front = 256 << 10
	back := size - 64<<10
	m.load(0, front)
	m.load(back, size-back)

	// The cases that clients without block-size negotiation send.
	m.write(512, pattern(512, 1), 0)
	m.check(0, bs)
	m.write(0, pattern(512, 2), 0)
	m.write(bs-512, pattern(512, 3), 1) // FUA
	m.check(0, 2*bs)
	m.write(bs-3, pattern(7, 4), 0) // across a block boundary
	m.write(3*bs+1, pattern(int(2*bs), 5), 0)
	m.write(7*bs+17, pattern(1, 6), 0)
	m.check(0, 10*bs)
	m.check(bs-5, 11)
	m.check(7*bs+17, 1)
	m.zero(2*bs+100, bs, 0)
	m.zero(5*bs-1, 2, 2) // NO_HOLE
	m.zero(3*bs, bs+200, 0)
	m.trim(bs/2, 2*bs)
	m.trim(8*bs+1, 10) // no whole block: nothing is discarded
	m.check(0, 12*bs)
	m.write(size-1, []byte{0xa5}, 0)
	m.write(size-bs-9, pattern(int(bs), 7), 0)
	m.check(size-2*bs, 2*bs)
	m.check(size-1, 1)

	rng := rand.New(rand.NewPCG(seed, uint64(bs)))
	region := func(n int64) int64 {
		if rng.IntN(4) == 0 {
			return back + rng.Int64N(size-back-n+1)
		}
		return rng.Int64N(front - n + 1)
	}
	for i := range 400 {
		n := 1 + rng.Int64N(3*bs+100)
		if rng.IntN(3) == 0 {
			n = 1 + rng.Int64N(bs)
		}
		off := region(n)
		switch rng.IntN(6) {
		case 0, 1:
			m.write(off, pattern(int(n), byte(i)), uint16(rng.IntN(2)))
		case 2:
			m.zero(off, n, uint16(rng.IntN(4)))
		case 3:
			m.trim(off, n)
		default:
			m.check(off, n)
		}
	}
	m.check(0, front)
	m.check(back, size-back)
	c.disconnect()
}

// concurrentRMW runs read-modify-writes of the same blocks from several
// connections at once and checks that no write is ever lost:
//
//   - writers that each own a distinct, unaligned byte range of two
//     adjacent blocks: before each write, a writer reads its range back
//     and finds its previous write there (nobody else writes it);
//   - a writer of two whole blocks against writers of parts of them:
//     outside the parts, the whole-block writer finds its previous write
//     (a read-modify-write that read before it and wrote after it would
//     bring back older data).
//
// At the end, every range holds its writer's last data.
func concurrentRMW(t *testing.T, addr string, bs int64, rounds int) {
	const writers = 8
	base := int64(64) * bs
	bounds := make([]int64, writers+1)
	for i := range bounds {
		bounds[i] = int64(i)*2*bs/writers + int64(i%3)
	}
	bounds[0], bounds[writers] = 1, 2*bs-1
	fill := func(w, r int, n int64) []byte { return bytes.Repeat([]byte{byte(w*37 + r)}, int(n)) }
	whole := base + 4*bs
	// Parts of the whole blocks, each with its own partial writer.
	parts := [][2]int64{{100, 400}, {bs - 7, bs + 5}, {2*bs - 300, 2*bs - 1}}
	inPart := func(i int64) bool {
		for _, p := range parts {
			if i >= p[0] && i < p[1] {
				return true
			}
		}
		return false
	}

	// Start from known contents.
	setup := connect(t, addr, "bs3")
	setup.mustRoundTrip(uint64(base), int(6*bs), 0)
	e, initial := setup.readAt(uint64(base), uint32(6*bs))
	if e != 0 {
		t.Fatalf("read initial contents: error %d", e)
	}
	setup.disconnect()

	var wg sync.WaitGroup
	errs := make(chan error, writers+1+len(parts))
	run := func(name string, off, n int64, data func(r int) []byte, verify func(got []byte, r int) error) {
		c := connect(t, addr, "bs3")
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 1; r <= rounds; r++ {
				got, err := c.exchange(0, uint64(off), nil, uint32(n))
				if err != nil {
					errs <- fmt.Errorf("%s round %d: read: %w", name, r, err)
					return
				}
				if err := verify(got, r-1); err != nil {
					errs <- fmt.Errorf("%s before round %d: %w", name, r, err)
					return
				}
				if _, err := c.exchange(1, uint64(off), data(r), 0); err != nil {
					errs <- fmt.Errorf("%s round %d: write: %w", name, r, err)
					return
				}
			}
		}()
	}
	for w := range writers {
		lo, hi := bounds[w], bounds[w+1]
		run(fmt.Sprintf("writer %d", w), base+lo, hi-lo,
			func(r int) []byte { return fill(w, r, hi-lo) },
			func(got []byte, r int) error {
				want := initial[lo:hi]
				if r > 0 {
					want = fill(w, r, hi-lo)
				}
				if !bytes.Equal(got, want) {
					return fmt.Errorf("bytes [%d, %d) lost the previous write: first byte %#x, want %#x", lo, hi, got[0], want[0])
				}
				return nil
			})
	}
	initWhole := initial[whole-base : whole-base+2*bs]
	run("whole-block writer", whole, 2*bs,
		func(r int) []byte { return fill(1, r, 2*bs) },
		func(got []byte, r int) error {
			want := initWhole
			if r > 0 {
				want = fill(1, r, 2*bs)
			}
			for i := range got {
				if !inPart(int64(i)) && got[i] != want[i] {
					return fmt.Errorf("byte %d is %#x, not the previous whole-block write's %#x: a read-modify-write brought back older data", i, got[i], want[i])
				}
			}
			return nil
		})
	for i, p := range parts {
		run(fmt.Sprintf("partial writer %d", i), whole+p[0], p[1]-p[0],
			func(int) []byte { return fill(7, 200, p[1]-p[0]) },
			func([]byte, int) error { return nil })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}

	c := connect(t, addr, "bs3")
	e, got := c.readAt(uint64(base), uint32(2*bs))
	if e != 0 {
		t.Fatalf("read back: error %d", e)
	}
	for w := range writers {
		lo, hi := bounds[w], bounds[w+1]
		if want := fill(w, rounds, hi-lo); !bytes.Equal(got[lo:hi], want) {
			t.Errorf("writer %d's bytes [%d, %d) lost their last write: first byte %#x, want %#x", w, lo, hi, got[lo], want[0])
		}
	}
	e, got = c.readAt(uint64(whole), uint32(2*bs))
	if e != 0 {
		t.Fatalf("read back: error %d", e)
	}
	last := fill(1, rounds, 2*bs)
	for i, b := range got {
		if !inPart(int64(i)) && b != last[i] {
			t.Fatalf("byte %d of the whole-block writes is %#x, want the last whole write %#x", i, b, last[i])
		}
	}
	for _, p := range parts {
		g := got[p[0]:p[1]]
		if !bytes.Equal(g, fill(7, 200, p[1]-p[0])) && !bytes.Equal(g, last[p[0]:p[1]]) {
			t.Fatalf("part [%d, %d) mixes two writes: %x", p[0], p[1], g)
		}
	}
	c.disconnect()
}

// exchange sends one request and waits for its reply, returning the data
// of a read. It returns errors instead of failing the test, for use off
// the test goroutine.
func (c *rawClient) exchange(typ uint16, off uint64, payload []byte, readLen uint32) ([]byte, error) {
	length := uint32(len(payload))
	if typ == 0 {
		length = readLen
	}
	b := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(b[0:], 0x25609513)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], 1)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	if _, err := c.nc.Write(append(b, payload...)); err != nil {
		return nil, fmt.Errorf("send request: %w", err)
	}
	h := make([]byte, 16)
	if _, err := io.ReadFull(c.r, h); err != nil {
		return nil, fmt.Errorf("read reply: %w", err)
	}
	if m := binary.BigEndian.Uint32(h); m != 0x67446698 {
		return nil, fmt.Errorf("reply magic %#x", m)
	}
	if errno := binary.BigEndian.Uint32(h[4:]); errno != 0 {
		return nil, fmt.Errorf("error %d", errno)
	}
	if typ != 0 {
		return nil, nil
	}
	data := make([]byte, readLen)
	if _, err := io.ReadFull(c.r, data); err != nil {
		return nil, fmt.Errorf("read data: %w", err)
	}
	return data, nil
}

func TestUnalignedMemDevice(t *testing.T) {
	for _, bs := range []int64{512, 4096} {
		t.Run("bs"+strconv.FormatInt(bs, 10), func(t *testing.T) {
			dev := newMemDevice(1<<20, bs)
			srv := startServer(t, dev, Options{})
			runUnaligned(t, srv.Addr(), dev.size, bs, 1)
			if n := srv.partialOps.Load(); n == 0 {
				t.Fatalf("no request took the partial-block path")
			}
			if n := dev.invalid.Load(); n != 0 {
				t.Fatalf("%d misaligned requests reached the device", n)
			}
		})
	}
}

// slowWrites delays every write of a device a little, widening the window
// between a read-modify-write's read and its write, where a missing lock
// loses updates.
type slowWrites struct{ frontend.Device }

func (d slowWrites) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	time.Sleep(time.Duration(rand.IntN(100)) * time.Microsecond)
	return d.Device.WriteAt(ctx, p, off, fua)
}

func TestConcurrentRMWMemDevice(t *testing.T) {
	dev := newMemDevice(1<<20, 4096)
	srv := startServer(t, slowWrites{dev}, Options{})
	concurrentRMW(t, srv.Addr(), 4096, 100)
	if n := dev.invalid.Load(); n != 0 {
		t.Fatalf("%d misaligned requests reached the device", n)
	}
}

// The same against the real engine (object proxy, volume, chunker) on the
// in-memory store: a 4096-byte volume served to clients that write 512
// bytes and odd ranges.
func TestUnalignedOnEngine(t *testing.T) {
	e := enginetest.Open(t, mem.New(), enginetest.Options{Size: 64 << 20, BlockSize: 4096})
	srv := startServer(t, e.Dev, Options{})
	t.Run("model", func(t *testing.T) { runUnaligned(t, srv.Addr(), 64<<20, 4096, 2) })
	t.Run("concurrent", func(t *testing.T) { concurrentRMW(t, srv.Addr(), 4096, 150) })
	if n := srv.partialOps.Load(); n == 0 {
		t.Fatalf("no request took the partial-block path")
	}
	t.Run("concurrent, slow writes", func(t *testing.T) {
		slow := startServer(t, slowWrites{e.Dev}, Options{})
		concurrentRMW(t, slow.Addr(), 4096, 100)
	})
}

// qemu-io honours the advertised minimum block size of 1 and sends
// sub-block requests as they are (with a minimum of 4096 it would read,
// merge and write whole blocks itself): 512-byte and odd writes,
// write-zeroes and reads on a 4096-byte export, checked by qemu-io's own
// pattern reads and against the device.
func TestQemuIOUnaligned(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils")
	const size = 16 << 20
	devices := map[string]func(t *testing.T) frontend.Device{
		"memory": func(t *testing.T) frontend.Device { return newMemDevice(size, 4096) },
		"engine": func(t *testing.T) frontend.Device {
			return enginetest.Open(t, mem.New(), enginetest.Options{Size: size, BlockSize: 4096}).Dev
		},
	}
	for name, newDev := range devices {
		t.Run(name, func(t *testing.T) {
			dev := newDev(t)
			srv := startServer(t, dev, Options{})
			model := make([]byte, 64<<10)
			put := func(off, n int, b byte) {
				for i := off; i < off+n; i++ {
					model[i] = b
				}
			}
			qemuIO(t, srv.URI(), []string{
				"write -P 0x5a 0 64k",
				"write -P 0xab 512 512",
				"write -P 0xcd 4097 3",
				"write -P 0x11 8191 2",
				"write -f -P 0x22 12289 1000",
				"write -z 20000 100",
				"aio_write -P 0x33 24576 512",
				"aio_write -P 0x44 25088 512",
				"aio_write -P 0x55 25600 1",
				"aio_flush",
				"discard 40000 10000",
				"flush",
				"read -P 0xab 512 512",
				"read -P 0x5a 0 512",
				"read -P 0x5a 1024 3073",
				"read -P 0xcd 4097 3",
				"read -P 0x11 8191 2",
				"read -P 0x22 12289 1000",
				"read -P 0 20000 100",
				"read -P 0x33 24576 512",
				"read -P 0x44 25088 512",
				"read -P 0x55 25600 1",
			})
			put(0, 64<<10, 0x5a)
			put(512, 512, 0xab)
			put(4097, 3, 0xcd)
			put(8191, 2, 0x11)
			put(12289, 1000, 0x22)
			put(20000, 100, 0)
			put(24576, 512, 0x33)
			put(25088, 512, 0x44)
			put(25600, 1, 0x55)
			// The discard zeroes the whole blocks inside it only.
			put(40960, 8192, 0)
			if srv.partialOps.Load() == 0 {
				t.Fatalf("qemu-io sent no sub-block request; the check proves nothing")
			}
			got := make([]byte, len(model))
			if err := dev.ReadAt(context.Background(), got, 0); err != nil {
				t.Fatalf("device read: %v", err)
			}
			if i := firstDiff(got, model); i >= 0 {
				t.Fatalf("device byte %d is %#x, want %#x", i, got[i], model[i])
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}
