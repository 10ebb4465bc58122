package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sync/semaphore"

	"github.com/bs3/bs3/internal/frontend"
)

// conn is one client connection.
type conn struct {
	s   *Server
	nc  net.Conn
	r   *bufio.Reader
	log zerolog.Logger

	// stopping is set by Server.Close; read errors after it are expected.
	stopping atomic.Bool

	// slots bounds dispatched requests; bytes bounds their payload buffers.
	slots chan struct{}
	bytes *semaphore.Weighted
	// inflight counts dispatched requests not yet replied to.
	inflight sync.WaitGroup

	wmu  sync.Mutex // serializes replies
	werr error      // first reply write error; later replies are dropped
}

// request is one decoded transmission request.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	off    uint64
	length uint32
}

func (s *Server) newConn(nc net.Conn) *conn {
	budget := max(int64(minInFlightBytes), s.maxReq)
	return &conn{
		s:     s,
		nc:    nc,
		r:     bufio.NewReaderSize(nc, 64<<10),
		log:   s.log.With().Str("remote", remoteName(nc)).Logger(),
		slots: make(chan struct{}, maxInFlight),
		bytes: semaphore.NewWeighted(budget),
	}
}

func remoteName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	return nc.LocalAddr().Network() // unix peers have no address
}

// stop makes the reader return (pending reads fail at once) and bounds how
// long replies may still take to send.
func (c *conn) stop() {
	c.stopping.Store(true)
	now := time.Now()
	if err := c.nc.SetReadDeadline(now); err != nil {
		c.log.Debug().Err(err).Msg("set read deadline")
	}
	if err := c.nc.SetWriteDeadline(now.Add(closeWriteGrace)); err != nil {
		c.log.Debug().Err(err).Msg("set write deadline")
	}
}

// serve runs the connection to its end; it owns the connection.
func (c *conn) serve() {
	defer c.s.untrack(c)
	defer func() {
		if err := c.nc.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			c.log.Debug().Err(err).Msg("close connection")
		}
	}()
	c.log.Debug().Msg("connection opened")

	if err := c.negotiate(); err != nil {
		switch {
		case errors.Is(err, errAbort):
			c.log.Debug().Msg("client aborted negotiation")
		case c.stopping.Load() || isDisconnect(err):
			c.log.Debug().Err(err).Msg("negotiation ended")
		default:
			c.log.Warn().Err(err).Msg("negotiation failed; closing connection")
		}
		return
	}
	c.log.Debug().Msg("transmission phase")
	c.transmit()
	// Replies of requests already dispatched still go out before close.
	c.inflight.Wait()
	c.log.Debug().Msg("connection closed")
}

// isDisconnect reports errors that mean the peer went away.
func isDisconnect(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) ||
		isConnReset(err)
}

// transmit reads requests until the client disconnects, sends
// NBD_CMD_DISC, violates the protocol beyond recovery, or Close stops it.
func (c *conn) transmit() {
	var hdr [requestSize]byte
	for {
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			c.logReadEnd(err, "read request")
			return
		}
		if m := binary.BigEndian.Uint32(hdr[0:]); m != magicRequest {
			c.log.Warn().Str("magic", fmt.Sprintf("%#x", m)).Msg("bad request magic; closing connection")
			return
		}
		req := request{
			flags:  binary.BigEndian.Uint16(hdr[4:]),
			typ:    binary.BigEndian.Uint16(hdr[6:]),
			handle: binary.BigEndian.Uint64(hdr[8:]),
			off:    binary.BigEndian.Uint64(hdr[16:]),
			length: binary.BigEndian.Uint32(hdr[24:]),
		}
		if !c.handle(req) {
			return
		}
	}
}

// logReadEnd logs why the reader stopped at the level it deserves.
func (c *conn) logReadEnd(err error, what string) {
	if c.stopping.Load() || errors.Is(err, io.EOF) {
		c.log.Debug().Err(err).Msg(what + ": connection ended")
		return
	}
	if isDisconnect(err) {
		c.log.Warn().Err(err).Msg(what + ": client disconnected mid-request")
		return
	}
	c.log.Warn().Err(err).Msg(what + " failed")
}

