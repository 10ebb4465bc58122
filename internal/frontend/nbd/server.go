// Package nbd owns bs3's NBD server: it speaks the NBD protocol (fixed
// newstyle handshake, simple replies) over TCP or a unix socket and serves
// one export backed by a frontend.Device.
//
// Each connection has one goroutine reading requests and a bounded set of
// worker goroutines executing them, so many requests are in flight at once
// and replies go out in completion order, matched by their handle.
//
// Requests need not be aligned to the device block size (the export
// advertises a minimum block size of 1): reads of partial blocks read the
// covering blocks and copy out, writes and write-zeroes of partial blocks
// read, merge and write back the covering block under a lock that orders
// them against every other write of that block. Trims discard only the
// whole blocks they cover. The Device itself only ever sees block-aligned
// requests.
//
// Resources are bounded: a connection must finish its handshake within
// HandshakeTimeout, at most MaxConnections are served at once (more are
// refused), and request payloads held in memory across all connections
// never exceed MaxBuffered. A client that stalls in the middle of sending
// a payload or of reading a reply is disconnected after ioStallTimeout, so
// it cannot hold that memory forever.
//
// Payload buffers are pooled: a Device must not keep the slice passed to
// ReadAt or WriteAt after the call returns (as with io.ReaderAt/WriterAt).
//
// The package must never interpret the device's data, never acknowledge a
// request the device has not completed, never apply a write whose payload
// was not received in full, and never panic or stop serving other
// connections because one client misbehaves.
package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/frontend"
)

// DefaultMaxRequest is the default largest READ/WRITE payload: 32 MiB, the
// size the NBD specification asks servers to accept at least.
const DefaultMaxRequest = 32 << 20

// DefaultExport is the export name used when Options.Export is empty.
const DefaultExport = "bs3"

// DefaultHandshakeTimeout is the default time a connection has to finish
// the handshake.
const DefaultHandshakeTimeout = 10 * time.Second

// DefaultMaxConnections is the default number of connections served at
// once: enough for a kernel client with several connections (-C) plus a
// few tools.
const DefaultMaxConnections = 16

// DefaultMaxBuffered is the default bound on request payloads held in
// memory across all connections: eight maximum-size requests.
const DefaultMaxBuffered = 256 << 20

// maxInFlight bounds the requests one connection has dispatched to the
// device at once; the reader stops reading (TCP backpressure) beyond it.
const maxInFlight = 64

// ioStallTimeout ends a connection whose client takes longer than this
// to send a piece (up to 1 MiB) of a write payload it has started, or to
// accept a piece of a reply. Payload memory is shared by all connections,
// so a stuck client must not hold it forever; an idle client holds none
// and is never cut off.
const ioStallTimeout = 30 * time.Second

// maxRefusing bounds the connections over MaxConnections that are told so
// at once; beyond it they are closed without a word.
const maxRefusing = 4

// closeWriteGrace bounds how long Close waits for a client that does not
// read its replies, so a stuck peer cannot hang shutdown.
const closeWriteGrace = 10 * time.Second

// Options configure a Server.
type Options struct {
	// Listen is "host:port" for TCP or "unix:/path" for a unix socket.
	Listen string
	// Listener, when set, is used instead of listening on Listen: main
	// binds the address (Listen) before it attaches the volume, so an
	// address in use fails the start before anything is claimed. The
	// server owns it once New succeeds (Close closes it).
	Listener net.Listener
	// Export is the export name; the empty name (the protocol's default
	// export) is served too. Empty means DefaultExport.
	Export string
	// MaxRequest is the largest READ/WRITE payload accepted, advertised as
	// the maximum block size. Zero means DefaultMaxRequest. It must be a
	// multiple of the device block size and below 4 GiB.
	MaxRequest int64
	// HandshakeTimeout bounds the time from accept to the end of the
	// handshake; a connection that has not chosen the export by then is
	// closed. Zero means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// MaxConnections bounds the connections served at once, handshakes
	// included. Further connections are refused: their options get
	// NBD_REP_ERR_POLICY with a message, then they are closed. Zero means
	// DefaultMaxConnections.
	MaxConnections int
	// MaxBuffered bounds the bytes of request payloads (and of the blocks
	// read for read-modify-write) held in memory across all connections.
	// A request that would exceed it waits until others complete; one
	// larger than the bound waits until nothing else is buffered and then
	// runs alone. Zero means DefaultMaxBuffered.
	MaxBuffered int64
	// TLS, when not nil, lets clients upgrade with NBD_OPT_STARTTLS;
	// TLSRequired (which needs TLS) refuses clients that do not.
	TLS         *tls.Config
	TLSRequired bool
	// SocketGroup, for a unix socket, is the group allowed to connect
	// (mode 0660); empty means the owner only (mode 0600).
	SocketGroup string
	// Logger receives connection events and protocol violations.
	Logger zerolog.Logger

	// stallTimeout replaces ioStallTimeout when set (tests).
	stallTimeout time.Duration
}

