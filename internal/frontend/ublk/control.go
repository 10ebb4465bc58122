package ublk

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DefaultControlPath is the ublk driver's control device.
const DefaultControlPath = "/dev/ublk-control"

// ErrNoModule is returned when the control device is missing: the kernel
// has no ublk driver loaded (or none at all, before Linux 6.0).
var ErrNoModule = errors.New("the ublk kernel driver is not loaded: run `modprobe ublk_drv` (Linux 6.0+, CONFIG_BLK_DEV_UBLK), " +
	`or choose another frontend: frontend = "nbd" (any kernel, attach with nbd-client) or frontend = "fuse" (a FUSE file behind a loop device)`)

// control is the ublk control device with its own io_uring. Commands are
// serialized: the kernel runs each in a worker thread and the caller waits
// for its completion.
type control struct {
	mu  sync.Mutex
	fd  int
	r   *ring
	buf []byte // one page outside the Go heap for the command payloads
}

// Available reports whether the ublk control device at path can be opened.
func Available(path string) error {
	c, err := openControl(path)
	if err != nil {
		return err
	}
	return c.close()
}

func openControl(path string) (*control, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO) {
			return nil, fmt.Errorf("open %s: %w", path, ErrNoModule)
		}
		return nil, fmt.Errorf("open ublk control device %s: %w", path, err)
	}
	c := &control{fd: fd}
	if c.r, err = newRing(4); err != nil {
		_ = unix.Close(fd) // the ring error is the one to report
		return nil, fmt.Errorf("ublk control ring: %w", err)
	}
	if c.buf, err = unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
		_ = c.close() // the mmap error is the one to report
		return nil, fmt.Errorf("ublk control buffer: %w", err)
	}
	return c, nil
}

func (c *control) close() error {
	var errs []error
	if c.buf != nil {
		if err := unix.Munmap(c.buf); err != nil {
			errs = append(errs, fmt.Errorf("munmap ublk control buffer: %w", err))
		}
		c.buf = nil
	}
	if c.r != nil {
		errs = append(errs, c.r.close())
		c.r = nil
	}
	if c.fd >= 0 {
		if err := unix.Close(c.fd); err != nil {
			errs = append(errs, fmt.Errorf("close ublk control device: %w", err))
		}
		c.fd = -1
	}
	return errors.Join(errs...)
}

// payload returns the command payload area as a *T.
func payload[T any](c *control) *T { return (*T)(unsafe.Pointer(&c.buf[0])) }

// cmd runs one control command and returns its result (0 or -errno). The
// caller holds c.mu and fills the payload before, and reads it after.
func (c *control) cmd(op uint32, h ctrlCmd) (int32, error) {
	s, cmdArea, err := c.r.next()
	if err != nil {
		return 0, err
	}
	s.Opcode = opURingCmd
	s.Fd = int32(c.fd)
	s.Off = uint64(op)
	s.UserData = uint64(op)
	*(*ctrlCmd)(unsafe.Pointer(&cmdArea[0])) = h
	for {
		if err := c.r.enter(true); err != nil {
			return 0, err
		}
		var res int32
		got := false
		c.r.reap(func(e *cqe) {
			if e.UserData == uint64(op) {
				res, got = e.Res, true
			}
		})
		if got {
			return res, nil
		}
	}
}

// errno turns a negative command result into an error naming the command.
func errno(name string, id uint32, res int32) error {
	if res >= 0 {
		return nil
	}
	return fmt.Errorf("ublk %s for device %d: %w", name, id, unix.Errno(-res))
}

// getInfo returns the device's info, or ok=false when there is no device
// with that id.
func (c *control) getInfo(id uint32) (info devInfo, ok bool, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	*payload[devInfo](c) = devInfo{}
	res, err := c.cmd(uCmdGetDevInfo, ctrlCmd{DevID: id, QueueID: 0xffff, Len: devInfoSize, Addr: c.addr()})
	if err != nil {
		return info, false, err
	}
	if res == -int32(unix.ENODEV) {
		return info, false, nil
	}
	if err := errno("GET_DEV_INFO", id, res); err != nil {
		return info, false, err
	}
	return *payload[devInfo](c), true, nil
}

// addDev creates the device and returns the info as the kernel set it
// (it may lower the number of queues to the CPU count).
func (c *control) addDev(want devInfo) (devInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	*payload[devInfo](c) = want
	res, err := c.cmd(uCmdAddDev, ctrlCmd{DevID: want.DevID, QueueID: 0xffff, Len: devInfoSize, Addr: c.addr()})
	if err != nil {
		return devInfo{}, err
	}
	if err := errno("ADD_DEV", want.DevID, res); err != nil {
		return devInfo{}, err
	}
	return *payload[devInfo](c), nil
}

func (c *control) setParams(id uint32, p params) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	*payload[params](c) = p
	res, err := c.cmd(uCmdSetParams, ctrlCmd{DevID: id, QueueID: 0xffff, Len: uint16(unsafe.Sizeof(p)), Addr: c.addr()})
	if err != nil {
		return err
	}
	return errno("SET_PARAMS", id, res)
}

// simple runs a command without payload: START_DEV (data = daemon pid),
// STOP_DEV, DEL_DEV.
func (c *control) simple(name string, op, id uint32, data uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	res, err := c.cmd(op, ctrlCmd{DevID: id, QueueID: 0xffff, Data: data})
	if err != nil {
		return err
	}
	return errno(name, id, res)
}

func (c *control) addr() uint64 { return uint64(uintptr(unsafe.Pointer(&c.buf[0]))) }