// handle validates and dispatches one request; it returns false when the
// connection must end.
func (c *conn) handle(req request) bool {
	switch req.typ {
	case cmdWrite:
		if int64(req.length) > c.s.maxReq {
			// The payload is too big to buffer, and skipping it blindly
			// would only keep a hostile client busy: hang up.
			withReq(c.log.Warn(), req).Int64("max", c.s.maxReq).Msg("write payload over the maximum; closing connection")
			return false
		}
		buf, ok := c.acquire(int64(req.length))
		if !ok {
			return false
		}
		if _, err := io.ReadFull(c.r, buf.b); err != nil {
			// The write never reaches the device: a partial payload is
			// not a write the client made.
			c.logReadEnd(err, "read write payload")
			c.release(buf)
			return false
		}
		if e := c.check(req, cmdFlagFUA); e != 0 {
			c.release(buf)
			return c.reply(req.handle, e, nil)
		}
		fua := req.flags&cmdFlagFUA != 0
		c.dispatch(func() {
			err := c.s.dev.WriteAt(c.s.devCtx, buf.b, int64(req.off), fua)
			c.release(buf)
			c.reply(req.handle, c.errno(err, req, "write"), nil)
		})

	case cmdRead:
		if int64(req.length) > c.s.maxReq {
			withReq(c.log.Debug(), req).Int64("max", c.s.maxReq).Msg("read over the maximum")
			return c.reply(req.handle, errInval, nil)
		}
		if e := c.check(req, cmdFlagFUA); e != 0 {
			return c.reply(req.handle, e, nil)
		}
		buf, ok := c.acquire(int64(req.length))
		if !ok {
			return false
		}
		c.dispatch(func() {
			err := c.s.dev.ReadAt(c.s.devCtx, buf.b, int64(req.off))
			if e := c.errno(err, req, "read"); e != 0 {
				c.reply(req.handle, e, nil)
			} else {
				c.reply(req.handle, 0, buf.b)
			}
			c.release(buf)
		})

	case cmdDisc:
		withReq(c.log.Debug(), req).Msg("client disconnect request")
		return false

	case cmdFlush:
		if req.flags&^cmdFlagFUA != 0 {
			withReq(c.log.Debug(), req).Uint16("flags", req.flags).Msg("flags not valid for flush")
			return c.reply(req.handle, errInval, nil)
		}
		c.acquireSlot()
		c.dispatch(func() {
			err := c.s.dev.Flush(c.s.devCtx)
			c.releaseSlot()
			c.reply(req.handle, c.errno(err, req, "flush"), nil)
		})

	case cmdTrim, cmdWriteZeroes:
		allowed := cmdFlagFUA
		if req.typ == cmdWriteZeroes {
			allowed |= cmdFlagNoHole
		}
		// No maximum here: the length carries no payload, and the
		// protocol asks servers to accept large trims and zeroes.
		if e := c.check(req, allowed); e != 0 {
			return c.reply(req.handle, e, nil)
		}
		c.acquireSlot()
		// NO_HOLE asks for allocated zeroes; otherwise a hole is fine.
		discard := req.typ == cmdTrim || req.flags&cmdFlagNoHole == 0
		fua := req.flags&cmdFlagFUA != 0
		op := "trim"
		if req.typ == cmdWriteZeroes {
			op = "write zeroes"
		}
		c.dispatch(func() {
			err := c.s.dev.Zero(c.s.devCtx, int64(req.off), int64(req.length), discard, fua)
			c.releaseSlot()
			c.reply(req.handle, c.errno(err, req, op), nil)
		})

	default:
		// CACHE, BLOCK_STATUS (never negotiated) and unknown commands
		// carry no payload, so the stream stays in sync.
		withReq(c.log.Debug(), req).Msg("unsupported command")
		return c.reply(req.handle, errInval, nil)
	}
	return true
}

