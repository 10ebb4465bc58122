// Package ublk owns the ublk frontend: the block device /dev/ublkb<id>
// served by Linux's ublk driver (ublk_drv, Linux 6.0+) over io_uring, with
// every request handed to the shared frontend.Device (the chunker), the
// same write path as NBD and FUSE (docs/ARCHITECTURE.md §13).
//
// The protocol is written here on raw io_uring syscalls rather than taken
// from a library: the Go ublk libraries that exist
// (github.com/semistrict/go-ublk, experimental, with its own io_uring) are
// not served by the module proxy, nor is any io_uring binding, and ublk
// needs only a small, fixed part of io_uring (URING_CMD with 128-byte
// SQEs, one READ on an eventfd), which bs3 can test and keep correct
// itself. Each queue runs on its own locked OS thread, because the kernel
// (without UBLK_F_PER_IO_DAEMON, which 6.12 lacks) accepts a queue's
// commands only from the task that fetched them; requests are served
// concurrently by goroutines and their results committed back by that
// thread, woken through an eventfd, so one thread batches the commits of
// every request that finished while it slept.
//
// Life cycle: Start removes a stale device with the same id left by a
// daemon that died (its ublk state is dead, or its server process is
// gone), then ADD_DEV, SET_PARAMS, FETCH_REQ for every tag of every queue,
// START_DEV. Stop is STOP_DEV (the kernel drains the requests in flight
// through the still running queues), then the queue threads end, then
// DEL_DEV. UBLK_F_USER_RECOVERY is not used: a restarted bs3 attaches the
// volume afresh (lease, checkpoint replay), so reusing the old block
// device would only keep a dead filesystem mount alive.
package ublk

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/bs3/bs3/internal/frontend"
)

// DefaultMaxIOBytes is the largest request the kernel sends (and the
// buffer size per tag): 512 KiB, ublk's own default.
const DefaultMaxIOBytes = 512 << 10

// maxDevices is the kernel's limit on device numbers (UBLK_MINORS).
const maxDevices = 1 << 20

// maxDiscardBytes caps one discard or write-zeroes request; the kernel
// splits larger ones.
const maxDiscardBytes = 1 << 30

// Options configures the device.
type Options struct {
	// ID is the device number: /dev/ublkb<ID> and /dev/ublkc<ID>.
	ID int
	// Queues is the number of hardware queues (0 = number of CPUs); the
	// kernel lowers it to its CPU count.
	Queues int
	// QueueDepth is the requests in flight per queue (1-4096).
	QueueDepth int
	// BlockSize is the logical block size (512 or 4096); IOMin and IOOpt
	// are the advertised minimum and optimal I/O sizes (powers of two,
	// 0 = BlockSize).
	BlockSize, IOMin, IOOpt int64
	// MaxIOBytes is the largest request (0 = DefaultMaxIOBytes).
	MaxIOBytes int
	// ControlPath is the control device (empty = DefaultControlPath);
	// DevDir holds the device nodes (empty = /dev).
	ControlPath, DevDir string
	Logger              zerolog.Logger
}

// Device is a started ublk device.
type Device struct {
	dev    frontend.Device
	log    zerolog.Logger
	ctrl   *control
	id     uint32
	info   devInfo
	maxIO  int
	charFd int
	queues []*queue

	ctx    context.Context // the requests' context, ended after Stop
	cancel context.CancelFunc

	stopping atomic.Bool
	loops    sync.WaitGroup
	done     chan error
	stopOnce sync.Once
	stopErr  error
}