// Server serves one frontend.Device over NBD.
type Server struct {
	dev frontend.Device
	// tw is dev when it can take small writes without waiting: the
	// reader then runs them itself (docs/ARCHITECTURE.md §20).
	tw frontend.TryWriter
	// ww, when the device takes payloads in its windows of winSize
	// bytes: writes of a window or more are read into them.
	ww      frontend.WindowWriter
	winSize int64
	// ro, when the device reads ahead of streams: each read is observed
	// by the reader in the order it arrived (frontend.ReadObserver).
	ro        frontend.ReadObserver
	export    string
	size      int64
	blockSize int64
	maxReq    int64
	log       zerolog.Logger

	handshakeTimeout time.Duration
	maxConns         int
	tls              *tls.Config
	tlsRequired      bool
	stall            time.Duration
	// buffered bounds the payload memory of all connections.
	buffered *budget
	// locks order read-modify-write of partial blocks against every other
	// write of the same blocks.
	locks blockLocks
	// partialOps counts reads, writes and write-zeroes that touched a
	// partial block (tests).
	partialOps atomic.Int64

	ln      net.Listener
	network string // "tcp" or "unix"
	// devCtx is passed to device calls. It is never cancelled: Close waits
	// for in-flight requests rather than aborting them half-done.
	devCtx context.Context

	mu       sync.Mutex
	closed   bool
	conns    map[*conn]struct{} // served; at most maxConns
	refusing map[*conn]struct{} // over the limit, being told so

	connWG    sync.WaitGroup // one per connection goroutine
	closeOnce sync.Once
	closeErr  error
}

