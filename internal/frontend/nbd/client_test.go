package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/frontend"
)

// This file holds the test harness: starting a server and a raw NBD client
// written from the protocol description, used to speak both correct and
// deliberately broken protocol.

// ioDeadline keeps a broken server from hanging a test forever; it is a
// safety net, never the thing a test asserts on.
const ioDeadline = 30 * time.Second

// startServer starts a server for dev and stops it when the test ends,
// failing the test if Serve or Close report an error.
func startServer(t *testing.T, dev frontend.Device, o Options) *Server {
	t.Helper()
	if o.Listen == "" {
		o.Listen = "127.0.0.1:0"
	}
	if o.Export == "" {
		o.Export = "bs3"
	}
	o.Logger = testLogger(t)
	s, err := New(dev, o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve() }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s
}

// testLogger writes server logs to the test log (shown with -v or on
// failure). BS3_TEST_LOG=debug shows protocol details.
func testLogger(t testing.TB) zerolog.Logger {
	level := zerolog.WarnLevel
	if os.Getenv("BS3_TEST_LOG") == "debug" {
		level = zerolog.DebugLevel
	}
	return zerolog.New(zerolog.NewTestWriter(t)).Level(level).With().Timestamp().Logger()
}

// rawClient is a minimal NBD client over one connection.
type rawClient struct {
	t  testing.TB
	nc net.Conn
	r  *bufio.Reader
}

func dialRaw(t testing.TB, addr string) *rawClient {
	t.Helper()
	network := "tcp"
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, addr = "unix", p
	}
	nc, err := net.Dial(network, addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	if err := nc.SetDeadline(time.Now().Add(ioDeadline)); err != nil {
		t.Fatalf("set deadline: %v", err)
	}
	t.Cleanup(func() { nc.Close() }) // may already be closed by the test
	return &rawClient{t: t, nc: nc, r: bufio.NewReader(nc)}
}

func (c *rawClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("client write: %v", err)
	}
}

func (c *rawClient) readN(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		c.t.Fatalf("client read %d bytes: %v", n, err)
	}
	return b
}

// greet reads the server greeting, checks it and sends clientFlags.
func (c *rawClient) greet(clientFlags uint32) {
	c.t.Helper()
	g := c.readN(18)
	if m := binary.BigEndian.Uint64(g[0:]); m != 0x4e42444d41474943 {
		c.t.Fatalf("greeting magic %#x, want NBDMAGIC", m)
	}
	if m := binary.BigEndian.Uint64(g[8:]); m != 0x49484156454f5054 {
		c.t.Fatalf("greeting second magic %#x, want IHAVEOPT", m)
	}
	if f := binary.BigEndian.Uint16(g[16:]); f != 0x3 {
		c.t.Fatalf("handshake flags %#x, want FIXED_NEWSTYLE|NO_ZEROES (0x3)", f)
	}
	c.write(be32(clientFlags))
}