// Start creates /dev/ublkb<ID> served by dev. The device is live when
// Start returns; Stop removes it.
func Start(dev frontend.Device, o Options) (*Device, error) {
	if o.ControlPath == "" {
		o.ControlPath = DefaultControlPath
	}
	if o.DevDir == "" {
		o.DevDir = "/dev"
	}
	if o.MaxIOBytes == 0 {
		o.MaxIOBytes = DefaultMaxIOBytes
	}
	if o.IOMin == 0 {
		o.IOMin = o.BlockSize
	}
	if o.IOOpt == 0 {
		o.IOOpt = o.BlockSize
	}
	if err := o.validate(dev); err != nil {
		return nil, err
	}
	queues := o.Queues
	if queues == 0 {
		queues = runtime.NumCPU()
	}
	ctrl, err := openControl(o.ControlPath)
	if err != nil {
		return nil, err
	}
	d := &Device{dev: dev, log: o.Logger, ctrl: ctrl, id: uint32(o.ID), maxIO: o.MaxIOBytes, charFd: -1, done: make(chan error, 1)}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	if err := d.removeStale(); err != nil {
		d.cancel()
		return nil, errors.Join(err, ctrl.close())
	}
	d.info, err = ctrl.addDev(devInfo{
		NrHWQueues:    uint16(queues),
		QueueDepth:    uint16(o.QueueDepth),
		MaxIOBufBytes: uint32(o.MaxIOBytes),
		DevID:         d.id,
		SrvPID:        int32(os.Getpid()),
		Flags:         flagCmdIoctlEncode,
	})
	if err != nil {
		d.cancel()
		return nil, errors.Join(err, ctrl.close())
	}
	if err := d.setup(o, dev); err != nil {
		d.cancel()
		return nil, errors.Join(err, d.teardown(false))
	}
	d.log.Info().Uint32("id", d.id).Int("queues", len(d.queues)).Uint16("queue_depth", d.info.QueueDepth).
		Uint32("max_io_bytes", d.info.MaxIOBufBytes).Str("device", d.Path()).Msg("ublk device started")
	return d, nil
}

func (o Options) validate(dev frontend.Device) error {
	switch {
	case o.ID < 0 || o.ID >= maxDevices:
		return fmt.Errorf("ublk device id %d out of range (0-%d)", o.ID, maxDevices-1)
	case o.Queues < 0 || o.Queues > 4096:
		return fmt.Errorf("ublk queues %d out of range (0-4096)", o.Queues)
	case o.QueueDepth < 1 || o.QueueDepth > maxQueueDepth:
		return fmt.Errorf("ublk queue depth %d out of range (1-%d)", o.QueueDepth, maxQueueDepth)
	case o.BlockSize != 512 && o.BlockSize != 4096:
		return fmt.Errorf("ublk block size %d: must be 512 or 4096", o.BlockSize)
	case o.BlockSize != dev.BlockSize():
		return fmt.Errorf("ublk block size %d differs from the device's %d", o.BlockSize, dev.BlockSize())
	case o.MaxIOBytes < os.Getpagesize() || o.MaxIOBytes%os.Getpagesize() != 0 || o.MaxIOBytes > 32<<20:
		return fmt.Errorf("ublk max I/O size %d: must be a multiple of the page size, at most 32 MiB", o.MaxIOBytes)
	case dev.Size()%o.BlockSize != 0:
		return fmt.Errorf("device size %d is not a multiple of the block size %d", dev.Size(), o.BlockSize)
	}
	for _, v := range []int64{o.IOMin, o.IOOpt} {
		if v < o.BlockSize || v&(v-1) != 0 {
			return fmt.Errorf("ublk io_min/io_opt %d: must be a power of two >= the block size %d", v, o.BlockSize)
		}
	}
	return nil
}

// Path is the block device's path.
func (d *Device) Path() string { return "/dev/ublkb" + strconv.FormatUint(uint64(d.id), 10) }

// Done reports the end of the device when it ends by itself (a queue that
// the kernel aborted, or an io_uring error); it is not closed by Stop.
func (d *Device) Done() <-chan error { return d.done }