// New validates the options against the device and starts listening; call
// Serve to accept connections. A stale unix socket file (one nobody
// listens on) is removed first; any other existing file is an error.
func New(dev frontend.Device, o Options) (*Server, error) {
	if dev == nil {
		return nil, errors.New("nbd: nil device")
	}
	s := &Server{
		dev:              dev,
		export:           o.Export,
		size:             dev.Size(),
		blockSize:        dev.BlockSize(),
		maxReq:           o.MaxRequest,
		handshakeTimeout: o.HandshakeTimeout,
		maxConns:         o.MaxConnections,
		stall:            o.stallTimeout,
		tls:              o.TLS,
		tlsRequired:      o.TLSRequired,
		log:              o.Logger,
		devCtx:           context.Background(),
		conns:            make(map[*conn]struct{}),
		refusing:         make(map[*conn]struct{}),
	}
	switch {
	case o.TLSRequired && o.TLS == nil:
		return nil, errors.New("nbd: TLS is required but not configured (nbd.tls = \"require\" needs tls_cert and tls_key)")
	case o.HandshakeTimeout < 0:
		return nil, fmt.Errorf("nbd: handshake timeout %v is negative", o.HandshakeTimeout)
	case o.MaxConnections < 0:
		return nil, fmt.Errorf("nbd: max connections %d is negative", o.MaxConnections)
	case o.MaxBuffered < 0:
		return nil, fmt.Errorf("nbd: max buffered %d is negative", o.MaxBuffered)
	}
	if s.handshakeTimeout == 0 {
		s.handshakeTimeout = DefaultHandshakeTimeout
	}
	if s.maxConns == 0 {
		s.maxConns = DefaultMaxConnections
	}
	if s.stall <= 0 {
		s.stall = ioStallTimeout
	}
	maxBuffered := o.MaxBuffered
	if maxBuffered == 0 {
		maxBuffered = DefaultMaxBuffered
	}
	s.buffered = newBudget(maxBuffered)
	s.tw, _ = dev.(frontend.TryWriter)
	s.ro, _ = dev.(frontend.ReadObserver)
	if ww, ok := dev.(frontend.WindowWriter); ok {
		if w := ww.PayloadWindow(); w != nil {
			s.ww, s.winSize = ww, int64(len(w))
			ww.RecycleWindows([][]byte{w})
		}
	}
	if s.export == "" {
		s.export = DefaultExport
	}
	if len(s.export) > maxNameLen {
		return nil, fmt.Errorf("nbd: export name is %d bytes, at most %d allowed", len(s.export), maxNameLen)
	}
	if s.maxReq == 0 {
		s.maxReq = DefaultMaxRequest
	}
	bs := s.blockSize
	// The protocol's minimum block size must be a power of two ≤ 64 KiB.
	if bs <= 0 || bs > 64<<10 || bits.OnesCount64(uint64(bs)) != 1 {
		return nil, fmt.Errorf("nbd: device block size %d is not a power of two between 1 and 65536", bs)
	}
	if s.size < 0 || s.size%bs != 0 {
		return nil, fmt.Errorf("nbd: device size %d is not a multiple of the block size %d", s.size, bs)
	}
	if s.maxReq < bs || s.maxReq%bs != 0 || s.maxReq > 0xffffffff {
		return nil, fmt.Errorf("nbd: max request %d must be a multiple of the block size %d and below 4 GiB", s.maxReq, bs)
	}
	if s.maxReq > maxBuffered {
		s.log.Info().Int64("max_request", s.maxReq).Int64("max_buffered", maxBuffered).
			Msg("requests larger than max_buffered are served one at a time")
	}

	ln, network := o.Listener, ""
	if ln != nil {
		network = ln.Addr().Network()
	} else {
		var err error
		if ln, network, err = listen(o.Listen, o.SocketGroup); err != nil {
			return nil, err
		}
	}
	s.ln, s.network = ln, network
	s.log.Info().Str("listen", s.Addr()).Str("export", s.export).Int64("size", s.size).
		Int64("block_size", bs).Int64("max_request", s.maxReq).
		Dur("handshake_timeout_ms", s.handshakeTimeout).Int("max_connections", s.maxConns).
		Int64("max_buffered", maxBuffered).Msg("nbd server listening")
	return s, nil
}

// listen opens a TCP or unix listener for addr ("unix:/path" or host:port).
func listen(addr, group string) (net.Listener, string, error) {
	if addr == "" {
		return nil, "", errors.New("nbd: empty listen address")
	}
	path, isUnix := strings.CutPrefix(addr, "unix:")
	if !isUnix {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, "", fmt.Errorf("nbd: listen on %s: %w", addr, err)
		}
		return ln, "tcp", nil
	}
	if path == "" {
		return nil, "", errors.New("nbd: empty unix socket path")
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, "", err
	}
	ln, err := listenUnixPrivate(path, group)
	if err != nil {
		return nil, "", err
	}
	return ln, "unix", nil
}

// removeStaleSocket deletes path if it is a unix socket nobody accepts on
// (left behind by a crashed daemon). A live socket or a non-socket file is
// an error: deleting those would steal another server's address or lose a
// user's file.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("nbd: stat unix socket %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("nbd: %s exists and is not a socket", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		if cerr := c.Close(); cerr != nil {
			return fmt.Errorf("nbd: unix socket %s is in use (closing probe: %v)", path, cerr)
		}
		return fmt.Errorf("nbd: unix socket %s is in use by another server", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("nbd: remove stale unix socket %s: %w", path, err)
	}
	return nil
}