func (c *rawClient) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	var b bytes.Buffer
	b.Write(be64(0x49484156454f5054))
	b.Write(be32(opt))
	b.Write(be32(uint32(len(data))))
	b.Write(data)
	c.write(b.Bytes())
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *rawClient) readOptReply() optReply {
	c.t.Helper()
	h := c.readN(20)
	if m := binary.BigEndian.Uint64(h); m != 0x3e889045565a9 {
		c.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = c.readN(int(binary.BigEndian.Uint32(h[16:])))
	return r
}

// infoData encodes the data of NBD_OPT_INFO / NBD_OPT_GO.
func infoData(name string, infos ...uint16) []byte {
	var b bytes.Buffer
	b.Write(be32(uint32(len(name))))
	b.WriteString(name)
	b.Write(be16(uint16(len(infos))))
	for _, i := range infos {
		b.Write(be16(i))
	}
	return b.Bytes()
}

// exportInfo is what NBD_OPT_INFO / NBD_OPT_GO told about an export.
type exportInfo struct {
	size                      uint64
	flags                     uint16
	minBS, prefBS, maxBS      uint32
	haveBlockSize             bool
	name, description         string
	haveName, haveDescription bool
}

// readInfoReplies reads NBD_REP_INFO replies up to the final one, which it
// returns with the collected information.
func (c *rawClient) readInfoReplies(opt uint32) (exportInfo, optReply) {
	c.t.Helper()
	var ei exportInfo
	for {
		r := c.readOptReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ != 3 { // NBD_REP_INFO
			return ei, r
		}
		if len(r.data) < 2 {
			c.t.Fatalf("NBD_REP_INFO with %d bytes", len(r.data))
		}
		switch binary.BigEndian.Uint16(r.data) {
		case 0:
			if len(r.data) != 12 {
				c.t.Fatalf("NBD_INFO_EXPORT length %d, want 12", len(r.data))
			}
			ei.size = binary.BigEndian.Uint64(r.data[2:])
			ei.flags = binary.BigEndian.Uint16(r.data[10:])
		case 1:
			ei.name, ei.haveName = string(r.data[2:]), true
		case 2:
			ei.description, ei.haveDescription = string(r.data[2:]), true
		case 3:
			if len(r.data) != 14 {
				c.t.Fatalf("NBD_INFO_BLOCK_SIZE length %d, want 14", len(r.data))
			}
			ei.minBS = binary.BigEndian.Uint32(r.data[2:])
			ei.prefBS = binary.BigEndian.Uint32(r.data[6:])
			ei.maxBS = binary.BigEndian.Uint32(r.data[10:])
			ei.haveBlockSize = true
		}
	}
}

// goExport enters the transmission phase with NBD_OPT_GO.
func (c *rawClient) goExport(name string) exportInfo {
	c.t.Helper()
	c.sendOpt(7, infoData(name, 3))
	ei, final := c.readInfoReplies(7)
	if final.typ != 1 {
		c.t.Fatalf("NBD_OPT_GO %q ended with reply type %#x, want ACK", name, final.typ)
	}
	return ei
}

// connect dials, negotiates fixed newstyle without zeroes and enters the
// transmission phase on export.
func connect(t *testing.T, addr, export string) *rawClient {
	t.Helper()
	c := dialRaw(t, addr)
	c.greet(3)
	c.goExport(export)
	return c
}

// send writes one request (and its payload).
func (c *rawClient) send(typ, flags uint16, handle, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(b[0:], 0x25609513)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	c.write(append(b, payload...))
}

// recvReply reads one simple reply header.
func (c *rawClient) recvReply() (errno uint32, handle uint64) {
	c.t.Helper()
	h := c.readN(16)
	if m := binary.BigEndian.Uint32(h); m != 0x67446698 {
		c.t.Fatalf("reply magic %#x, want simple reply 0x67446698", m)
	}
	return binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
}

// do sends one request without payload semantics for reads and returns its
// error; for a successful read, the data.
func (c *rawClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) (uint32, []byte) {
	c.t.Helper()
	const handle uint64 = 0xfeedface12345678
	c.send(typ, flags, handle, off, length, payload)
	errno, h := c.recvReply()
	if h != handle {
		c.t.Fatalf("reply handle %#x, want %#x", h, handle)
	}
	if typ == 0 && errno == 0 {
		return 0, c.readN(int(length))
	}
	return errno, nil
}

func (c *rawClient) readAt(off uint64, n uint32) (uint32, []byte) {
	c.t.Helper()
	return c.do(0, 0, off, n, nil)
}

func (c *rawClient) writeAt(off uint64, p []byte, flags uint16) uint32 {
	c.t.Helper()
	e, _ := c.do(1, flags, off, uint32(len(p)), p)
	return e
}

// mustRoundTrip writes a fresh pattern at off and reads it back.
func (c *rawClient) mustRoundTrip(off uint64, n int, seed byte) {
	c.t.Helper()
	p := pattern(n, seed)
	if e := c.writeAt(off, p, 0); e != 0 {
		c.t.Fatalf("write %d@%d: error %d", n, off, e)
	}
	e, got := c.readAt(off, uint32(n))
	if e != 0 {
		c.t.Fatalf("read %d@%d: error %d", n, off, e)
	}
	if !bytes.Equal(got, p) {
		c.t.Fatalf("read %d@%d returned other data than written", n, off)
	}
}

// disconnect sends NBD_CMD_DISC and expects the server to close.
func (c *rawClient) disconnect() {
	c.t.Helper()
	c.send(2, 0, 0, 0, 0, nil)
	c.expectClosed()
}

// expectClosed reads until the server closes the connection and fails if
// it sends anything first or only the safety deadline ends the wait.
func (c *rawClient) expectClosed() {
	c.t.Helper()
	b := make([]byte, 1)
	n, err := c.r.Read(b)
	if n > 0 {
		c.t.Fatalf("expected the server to close the connection, got byte %#x", b[0])
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		c.t.Fatalf("server kept the connection open")
	}
	if err == nil {
		c.t.Fatalf("expected the server to close the connection, read returned no error")
	}
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// pattern is n bytes that depend on seed and position, so shifted or
// misplaced data does not compare equal.
func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range p {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		p[i] = byte(x)
	}
	return p
}