// removeStale deletes a device with our id whose server is gone: the one
// a crashed or killed bs3 left behind. A device whose server still runs
// is someone else's, and Start refuses it.
func (d *Device) removeStale() error {
	info, ok, err := d.ctrl.getInfo(d.id)
	if err != nil || !ok {
		return err
	}
	pid := int(info.SrvPID)
	// A live server refuses whatever the state: a device another bs3 is
	// still setting up is dead (not started) too.
	if pid > 0 && processAlive(pid) {
		return fmt.Errorf("ublk device %d (/dev/ublkb%d) already exists, served by process %d: stop that process, or set major to a free device number", d.id, d.id, pid)
	}
	d.log.Warn().Uint32("id", d.id).Int("old_pid", pid).Uint16("state", info.State).
		Msg("removing the stale ublk device left by a daemon that is gone (unmount any filesystem still mounted on it)")
	if err := d.ctrl.simple("STOP_DEV", uCmdStopDev, d.id, 0); err != nil && !errors.Is(err, unix.ENODEV) {
		d.log.Warn().Err(err).Msg("stopping the stale ublk device failed; deleting it anyway")
	}
	if err := d.ctrl.simple("DEL_DEV", uCmdDelDev, d.id, 0); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("remove stale ublk device %d: %w", d.id, err)
	}
	return nil
}

