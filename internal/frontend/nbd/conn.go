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

	"github.com/bs3/bs3/internal/crc32c"
	"github.com/bs3/bs3/internal/frontend"
)

// conn is one client connection.
type conn struct {
	s   *Server
	nc  net.Conn
	r   *bufio.Reader
	log zerolog.Logger

	// stopping is set by Server.Close; read errors after it are expected.
	// stopAt is the write deadline Close gave the connection (unix ns),
	// stored before stopping.
	stopping atomic.Bool
	stopAt   atomic.Int64
	// ctx ends when Close stops the connection; it only interrupts waits
	// for payload budget, never a device call.
	ctx    context.Context
	cancel context.CancelFunc

	// slots bounds dispatched requests; payload memory is bounded by the
	// server's budget, shared by all connections.
	slots chan struct{}
	// inflight counts dispatched requests not yet replied to.
	inflight sync.WaitGroup
	// Dispatched requests run on workers that live as long as the
	// connection: an idle one waits on work, and dispatch starts another
	// only when none is idle (at most the slots, plus the reader's
	// flushes). Why not a goroutine per request: each new goroutine grew
	// its stack again on the device's read path (copied twice per
	// request), which took a fifth of the CPU of cached 4 KiB reads.
	work    chan func()
	quit    chan struct{} // closed when the connection ends: idle workers return
	workers sync.WaitGroup

	// Replies: one goroutine at a time writes (the sender); replies
	// without data that complete meanwhile are appended to batch and
	// sent by it in one write, so a queue of small write acknowledgements
	// costs one syscall, not one each.
	wmu       sync.Mutex
	wcond     *sync.Cond // signalled when sending ends (wmu)
	sending   bool       // a goroutine is writing replies (wmu)
	waiting   int        // data replies waiting for the sender to finish (wmu)
	batch     []byte     // data-less reply headers waiting for the sender (wmu)
	deferred  int        // replies of inline writes in batch (wmu)
	spare     []byte     // the previous batch's buffer, for reuse (wmu)
	werr      error      // first reply write error; later replies are dropped (wmu)
	wdeadline time.Time  // write deadline last set by armWrite (the sender)
	// The sender's write in progress, kept here so that no reply
	// allocates: a header and a slice list on the stack would escape
	// through net.Buffers.WriteTo (the sender).
	sendHdr [replySize]byte
	iovs    [2][]byte
	iov     net.Buffers
}

// readBufferSize is the request reader's buffer: one socket read takes
// many pipelined small requests, and a write payload of up to
// inlineWriteMax is taken straight from it (Peek) with its header.
const readBufferSize = 256 << 10

// inlineWriteMax is the largest write the reader runs itself when the
// device can take it at once (docs/ARCHITECTURE.md §20).
const inlineWriteMax = 128 << 10

// errStalled marks a client that stopped sending a payload or reading its
// replies for the stall timeout.
var errStalled = errors.New("client stalled")

// request is one decoded transmission request.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	off    uint64
	length uint32
}

func (s *Server) newConn(nc net.Conn) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	c := &conn{
		s:      s,
		nc:     nc,
		r:      bufio.NewReaderSize(nc, readBufferSize),
		log:    s.log.With().Str("remote", remoteName(nc)).Logger(),
		ctx:    ctx,
		cancel: cancel,
		slots:  make(chan struct{}, maxInFlight),
		work:   make(chan func()),
		quit:   make(chan struct{}),
	}
	c.wcond = sync.NewCond(&c.wmu)
	return c
}

