package ublk

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal io_uring on raw syscalls: 128-byte SQEs and 32-byte CQEs
// (IORING_SETUP_SQE128 | IORING_SETUP_CQE32), which ublk's commands need,
// and nothing else. No io_uring binding is served by the module proxy, and
// ublk uses only this much of it (docs/ARCHITECTURE.md §13).

const (
	setupSQE128 = 1 << 10
	setupCQE32  = 1 << 11

	featSingleMmap = 1 << 0

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	enterGetEvents = 1 << 0

	opReadFile = 22 // IORING_OP_READ
	opURingCmd = 46 // IORING_OP_URING_CMD

	sqeSize = 128
	cqeSize = 32
)

// uringParams is struct io_uring_params.
type uringParams struct {
	SQEntries    uint32
	CQEntries    uint32
	Flags        uint32
	SQThreadCPU  uint32
	SQThreadIdle uint32
	Features     uint32
	WQFd         uint32
	Resv         [3]uint32
	SQOff        sqringOffsets
	CQOff        cqringOffsets
}

type sqringOffsets struct {
	Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
	UserAddr                                                        uint64
}

type cqringOffsets struct {
	Head, Tail, RingMask, RingEntries, Overflow, CQEs, Flags, Resv1 uint32
	UserAddr                                                        uint64
}

// sqe is the first 48 bytes of an SQE; the command area (cmd) follows at
// offset 48.
type sqe struct {
	Opcode      uint8
	Flags       uint8
	IOPrio      uint16
	Fd          int32
	Off         uint64 // cmd_op in the low 32 bits for URING_CMD
	Addr        uint64
	Len         uint32
	OpFlags     uint32
	UserData    uint64
	BufIndex    uint16
	Personality uint16
	FileIndex   uint32
}

const sqeCmdOffset = 48

// cqe is the head of a CQE.
type cqe struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// ring is one io_uring. It is used by one goroutine at a time (a ublk
// queue's ring by its locked OS thread only).
type ring struct {
	fd      int
	ringMem []byte
	cqMem   []byte // nil with a single mmap
	sqeMem  []byte

	sqHead, sqTail *uint32
	sqMask         uint32
	sqEntries      uint32
	sqArray        unsafe.Pointer
	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           unsafe.Pointer
}

// errRingFull is returned by next when every SQE is in use; submit first.
var errRingFull = errors.New("io_uring submission queue full")

func newRing(entries uint32) (*ring, error) {
	var p uringParams
	p.Flags = setupSQE128 | setupCQE32
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup(%d entries, SQE128|CQE32): %w", entries, errno)
	}
	r := &ring{fd: int(fd)}
	sqSize := int(p.SQOff.Array + p.SQEntries*4)
	cqSize := int(p.CQOff.CQEs + p.CQEntries*cqeSize)
	single := p.Features&featSingleMmap != 0
	if single && cqSize > sqSize {
		sqSize = cqSize
	}
	var err error
	if r.ringMem, err = unix.Mmap(r.fd, offSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		_ = r.close() // the mmap error is the one to report
		return nil, fmt.Errorf("mmap io_uring SQ ring: %w", err)
	}
	cqMem := r.ringMem
	if !single {
		if r.cqMem, err = unix.Mmap(r.fd, offCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
			r.close()
			return nil, fmt.Errorf("mmap io_uring CQ ring: %w", err)
		}
		cqMem = r.cqMem
	}
	if r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(p.SQEntries)*sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		_ = r.close() // the mmap error is the one to report
		return nil, fmt.Errorf("mmap io_uring SQEs: %w", err)
	}
	sq := unsafe.Pointer(&r.ringMem[0])
	cq := unsafe.Pointer(&cqMem[0])
	r.sqHead = (*uint32)(unsafe.Add(sq, p.SQOff.Head))
	r.sqTail = (*uint32)(unsafe.Add(sq, p.SQOff.Tail))
	r.sqMask = *(*uint32)(unsafe.Add(sq, p.SQOff.RingMask))
	r.sqEntries = p.SQEntries
	r.sqArray = unsafe.Add(sq, p.SQOff.Array)
	r.cqHead = (*uint32)(unsafe.Add(cq, p.CQOff.Head))
	r.cqTail = (*uint32)(unsafe.Add(cq, p.CQOff.Tail))
	r.cqMask = *(*uint32)(unsafe.Add(cq, p.CQOff.RingMask))
	r.cqes = unsafe.Add(cq, p.CQOff.CQEs)
	return r, nil
}

// next returns a zeroed SQE to fill; it is submitted by the next enter.
func (r *ring) next() (*sqe, []byte, error) {
	tail := atomic.LoadUint32(r.sqTail)
	if tail-atomic.LoadUint32(r.sqHead) >= r.sqEntries {
		return nil, nil, errRingFull
	}
	idx := tail & r.sqMask
	b := r.sqeMem[int(idx)*sqeSize : int(idx+1)*sqeSize]
	clear(b)
	*(*uint32)(unsafe.Add(r.sqArray, idx*4)) = idx
	atomic.StoreUint32(r.sqTail, tail+1)
	return (*sqe)(unsafe.Pointer(&b[0])), b[sqeCmdOffset:], nil
}

// enter submits the SQEs not yet consumed by the kernel and, with wait,
// waits until at least one CQE is ready. A signal (EINTR) is not an error:
// the caller looks at the CQ and calls again.
func (r *ring) enter(wait bool) error {
	pending := atomic.LoadUint32(r.sqTail) - atomic.LoadUint32(r.sqHead)
	var minComplete, flags uintptr
	if wait {
		minComplete, flags = 1, enterGetEvents
	}
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(pending), minComplete, flags, 0, 0)
	switch errno {
	case 0, unix.EINTR:
		return nil
	case unix.EAGAIN, unix.EBUSY:
		// The kernel is short of resources or the CQ is full: the
		// caller reaps completions and calls again.
		return nil
	}
	return fmt.Errorf("io_uring_enter: %w", errno)
}

// reap calls fn for every ready CQE and frees them.
func (r *ring) reap(fn func(c *cqe)) int {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	n := 0
	for ; head != tail; head++ {
		fn((*cqe)(unsafe.Add(r.cqes, (head&r.cqMask)*cqeSize)))
		n++
	}
	atomic.StoreUint32(r.cqHead, head)
	return n
}

// close unmaps the ring and closes its fd; the kernel then cancels the
// commands still queued on it.
func (r *ring) close() error {
	var errs []error
	for _, m := range [][]byte{r.sqeMem, r.cqMem, r.ringMem} {
		if m != nil {
			if err := unix.Munmap(m); err != nil {
				errs = append(errs, fmt.Errorf("munmap io_uring: %w", err))
			}
		}
	}
	r.sqeMem, r.cqMem, r.ringMem = nil, nil, nil
	if r.fd >= 0 {
		if err := unix.Close(r.fd); err != nil {
			errs = append(errs, fmt.Errorf("close io_uring: %w", err))
		}
		r.fd = -1
	}
	return errors.Join(errs...)
}