func processAlive(pid int) bool {
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

// setup sets the parameters, starts the queues and then the device.
func (d *Device) setup(o Options, dev frontend.Device) error {
	shift := func(v int64) uint8 { return uint8(bits.TrailingZeros64(uint64(v))) }
	p := params{
		Len:   paramsLen,
		Types: paramTypeBasic | paramTypeDiscard,
		Basic: paramBasic{
			// A volatile cache with FUA: the kernel sends FLUSH and
			// FUA, which the chunker maps to write.durable (§5).
			Attrs:           attrVolatileCache | attrFUA,
			LogicalBSShift:  shift(o.BlockSize),
			PhysicalBSShift: shift(o.BlockSize),
			IOMinShift:      shift(o.IOMin),
			IOOptShift:      shift(o.IOOpt),
			MaxSectors:      d.info.MaxIOBufBytes >> 9,
			DevSectors:      uint64(dev.Size() >> 9),
		},
		Discard: paramDiscard{
			DiscardGranularity:    uint32(o.BlockSize),
			MaxDiscardSectors:     maxDiscardBytes >> 9,
			MaxWriteZeroesSectors: maxDiscardBytes >> 9,
			MaxDiscardSegments:    1,
		},
	}
	if err := d.ctrl.setParams(d.id, p); err != nil {
		return err
	}
	d.maxIO = int(d.info.MaxIOBufBytes)
	charPath := fmt.Sprintf("%s/ublkc%d", o.DevDir, d.id)
	fd, err := openWhenPresent(charPath, 5*time.Second)
	if err != nil {
		return err
	}
	d.charFd = fd
	for q := 0; q < int(d.info.NrHWQueues); q++ {
		qu, err := newQueue(d, uint16(q))
		if err != nil {
			return err
		}
		d.queues = append(d.queues, qu)
		started := make(chan error, 1)
		d.loops.Add(1)
		go qu.run(started)
		if err := <-started; err != nil {
			return fmt.Errorf("ublk queue %d: %w", q, err)
		}
	}
	// START_DEV waits in the kernel until every tag was fetched.
	if err := d.ctrl.simple("START_DEV", uCmdStartDev, d.id, uint64(os.Getpid())); err != nil {
		return err
	}
	return nil
}

// openWhenPresent opens a device node that udev or devtmpfs creates
// shortly after the kernel registers the device.
func openWhenPresent(path string, wait time.Duration) (int, error) {
	deadline := time.Now().Add(wait)
	for {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			return fd, nil
		}
		if !errors.Is(err, unix.ENOENT) || time.Now().After(deadline) {
			return -1, fmt.Errorf("open ublk char device %s: %w", path, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop stops the device (requests in flight are served to the end), ends
// the queues and deletes the device. It is safe to call more than once.
func (d *Device) Stop() error {
	d.stopOnce.Do(func() { d.stopErr = d.teardown(true) })
	return d.stopErr
}

// teardown undoes Start from any point after ADD_DEV.
func (d *Device) teardown(started bool) error {
	d.stopping.Store(true)
	var errs []error
	if started {
		if err := d.ctrl.simple("STOP_DEV", uCmdStopDev, d.id, 0); err != nil {
			errs = append(errs, err)
		}
	}
	for _, q := range d.queues {
		q.quit()
	}
	d.loops.Wait()
	d.cancel()
	for _, q := range d.queues {
		// A request's worker may still be waking the ended thread.
		q.handlers.Wait()
		q.endWorkers()
		errs = append(errs, q.release())
	}
	if d.charFd >= 0 {
		if err := unix.Close(d.charFd); err != nil {
			errs = append(errs, fmt.Errorf("close ublk char device: %w", err))
		}
		d.charFd = -1
	}
	if err := d.ctrl.simple("DEL_DEV", uCmdDelDev, d.id, 0); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, d.ctrl.close())
	err := errors.Join(errs...)
	if err == nil {
		d.log.Info().Uint32("id", d.id).Msg("ublk device stopped and deleted")
	}
	return err
}

// ended reports a queue that ended by itself.
func (d *Device) ended(err error) {
	if d.stopping.Load() {
		return
	}
	select {
	case d.done <- err:
	default:
	}
}

// serve runs one request on the device and returns the result to commit:
// bytes transferred for reads and writes, 0 for the others, -errno on
// failure.
func (d *Device) serve(buf []byte, desc ioDesc) int32 {
	op := desc.OpFlags & 0xff
	off := int64(desc.StartSector) << 9
	n := int64(desc.NrSectors) << 9
	fua := desc.OpFlags&ioFlagFUA != 0
	var err error
	switch op {
	case opRead, opWrite:
		if n > int64(len(buf)) {
			d.log.Error().Int64("offset", off).Int64("length", n).Msg("ublk request larger than its buffer")
			return -int32(unix.EINVAL)
		}
		if op == opRead {
			err = d.dev.ReadAt(d.ctx, buf[:n], off)
		} else {
			err = d.dev.WriteAt(d.ctx, buf[:n], off, fua)
		}
		if err == nil {
			return int32(n)
		}
	case opFlush:
		err = d.dev.Flush(d.ctx)
	case opDiscard:
		err = d.dev.Zero(d.ctx, off, n, true, fua)
	case opWriteZeroes:
		err = d.dev.Zero(d.ctx, off, n, false, fua)
	default:
		return -int32(unix.EOPNOTSUPP)
	}
	if err == nil {
		return 0
	}
	if errors.Is(err, frontend.ErrInvalid) {
		d.log.Warn().Uint32("op", op).Int64("offset", off).Int64("length", n).Err(err).Msg("ublk request refused")
		return -int32(unix.EINVAL)
	}
	d.log.Error().Uint32("op", op).Int64("offset", off).Int64("length", n).Err(err).Msg("ublk request failed")
	return -int32(unix.EIO)
}

// wakeTag is the user_data of the eventfd read that wakes a queue thread.
const wakeTag = 1 << 63

type completion struct {
	tag uint16
	res int32
}

// queue is one hardware queue: a ring, the kernel's descriptor area and
// one buffer of maxIO bytes per tag, all outside the Go heap.
type queue struct {
	d     *Device
	id    uint16
	depth int
	r     *ring
	descs []byte
	bufs  []byte // depth buffers, then 8 bytes for the eventfd read
	efd   int

	mu    sync.Mutex
	ready []completion // served, to commit; guarded by mu
	stop  bool         // guarded by mu

	handlers sync.WaitGroup // requests being served, until their wake-up

	// Requests are served by workers that live as long as the queue: an
	// idle one takes the next request, and the queue thread starts
	// another only when none is idle (never blocking). A goroutine per
	// request grew its stack again on the read path every time, which
	// took a fifth of the CPU of cached 4 KiB reads through NBD
	// (docs/ARCHITECTURE.md §20, "Workers and read replies").
	work    chan request
	idleEnd chan struct{} // closed at teardown: idle workers return
	endOnce sync.Once
	workers sync.WaitGroup

	// Owned by the queue thread.
	inflight int
	aborted  int
	armed    bool
}

func newQueue(d *Device, id uint16) (_ *queue, err error) {
	q := &queue{d: d, id: id, depth: int(d.info.QueueDepth), efd: -1,
		work: make(chan request), idleEnd: make(chan struct{})}
	defer func() {
		if err != nil {
			err = errors.Join(err, q.release())
		}
	}()
	page := os.Getpagesize()
	descLen := roundUp(q.depth*ioDescSize, page)
	descOff := int64(id) * int64(roundUp(maxQueueDepth*ioDescSize, page))
	if q.descs, err = unix.Mmap(d.charFd, descOff, descLen, unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("mmap ublk queue %d descriptors: %w", id, err)
	}
	// Anonymous memory: pages are only allocated once a request uses
	// them, so a deep queue of large buffers costs what it carries.
	if q.bufs, err = unix.Mmap(-1, 0, q.depth*d.maxIO+page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
		return nil, fmt.Errorf("ublk queue %d buffers: %w", id, err)
	}
	if q.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
		return nil, fmt.Errorf("ublk queue %d eventfd: %w", id, err)
	}
	if q.r, err = newRing(uint32(q.depth + 1)); err != nil {
		return nil, fmt.Errorf("ublk queue %d: %w", id, err)
	}
	return q, nil
}

func roundUp(n, to int) int { return (n + to - 1) / to * to }

func (q *queue) buf(tag uint16) []byte {
	off := int(tag) * q.d.maxIO
	return q.bufs[off : off+q.d.maxIO : off+q.d.maxIO]
}

func (q *queue) desc(tag uint16) ioDesc {
	return *(*ioDesc)(unsafe.Pointer(&q.descs[int(tag)*ioDescSize]))
}

// run is the queue thread: it fetches every tag, then hands each request
// to a worker and commits the results, until the kernel aborts every
// tag or Stop asks it to end with nothing in flight.
func (q *queue) run(started chan<- error) {
	defer q.d.loops.Done()
	// The kernel ties the queue to the task that fetched it; the thread
	// stays locked and exits with this goroutine.
	runtime.LockOSThread()
	for tag := 0; tag < q.depth; tag++ {
		if err := q.command(uIOFetchReq, uint16(tag), 0); err != nil {
			started <- err
			return
		}
	}
	if err := q.arm(); err != nil {
		started <- err
		return
	}
	if err := q.r.enter(false); err != nil {
		started <- err
		return
	}
	started <- nil
	for {
		err := q.r.enter(true)
		if err == nil {
			q.r.reap(func(c *cqe) {
				if e := q.complete(c); e != nil && err == nil {
					err = e
				}
			})
		}
		if err != nil {
			q.d.log.Error().Uint16("queue", q.id).Err(err).Msg("ublk queue stopped")
			// Closing the ring makes the kernel abort this queue's
			// requests, so that STOP_DEV does not wait for them.
			if cerr := q.r.close(); cerr != nil {
				err = errors.Join(err, cerr)
			}
			q.d.ended(fmt.Errorf("ublk queue %d: %w", q.id, err))
			return
		}
		q.mu.Lock()
		stop := q.stop
		q.mu.Unlock()
		if q.inflight == 0 && (q.aborted == q.depth || stop) {
			if !stop {
				q.d.ended(fmt.Errorf("ublk queue %d: the kernel aborted every request slot (device stopped or deleted from outside bs3)", q.id))
			}
			return
		}
	}
}

// command queues FETCH_REQ or COMMIT_AND_FETCH_REQ for tag.
func (q *queue) command(op uint32, tag uint16, res int32) error {
	s, cmdArea, err := q.r.next()
	if err != nil {
		return err
	}
	s.Opcode = opURingCmd
	s.Fd = int32(q.d.charFd)
	s.Off = uint64(op)
	s.UserData = uint64(tag)
	*(*ioCmd)(unsafe.Pointer(&cmdArea[0])) = ioCmd{
		QID:    q.id,
		Tag:    tag,
		Result: res,
		Addr:   uint64(uintptr(unsafe.Pointer(&q.buf(tag)[0]))),
	}
	return nil
}

// arm queues the eventfd read that wakes the thread for completions.
func (q *queue) arm() error {
	s, _, err := q.r.next()
	if err != nil {
		return err
	}
	s.Opcode = opReadFile
	s.Fd = int32(q.efd)
	s.Addr = uint64(uintptr(unsafe.Pointer(&q.bufs[q.depth*q.d.maxIO])))
	s.Len = 8
	s.UserData = wakeTag
	q.armed = true
	return nil
}

// complete handles one CQE on the queue thread.
func (q *queue) complete(c *cqe) error {
	if c.UserData == wakeTag {
		q.armed = false
		if c.Res < 0 && c.Res != -int32(unix.EINTR) && c.Res != -int32(unix.EAGAIN) {
			return fmt.Errorf("read wake-up eventfd: %w", unix.Errno(-c.Res))
		}
		q.mu.Lock()
		ready := q.ready
		q.ready = nil
		q.mu.Unlock()
		for _, r := range ready {
			q.inflight--
			if err := q.command(uIOCommitAndFetchReq, r.tag, r.res); err != nil {
				return err
			}
		}
		return q.arm()
	}
	tag := uint16(c.UserData)
	switch {
	case c.Res == ioResOK:
		q.inflight++
		q.handlers.Add(1)
		q.dispatch(request{tag, q.desc(tag)})
	case c.Res == ioResAbort:
		q.aborted++
	default:
		// The slot is gone either way; a failed command is a bug here or
		// a kernel we do not speak to correctly.
		q.aborted++
		q.d.log.Error().Uint16("queue", q.id).Uint16("tag", tag).Err(unix.Errno(-c.Res)).Msg("ublk I/O command failed")
	}
	return nil
}

// request is one request to serve: its tag and descriptor.
type request struct {
	tag  uint16
	desc ioDesc
}

// dispatch hands r to an idle worker, or to a new one when none is idle.
func (q *queue) dispatch(r request) {
	select {
	case q.work <- r:
	default:
		q.workers.Add(1)
		go q.worker(r)
	}
}

// worker serves r, then whatever dispatch hands it, until endWorkers.
func (q *queue) worker(r request) {
	defer q.workers.Done()
	for {
		q.handle(r.tag, r.desc)
		select {
		case r = <-q.work:
		case <-q.idleEnd:
			return
		}
	}
}

// endWorkers makes the idle workers return and waits for them; every
// request was served before (handlers).
func (q *queue) endWorkers() {
	q.endOnce.Do(func() { close(q.idleEnd) })
	q.workers.Wait()
}

// handle serves one request and hands its result to the queue thread.
func (q *queue) handle(tag uint16, desc ioDesc) {
	res := q.d.serve(q.buf(tag), desc)
	q.mu.Lock()
	first := len(q.ready) == 0
	q.ready = append(q.ready, completion{tag: tag, res: res})
	q.mu.Unlock()
	if first {
		q.wake()
	}
	q.handlers.Done()
}

func (q *queue) wake() {
	var one = [8]byte{1}
	if _, err := unix.Write(q.efd, one[:]); err != nil {
		q.d.log.Error().Uint16("queue", q.id).Err(err).Msg("wake ublk queue thread")
	}
}

// quit asks the queue thread to end once nothing is in flight.
func (q *queue) quit() {
	q.mu.Lock()
	q.stop = true
	q.mu.Unlock()
	q.wake()
}

// release frees what newQueue took, after the thread ended; closing the
// ring makes the kernel cancel the fetches still queued.
func (q *queue) release() error {
	var errs []error
	if q.r != nil {
		errs = append(errs, q.r.close())
		q.r = nil
	}
	for _, m := range []*[]byte{&q.descs, &q.bufs} {
		if *m != nil {
			if err := unix.Munmap(*m); err != nil {
				errs = append(errs, fmt.Errorf("munmap ublk queue %d: %w", q.id, err))
			}
			*m = nil
		}
	}
	if q.efd >= 0 {
		if err := unix.Close(q.efd); err != nil {
			errs = append(errs, fmt.Errorf("close ublk queue %d eventfd: %w", q.id, err))
		}
		q.efd = -1
	}
	return errors.Join(errs...)
}