// closeConn closes the socket, logging a failure.
func (c *conn) closeConn() {
	c.cancel()
	if err := c.nc.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		c.log.Debug().Err(err).Msg("close connection")
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
//
// Deadlines the connection sets itself (handshake, payload and reply
// stalls) are set first and followed by a check of stopping, and stop
// sets stopping before its own deadlines, so whichever runs last, a
// stopped connection never keeps a later deadline than stop gave it.
func (c *conn) stop() {
	now := time.Now()
	c.stopAt.Store(now.Add(closeWriteGrace).UnixNano())
	c.stopping.Store(true)
	c.cancel()
	if err := c.nc.SetReadDeadline(now); err != nil {
		c.log.Debug().Err(err).Msg("set read deadline")
	}
	if err := c.nc.SetWriteDeadline(now.Add(closeWriteGrace)); err != nil {
		c.log.Debug().Err(err).Msg("set write deadline")
	}
}

// serve runs the connection to its end; it owns the connection. The
// handshake deadline was set by Serve.
func (c *conn) serve() {
	defer c.s.untrack(c)
	defer c.closeConn()
	c.log.Debug().Msg("connection opened")

	if err := c.negotiate(); err != nil {
		switch {
		case errors.Is(err, errAbort):
			c.log.Debug().Msg("client aborted negotiation")
		case errors.Is(err, os.ErrDeadlineExceeded) && !c.stopping.Load():
			c.log.Warn().Err(err).Dur("handshake_timeout_ms", c.s.handshakeTimeout).
				Msg("handshake not completed in time; closing connection")
		case c.stopping.Load() || isDisconnect(err):
			c.log.Debug().Err(err).Msg("negotiation ended")
		default:
			c.log.Warn().Err(err).Msg("negotiation failed; closing connection")
		}
		return
	}
	// An established connection may stay idle as long as it likes.
	if err := c.nc.SetDeadline(time.Time{}); err != nil {
		c.log.Warn().Err(err).Msg("clear handshake deadline; closing connection")
		return
	}
	if c.stopping.Load() {
		c.log.Debug().Msg("server closing at the end of the handshake")
		return
	}
	c.log.Debug().Msg("transmission phase")
	c.transmit()
	// Replies of writes the reader ran, and of requests already
	// dispatched, still go out before close.
	c.flushReplies()
	c.inflight.Wait()
	close(c.quit)
	c.workers.Wait()
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
		if c.r.Buffered() < requestSize {
			// The reader may block: replies of the writes it ran
			// itself go out first (§20).
			c.flushReplies()
		}
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
	if errors.Is(err, errStalled) {
		c.log.Warn().Err(err).Msg(what + ": client stalled; closing connection")
		return
	}
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
	bs := c.s.blockSize
	off, n := int64(req.off), int64(req.length)
	switch req.typ {
	case cmdWrite:
		if n > c.s.maxReq {
			// The payload is too big to buffer, and skipping it blindly
			// would only keep a hostile client busy: hang up.
			withReq(c.log.Warn(), req).Int64("max", c.s.maxReq).Msg("write payload over the maximum; closing connection")
			return false
		}
		if done, ok := c.writeInline(req); done {
			return ok
		}
		if done, ok := c.writeWindows(req); done {
			return ok
		}
		// The offset is not validated yet (the payload must be read to
		// stay in sync), so scratch is reserved for any misalignment.
		buf, ok := c.acquire(n, scratchFor(off, n, bs))
		if !ok {
			return false
		}
		if err := c.readPayload(buf.b); err != nil {
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
			err := c.s.writeAt(c.s.devCtx, buf.b, off, fua)
			c.release(buf)
			c.reply(req.handle, c.errno(err, req, "write"), nil)
		})

	case cmdRead:
		if n > c.s.maxReq {
			withReq(c.log.Debug(), req).Int64("max", c.s.maxReq).Msg("read over the maximum")
			return c.reply(req.handle, errInval, nil)
		}
		if e := c.check(req, cmdFlagFUA); e != 0 {
			return c.reply(req.handle, e, nil)
		}
		buf, ok := c.acquire(n, scratchFor(off, n, bs))
		if !ok {
			return false
		}
		ctx := c.s.devCtx
		if c.s.ro != nil {
			ctx = c.s.ro.ObserveRead(ctx, off, n)
		}
		c.dispatch(func() {
			err := c.s.readAt(ctx, buf.b, off)
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
		trim := req.typ == cmdTrim
		// Write-zeroes of partial blocks reads one block at a time.
		var scratch int64
		if !trim {
			scratch = scratchFor(off, n, bs)
		}
		buf, ok := c.acquire(0, scratch)
		if !ok {
			return false
		}
		// NO_HOLE asks for allocated zeroes; otherwise a hole is fine.
		discard := trim || req.flags&cmdFlagNoHole == 0
		fua := req.flags&cmdFlagFUA != 0
		op := "trim"
		if !trim {
			op = "write zeroes"
		}
		c.dispatch(func() {
			err := c.s.zero(c.s.devCtx, off, n, trim, discard, fua)
			c.release(buf)
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

// writeInline runs a small aligned write without FUA on the reader's
// goroutine when the device can take it without waiting: the payload goes
// from the read buffer straight into the open chunk, no worker goroutine
// is started, and the reply joins the batch that goes out when the reader
// next runs out of buffered requests (docs/ARCHITECTURE.md §20). done is
// false, with nothing read, when the write must take the general path;
// ok is false when the connection must end.
func (c *conn) writeInline(req request) (done, ok bool) {
	bs, off, n := c.s.blockSize, int64(req.off), int64(req.length)
	if c.s.tw == nil || req.flags != 0 || n > inlineWriteMax || !aligned(off, n, bs) {
		return false, true
	}
	if c.check(req, 0) != 0 {
		return false, true // the general path reads the payload and refuses it
	}
	// The payload must be in the read buffer: waiting for the socket
	// here would hold the replies batched so far.
	if c.r.Buffered() < int(n) {
		return false, true
	}
	h, locked := c.s.locks.tryLockShared(off, off+n)
	if !locked {
		return false, true // a read-modify-write holds these blocks
	}
	p, err := c.r.Peek(int(n))
	if err != nil { // cannot happen: n bytes are buffered
		h.unlock()
		return false, true
	}
	took, werr := c.s.tw.TryWriteAt(p, off)
	h.unlock()
	if !took {
		return false, true // the device would wait: the worker path does
	}
	if _, err := c.r.Discard(int(n)); err != nil {
		c.log.Warn().Err(err).Msg("discard write payload")
		return true, false
	}
	return true, c.deferReply(req.handle, c.errno(werr, req, "write"))
}

// writeWindows reads a write of at least a window, aligned to the
// block size, into windows of the device (frontend.WindowWriter), which
// its chunk keeps as they are where they line up with its own, so the
// payload is never copied after the socket read. done is false, with
// nothing read, when the write takes the general path; ok is false when
// the connection must end.
func (c *conn) writeWindows(req request) (done, ok bool) {
	off, n := int64(req.off), int64(req.length)
	if c.s.ww == nil || n < c.s.winSize || !aligned(off, n, c.s.blockSize) {
		return false, true
	}
	buf, ok := c.acquire(0, n) // the budget only: the windows hold the payload
	if !ok {
		return true, false
	}
	k := (n + c.s.winSize - 1) / c.s.winSize
	wins := make([][]byte, k)
	for i := range wins {
		wins[i] = c.s.ww.PayloadWindow()
	}
	wins[k-1] = wins[k-1][:n-(k-1)*c.s.winSize]
	// Each window is checksummed right after it is read, while it is in
	// the CPU's cache: the chunk's checksum is combined from these.
	crcs := make([]uint32, k)
	err := c.readPayloadV(wins, func(i int) { crcs[i] = crc32c.Checksum(wins[i]) })
	if err != nil {
		c.logReadEnd(err, "read write payload")
		c.s.ww.RecycleWindows(wins)
		c.release(buf)
		return true, false
	}
	if e := c.check(req, cmdFlagFUA); e != 0 {
		c.s.ww.RecycleWindows(wins)
		c.release(buf)
		return true, c.reply(req.handle, e, nil)
	}
	fua := req.flags&cmdFlagFUA != 0
	c.dispatch(func() {
		err := c.s.writeWindows(c.s.devCtx, wins, crcs, n, off, fua)
		c.release(buf)
		c.reply(req.handle, c.errno(err, req, "write"), nil)
	})
	return true, true
}

// check validates flags and range; it returns an NBD error or 0. Any
// alignment is valid.
func (c *conn) check(req request, allowedFlags uint16) uint32 {
	if req.flags&^allowedFlags != 0 {
		withReq(c.log.Debug(), req).Uint16("flags", req.flags).Msg("invalid command flags")
		return errInval
	}
	size := uint64(c.s.size)
	n := uint64(req.length)
	switch {
	case n == 0:
		withReq(c.log.Debug(), req).Msg("zero-length request")
		return errInval
	case req.off > size || n > size-req.off:
		withReq(c.log.Debug(), req).Int64("size", c.s.size).Msg("request beyond the end of the device")
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
	select {
	case c.work <- fn: // an idle worker took it
	default:
		c.workers.Add(1)
		go c.worker(fn)
	}
}

// worker runs fn, then whatever dispatch hands it, until the connection
// ends.
func (c *conn) worker(fn func()) {
	defer c.workers.Done()
	for {
		fn()
		c.inflight.Done()
		select {
		case fn = <-c.work:
		case <-c.quit:
			return
		}
	}
}

// buffer is a request's share of the payload budget with its payload
// buffer (none for write-zeroes), holding a slot.
type buffer struct {
	b      []byte
	pool   *[]byte
	weight int64 // bytes of budget held
}

// acquire takes a slot and n+scratch bytes of budget, and returns a
// buffer of length n. It blocks while the connection has maxInFlight
// requests dispatched or the server's payload bound would be exceeded; it
// fails only when Close stops the connection.
func (c *conn) acquire(n, scratch int64) (*buffer, bool) {
	c.acquireSlot()
	w := n + scratch
	if w > 0 {
		if !c.s.buffered.tryAcquire(w) {
			// Waiting for other requests: batched replies go out
			// first, so none waits behind this one.
			c.flushReplies()
			if err := c.s.buffered.acquire(c.ctx, w); err != nil {
				c.log.Debug().Err(err).Msg("payload budget not granted")
				c.releaseSlot()
				return nil, false
			}
		}
	}
	buf := &buffer{weight: w}
	if n > 0 {
		buf.pool = getBuf(int(n))
		buf.b = *buf.pool
	}
	return buf, true
}

func (c *conn) release(b *buffer) {
	if b.pool != nil {
		putBuf(b.pool)
	}
	if b.weight > 0 {
		c.s.buffered.release(b.weight)
	}
	c.releaseSlot()
}

// directRead is the size from which a payload piece is read straight
// from the connection once the reader's buffer is drained: through the
// buffer (256 KiB) it would be copied once more. Smaller pieces go
// through the buffer, which also takes the requests behind them.
const directRead = 64 << 10

// ioPiece is the most a payload read or reply write does under one
// deadline: a client that keeps making progress is never cut off.
const ioPiece = 1 << 20

// readPayload reads a write's payload, failing if the client stalls for
// the stall timeout, then clears the deadline: between requests a client
// may be idle as long as it likes.
func (c *conn) readPayload(p []byte) error {
	one := [1][]byte{p}
	return c.readPayloadV(one[:], nil)
}

// readPayloadV is readPayload of a payload read into the pieces ps, in
// order; read(i), when not nil, runs once piece i is read.
func (c *conn) readPayloadV(ps [][]byte, read func(i int)) error {
	armed := false
	for i, p := range ps {
		// A large piece takes what the reader holds, then the rest
		// straight from the connection: through the reader's buffer it
		// would be copied once more.
		direct := len(p) >= directRead
		if b := c.r.Buffered(); direct && b > 0 {
			n, err := c.r.Read(p[:min(b, len(p))])
			if err != nil {
				return err
			}
			p = p[n:]
		}
		for len(p) > 0 {
			k := min(len(p), ioPiece)
			// A payload already buffered (small pipelined writes) needs
			// no socket read, hence no deadline.
			if direct || c.r.Buffered() < k {
				c.flushReplies() // the read may block: no reply waits behind it
				if err := c.nc.SetReadDeadline(time.Now().Add(c.s.stall)); err != nil {
					return fmt.Errorf("set payload read deadline: %w", err)
				}
				armed = true
				if c.stopping.Load() {
					return errors.New("server closing during the payload")
				}
			}
			src := io.Reader(c.r)
			if direct {
				src = c.nc
			}
			if _, err := io.ReadFull(src, p[:k]); err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) && !c.stopping.Load() {
					return fmt.Errorf("%w: payload not received within %v (%v)", errStalled, c.s.stall, err)
				}
				return err
			}
			p = p[k:]
		}
		if read != nil {
			read(i)
		}
	}
	if !armed {
		return nil
	}
	if err := c.nc.SetReadDeadline(time.Time{}); err != nil {
		return fmt.Errorf("clear payload read deadline: %w", err)
	}
	if c.stopping.Load() {
		// Close ran while the deadline was ours: restore its effect.
		if err := c.nc.SetReadDeadline(time.Now()); err != nil {
			c.log.Debug().Err(err).Msg("set read deadline")
		}
	}
	return nil
}

// armWrite makes sure the next reply write has at least half the stall
// timeout to make progress, without ever pushing back the deadline Close
// set. Called with wmu held.
func (c *conn) armWrite() error {
	now := time.Now()
	if c.wdeadline.Sub(now) >= c.s.stall/2 || c.stopping.Load() {
		return nil
	}
	c.wdeadline = now.Add(c.s.stall)
	if err := c.nc.SetWriteDeadline(c.wdeadline); err != nil {
		return fmt.Errorf("set reply write deadline: %w", err)
	}
	if c.stopping.Load() {
		// stop may have set its deadline just before ours: put it back.
		if err := c.nc.SetWriteDeadline(time.Unix(0, c.stopAt.Load())); err != nil {
			return fmt.Errorf("restore close write deadline: %w", err)
		}
	}
	return nil
}

// acquireSlot blocks while maxInFlight requests are dispatched, which
// stops reading the socket: the client feels TCP backpressure.
func (c *conn) acquireSlot() {
	select {
	case c.slots <- struct{}{}:
	default:
		c.flushReplies() // about to wait: batched replies go out first
		c.slots <- struct{}{}
	}
}

func (c *conn) releaseSlot() { <-c.slots }

// batchDataMax is the largest read reply that is copied into the batch
// when another goroutine is sending, instead of waiting for its turn to
// write on its own: copying 16 KiB costs less than a write and the
// wake-up of a waiter. In-flight requests bound what a batch can hold
// (maxInFlight × 16 KiB).
const batchDataMax = 16 << 10

// reply sends a simple reply (with data for a successful read). It returns
// false once the connection can no longer send, so the reader stops. A
// reply without data, or with at most batchDataMax bytes of it, may be
// handed to the goroutine that is sending and go out in its next write
// (the data copied: the caller may reuse it at once); NBD replies may
// come in any order.
func (c *conn) reply(handle uint64, errno uint32, data []byte) bool {
	hdr := replyHeader(handle, errno)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return false
	}
	switch {
	case data == nil:
		c.batch = append(c.batch, hdr[:]...)
		if c.sending {
			return true // the sender writes it with its next batch
		}
	case c.sending && len(data) <= batchDataMax:
		c.batch = append(c.batch, hdr[:]...)
		c.batch = append(c.batch, data...)
		return true
	default:
		c.waiting++
		for c.sending {
			c.wcond.Wait()
		}
		c.waiting--
		if c.werr != nil {
			return false
		}
	}
	c.sending = true
	var err error
	if data != nil {
		c.wmu.Unlock()
		c.sendHdr = hdr
		err = c.sendLocked(c.sendHdr[:], data)
		c.wmu.Lock()
	}
	return c.drainLocked(err, handle)
}

// maxDeferred bounds the replies of inline writes held for the next flush,
// so a client that keeps the read buffer full still gets its replies.
const maxDeferred = 64

// deferReply queues the reply of a write the reader ran itself: it goes
// out with the next batch, at the latest when the reader flushes before it
// could block (§20). It returns false once the connection can no longer
// send.
func (c *conn) deferReply(handle uint64, errno uint32) bool {
	hdr := replyHeader(handle, errno)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return false
	}
	c.batch = append(c.batch, hdr[:]...)
	c.deferred++
	if c.sending || c.deferred < maxDeferred {
		return true
	}
	c.sending = true
	return c.drainLocked(nil, handle)
}

// flushReplies sends the batched replies now unless a sender is at work
// (it sends them). The reader calls it before anything that may block.
func (c *conn) flushReplies() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil || c.sending || len(c.batch) == 0 {
		return
	}
	c.sending = true
	c.drainLocked(nil, 0)
}

// drainLocked is the end of a sender's turn: unless err, it sends the
// batched replies, then stops being the sender. After one batch, a
// waiting data reply takes over (and sends what is batched after its
// own), so a steady flow of write acknowledgements cannot hold a read's
// reply back. On error it breaks the connection and returns false.
func (c *conn) drainLocked(err error, handle uint64) bool {
	for sent := 0; err == nil && len(c.batch) > 0 && (sent == 0 || c.waiting == 0); sent++ {
		b := c.batch
		c.batch, c.spare = c.spare[:0], nil
		c.deferred = 0
		c.wmu.Unlock()
		err = c.sendLocked(b, nil)
		c.wmu.Lock()
		c.spare = b[:0]
	}
	c.sending = false
	c.wcond.Broadcast()
	if err != nil {
		c.werr = err
		switch {
		case errors.Is(err, errStalled):
			c.log.Warn().Err(err).Uint64("handle", handle).Msg("client stopped reading replies; closing connection")
		case c.stopping.Load() || isDisconnect(err):
			c.log.Debug().Err(err).Uint64("handle", handle).Msg("reply not delivered: connection gone")
		default:
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

// replyHeader encodes a simple reply header.
func replyHeader(handle uint64, errno uint32) [replySize]byte {
	var hdr [replySize]byte
	binary.BigEndian.PutUint32(hdr[0:], magicReply)
	binary.BigEndian.PutUint32(hdr[4:], errno)
	binary.BigEndian.PutUint64(hdr[8:], handle)
	return hdr
}

// sendLocked writes a reply header (or a batch of them) and its data in
// pieces of at most ioPiece bytes, each under a stall deadline. Called by
// the sender only (conn.sending), without wmu.
func (c *conn) sendLocked(hdr, data []byte) error {
	for first := true; first || len(data) > 0; first = false {
		if err := c.armWrite(); err != nil {
			return err
		}
		k := min(len(data), ioPiece)
		n := 0
		if first {
			c.iovs[0], n = hdr, 1
		}
		c.iovs[n] = data[:k]
		c.iov = c.iovs[:n+1]
		_, err := c.iov.WriteTo(c.nc)
		c.iovs = [2][]byte{} // hold no reference to the data
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !c.stopping.Load() {
				return fmt.Errorf("%w: reply not read within %v (%v)", errStalled, c.s.stall, err)
			}
			return err
		}
		data = data[k:]
	}
	return nil
}

// isConnReset reports a connection the peer reset or closed under us.
func isConnReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