// Addr is the address the server listens on, in the form Options.Listen
// takes ("127.0.0.1:10809" or "unix:/path"), with the real port when the
// options asked for port 0.
func (s *Server) Addr() string {
	if s.network == "unix" {
		return "unix:" + s.ln.Addr().String()
	}
	return s.ln.Addr().String()
}

// URI is the NBD URI of the export, as qemu and libnbd tools take it:
// nbd://host:port/export or nbd+unix:///export?socket=/path.
func (s *Server) URI() string {
	if s.network == "unix" {
		return "nbd+unix:///" + url.PathEscape(s.export) + "?socket=" + url.QueryEscape(s.ln.Addr().String())
	}
	return "nbd://" + s.ln.Addr().String() + "/" + url.PathEscape(s.export)
}

// Serve accepts connections until Close; it returns nil after Close and an
// error if accepting fails otherwise. Call it once.
func (s *Server) Serve() error {
	var backoff time.Duration
	for {
		nc, err := s.ln.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporaryAccept(err) {
				// Out of file descriptors and the like: wait and retry
				// rather than bring the whole frontend down.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn().Err(err).Dur("retry_in_ms", backoff).Msg("accept failed")
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbd: accept on %s: %w", s.Addr(), err)
		}
		backoff = 0
		c := s.newConn(nc)
		// The deadline is set before the connection is tracked, so that a
		// Close from now on overrides it rather than the other way round.
		if err := nc.SetDeadline(time.Now().Add(s.handshakeTimeout)); err != nil {
			c.log.Warn().Err(err).Msg("set handshake deadline; closing connection")
			c.closeConn()
			continue
		}
		switch s.track(c) {
		case admitServe:
			go c.serve()
		case admitRefuse:
			go c.refuse()
		case admitClosing:
			c.log.Debug().Msg("connection refused: server closing")
			c.closeConn()
		case admitDrop:
			c.log.Warn().Int("max_connections", s.maxConns).
				Msg("connection refused without a reply: max_connections reached and too many refusals under way")
			c.closeConn()
		}
	}
}

// isTemporaryAccept reports accept errors worth retrying: resource
// exhaustion and peers that gave up during the TCP handshake.
func isTemporaryAccept(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
		syscall.ECONNABORTED, syscall.ECONNRESET} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// admission is what track decided for a new connection.
type admission int

const (
	admitServe   admission = iota // serve it
	admitRefuse                   // over max_connections: tell the client and close
	admitClosing                  // the server is closing: close
	admitDrop                     // over max_connections and maxRefusing: close
)

// track registers c as served or refused, within the limits; for those
// two the caller then owns one count of connWG until c.serve or c.refuse
// returns.
func (s *Server) track(c *conn) admission {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return admitClosing
	case len(s.conns) < s.maxConns:
		s.conns[c] = struct{}{}
		s.connWG.Add(1)
		return admitServe
	case len(s.refusing) < maxRefusing:
		s.refusing[c] = struct{}{}
		s.connWG.Add(1)
		return admitRefuse
	}
	return admitDrop
}

func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	delete(s.refusing, c)
	s.mu.Unlock()
	s.connWG.Done()
}

// activeConns is the number of connections being served (tests wait on it).
func (s *Server) activeConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// bufferedPeak is the most payload bytes ever held at once (tests).
func (s *Server) bufferedPeak() int64 { return s.buffered.peak.Load() }

// Close stops accepting, stops reading new requests on every connection,
// waits for the requests already dispatched to complete and their replies
// to be sent, then closes the connections. No request is left half-done: a
// write whose payload had not fully arrived is dropped, one that reached
// the device completes. Close is idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		conns := make([]*conn, 0, len(s.conns)+len(s.refusing))
		for c := range s.conns {
			conns = append(conns, c)
		}
		for c := range s.refusing {
			conns = append(conns, c)
		}
		s.mu.Unlock()

		if err := s.ln.Close(); err != nil {
			s.closeErr = fmt.Errorf("nbd: close listener %s: %w", s.Addr(), err)
		}
		for _, c := range conns {
			c.stop()
		}
		s.connWG.Wait()
		s.log.Info().Msg("nbd server closed")
	})
	return s.closeErr
}