// check validates flags, range and alignment; it returns an NBD error or 0.
func (c *conn) check(req request, allowedFlags uint16) uint32 {
	if req.flags&^allowedFlags != 0 {
		withReq(c.log.Debug(), req).Uint16("flags", req.flags).Msg("invalid command flags")
		return errInval
	}
	size := uint64(c.s.size)
	bs := uint64(c.s.blockSize)
	n := uint64(req.length)
	switch {
	case n == 0:
		withReq(c.log.Debug(), req).Msg("zero-length request")
		return errInval
	case req.off > size || n > size-req.off:
		withReq(c.log.Debug(), req).Int64("size", c.s.size).Msg("request beyond the end of the device")
		return errInval
	case req.off%bs != 0 || n%bs != 0:
		withReq(c.log.Debug(), req).Int64("block_size", c.s.blockSize).Msg("request not block-aligned")
		return errInval
	}
	return 0
}

// withReq adds a request's fields to a log event. Events of disabled
// levels are nil and cost nothing, so the hot path builds no logger.
func withReq(e *zerolog.Event, req request) *zerolog.Event {
	return e.Uint16("cmd", req.typ).Uint64("handle", req.handle).
		Uint64("offset", req.off).Uint32("length", req.length)
}

// errno maps a device error to the NBD error sent to the client.
func (c *conn) errno(err error, req request, op string) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, frontend.ErrInvalid):
		withReq(c.log.Debug(), req).Err(err).Msg(op + " rejected by device")
		return errInval
	default:
		withReq(c.log.Warn(), req).Err(err).Msg(op + " failed")
		return errIO
	}
}

// dispatch runs fn on a worker goroutine; the caller has taken a slot.
func (c *conn) dispatch(fn func()) {
	c.inflight.Add(1)
	go func() {
		defer c.inflight.Done()
		fn()
	}()
}

// buffer is a payload buffer holding a slot and part of the byte budget.
type buffer struct {
	b    []byte
	pool *[]byte
}

// acquire takes a slot and n bytes of budget and returns a buffer of
// length n. It blocks while the connection is at its limits.
func (c *conn) acquire(n int64) (*buffer, bool) {
	c.acquireSlot()
	if err := c.bytes.Acquire(context.Background(), n); err != nil {
		// Only possible if n exceeds the budget, which New rules out.
		c.log.Error().Err(err).Int64("bytes", n).Msg("payload budget")
		c.releaseSlot()
		return nil, false
	}
	p := getBuf(int(n))
	return &buffer{b: *p, pool: p}, true
}

func (c *conn) release(b *buffer) {
	n := int64(len(b.b))
	putBuf(b.pool)
	c.bytes.Release(n)
	c.releaseSlot()
}

// acquireSlot blocks while maxInFlight requests are dispatched, which
// stops reading the socket: the client feels TCP backpressure.
func (c *conn) acquireSlot() { c.slots <- struct{}{} }

func (c *conn) releaseSlot() { <-c.slots }

// reply sends a simple reply (with data for a successful read). It returns
// false once the connection can no longer send, so the reader stops.
func (c *conn) reply(handle uint64, errno uint32, data []byte) bool {
	var hdr [replySize]byte
	binary.BigEndian.PutUint32(hdr[0:], magicReply)
	binary.BigEndian.PutUint32(hdr[4:], errno)
	binary.BigEndian.PutUint64(hdr[8:], handle)

	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return false
	}
	bufs := net.Buffers{hdr[:], data}
	if _, err := bufs.WriteTo(c.nc); err != nil {
		c.werr = err
		if c.stopping.Load() || isDisconnect(err) {
			c.log.Debug().Err(err).Uint64("handle", handle).Msg("reply not delivered: connection gone")
		} else {
			c.log.Warn().Err(err).Uint64("handle", handle).Msg("send reply failed")
		}
		// The stream is broken: make the reader stop too.
		if cerr := c.nc.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
			c.log.Debug().Err(cerr).Msg("close after failed reply")
		}
		return false
	}
	return true
}

// isConnReset reports a connection the peer reset or closed under us.
func isConnReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
