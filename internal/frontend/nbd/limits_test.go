package nbd

import (
	"bytes"
	"github.com/bs3/bs3/internal/testutil"
	"strings"
	"testing"
	"time"
)

// shortDeadline replaces the client's safety deadline, so that a server
// that fails to close a connection fails the test in seconds.
func (c *rawClient) shortDeadline(d time.Duration) {
	c.t.Helper()
	if err := c.nc.SetDeadline(time.Now().Add(d)); err != nil {
		c.t.Fatalf("set deadline: %v", err)
	}
}

// A connection that does not finish the handshake in time is closed, at
// whatever point it stalls; one that finished it may idle for longer.
func TestHandshakeTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	dev := newMemDevice(8<<20, 4096)
	srv := startServer(t, dev, Options{HandshakeTimeout: timeout})

	for _, k := range []struct {
		name string
		do   func(c *rawClient)
	}{
		{"silent client", func(c *rawClient) { c.readN(18) }}, // the greeting only
		{"greeted, no option", func(c *rawClient) { c.greet(3) }},
		{"half an option header", func(c *rawClient) {
			c.greet(3)
			c.write(be64(0x49484156454f5054))
		}},
		{"options but never an export", func(c *rawClient) {
			c.greet(3)
			c.sendOpt(3, nil) // LIST
			c.readOptReply()
			c.readOptReply()
		}},
	} {
		t.Run(k.name, func(t *testing.T) {
			start := time.Now()
			c := dialRaw(t, srv.Addr())
			c.shortDeadline(5 * time.Second)
			k.do(c)
			c.expectClosed()
			if d := time.Since(start); d < timeout-50*time.Millisecond {
				t.Fatalf("closed after %v, before the %v timeout", d, timeout)
			}
		})
	}
	testutil.WaitWithin(t, ioDeadline, "timed-out connections to be released", func() bool { return srv.activeConns() == 0 })

	t.Run("established connection may idle", func(t *testing.T) {
		c := connect(t, srv.Addr(), "bs3")
		time.Sleep(3 * timeout)
		c.shortDeadline(5 * time.Second)
		c.mustRoundTrip(0, 4096, 1)
		c.disconnect()
	})
}

// With MaxConnections open, a further connection is refused with an
// error its client can show; once one closes, a new one is served.
func TestMaxConnections(t *testing.T) {
	dev := newMemDevice(8<<20, 4096)
	srv := startServer(t, dev, Options{MaxConnections: 2, HandshakeTimeout: 5 * time.Second})
	const repErrPolicy = 1<<31 + 2

	c1 := connect(t, srv.Addr(), "bs3")
	c2 := connect(t, srv.Addr(), "bs3")
	c1.mustRoundTrip(0, 4096, 1)

	refusedGo := func(t *testing.T) {
		t.Helper()
		c := dialRaw(t, srv.Addr())
		c.shortDeadline(5 * time.Second)
		c.greet(3)
		c.sendOpt(5, nil) // STARTTLS: any option gets the refusal
		if r := c.readOptReply(); r.typ != repErrPolicy {
			t.Fatalf("STARTTLS over the limit: reply %#x, want NBD_REP_ERR_POLICY", r.typ)
		}
		c.sendOpt(7, infoData("bs3", 3))
		r := c.readOptReply()
		if r.opt != 7 || r.typ != repErrPolicy {
			t.Fatalf("NBD_OPT_GO over the limit: reply (opt %d, type %#x), want NBD_REP_ERR_POLICY", r.opt, r.typ)
		}
		if !strings.Contains(string(r.data), "max_connections = 2") {
			t.Fatalf("refusal message %q does not name the limit", r.data)
		}
		c.sendOpt(2, nil) // ABORT
		if r := c.readOptReply(); r.typ != repACK {
			t.Fatalf("NBD_OPT_ABORT: reply %#x, want ACK", r.typ)
		}
		c.expectClosed()
	}
	t.Run("go refused", refusedGo)
	t.Run("export name refused by closing", func(t *testing.T) {
		c := dialRaw(t, srv.Addr())
		c.shortDeadline(5 * time.Second)
		c.greet(3)
		c.sendOpt(1, []byte("bs3"))
		c.expectClosed()
	})
	t.Run("real clients", func(t *testing.T) {
		// qemu prints the server's message ("server reported: ...");
		// libnbd 1.14 only logs it in debug output, so nbdinfo is only
		// checked to fail.
		needTool(t, "qemu-io", "qemu-utils")
		out, err := runTool(t, "qemu-io", "-f", "raw", "-c", "read 0 512", srv.URI())
		if err == nil {
			t.Fatalf("qemu-io succeeded over the connection limit:\n%s", out)
		}
		if !strings.Contains(out, "too many connections (max_connections = 2)") {
			t.Fatalf("qemu-io does not show the refusal message:\n%s", out)
		}
		needTool(t, "nbdinfo", "libnbd-bin")
		if out, err := runTool(t, "nbdinfo", srv.URI()); err == nil {
			t.Fatalf("nbdinfo succeeded over the connection limit:\n%s", out)
		}
	})
	// The served connections were not disturbed.
	c2.mustRoundTrip(4096, 4096, 2)

	c1.disconnect()
	testutil.WaitWithin(t, ioDeadline, "the first connection to end", func() bool { return srv.activeConns() == 1 })
	// A connection still in its handshake counts against the limit.
	c3 := dialRaw(t, srv.Addr())
	testutil.WaitWithin(t, ioDeadline, "the new connection to be served", func() bool { return srv.activeConns() == 2 })
	t.Run("handshaking connection counts", refusedGo)
	c3.greet(3)
	c3.goExport("bs3")
	c3.mustRoundTrip(8192, 4096, 3)
	c3.disconnect()
	c2.disconnect()
}

// Many connections with many large writes and reads in flight never hold
// more payload than MaxBuffered, and every request is served correctly.
func TestBufferedBound(t *testing.T) {
	const (
		bs        = 4096
		conns     = 4
		perConn   = 8
		maxBlocks = 256 // requests of up to 1 MiB
		region    = perConn * maxBlocks * bs
		bound     = 2 << 20
	)
	dev := newMemDevice(conns*region, bs)
	// Slow device calls keep buffers held, so the bound is reached.
	dev.setHook(func(string, int64, int64) error {
		time.Sleep(2 * time.Millisecond)
		return nil
	})
	srv := startServer(t, dev, Options{MaxBuffered: bound})
	pipelineConns(t, srv, conns, region, perConn, maxBlocks, bs)
	peak := srv.bufferedPeak()
	if peak > bound {
		t.Fatalf("%d payload bytes were held at once, above the %d bound", peak, bound)
	}
	// Demand was far above the bound: a peak well below it would mean the
	// test never pressed against the bound.
	if peak < bound/2 {
		t.Fatalf("peak of %d buffered bytes; the test never came near the %d bound", peak, bound)
	}
	// A reply reaches the client before its request returns its budget
	// (a read's buffer is the reply), so the count drains shortly after
	// the last reply; a leak never drains.
	testutil.WaitWithin(t, ioDeadline, "the payload budget to drain after every request completed", func() bool {
		return srv.buffered.used.Load() == 0
	})
}

// A request larger than the whole bound is served, alone, rather than
// waiting forever; other connections keep being served around it.
func TestRequestLargerThanBound(t *testing.T) {
	const bs, bound, big = 4096, 64 << 10, 1 << 20
	dev := newMemDevice(8<<20, bs)
	srv := startServer(t, dev, Options{MaxBuffered: bound})
	done := make(chan struct{})
	go func() {
		defer close(done)
		small := connect(t, srv.Addr(), "bs3")
		for i := range 50 {
			small.mustRoundTrip(uint64(4<<20+i*bs), bs, byte(i))
		}
		small.disconnect()
	}()
	c := connect(t, srv.Addr(), "bs3")
	c.shortDeadline(10 * time.Second)
	for i := range 5 {
		c.mustRoundTrip(0, big, byte(100+i))
	}
	<-done
	if peak := srv.bufferedPeak(); peak != big {
		t.Fatalf("peak of %d buffered bytes, want exactly %d: the large request must run alone", peak, big)
	}
}

// A client that stops in the middle of a write payload, or stops reading
// its replies, is disconnected after the stall timeout, so the payload
// memory it held serves the other clients again.
func TestStalledClientReleasesBudget(t *testing.T) {
	const bs, bound = 4096, 1 << 20
	const stall = time.Second
	for _, k := range []struct {
		name  string
		stall func(c *rawClient)
	}{
		{"payload", func(c *rawClient) {
			c.send(1, 0, 1, 2<<20, bound, pattern(1000, 1))
		}},
		{"replies", func(c *rawClient) {
			// Far more reply data than the socket buffers hold.
			for i := range 64 {
				c.send(0, 0, uint64(i), 0, bound, nil)
			}
		}},
	} {
		t.Run(k.name, func(t *testing.T) {
			dev := newMemDevice(8<<20, bs)
			srv := startServer(t, dev, Options{MaxBuffered: bound, stallTimeout: stall})
			stuck := connect(t, srv.Addr(), "bs3")
			k.stall(stuck)
			// The stuck client holds the whole budget once it is blocked:
			// wait until that has lasted a while.
			var since time.Time
			testutil.WaitWithin(t, ioDeadline, "the stuck client to hold the whole budget", func() bool {
				if srv.buffered.used.Load() != bound {
					since = time.Time{}
					return false
				}
				if since.IsZero() {
					since = time.Now()
				}
				return time.Since(since) > stall/4
			})
			other := connect(t, srv.Addr(), "bs3")
			other.shortDeadline(10 * time.Second)
			other.mustRoundTrip(4<<20, 64<<10, 2)
			testutil.WaitWithin(t, ioDeadline, "the stuck connection to be dropped", func() bool { return srv.activeConns() == 1 })
			if got := dev.snapshot(2<<20, 1000); !bytes.Equal(got, make([]byte, 1000)) {
				t.Fatalf("the half-received write reached the device")
			}
			other.disconnect()
		})
	}
}

func TestNewValidatesLimits(t *testing.T) {
	for _, o := range []Options{
		{HandshakeTimeout: -time.Second},
		{MaxConnections: -1},
		{MaxBuffered: -1},
	} {
		o.Listen = "127.0.0.1:0"
		o.Logger = testLogger(t)
		if s, err := New(newMemDevice(1<<20, 4096), o); err == nil {
			if cerr := s.Close(); cerr != nil {
				t.Errorf("Close: %v", cerr)
			}
			t.Errorf("New(%+v) succeeded, want an error", o)
		}
	}
	s := startServer(t, newMemDevice(1<<20, 4096), Options{})
	if s.handshakeTimeout != DefaultHandshakeTimeout || s.maxConns != DefaultMaxConnections ||
		s.buffered.limit != DefaultMaxBuffered {
		t.Fatalf("defaults: handshake %v, connections %d, buffered %d", s.handshakeTimeout, s.maxConns, s.buffered.limit)
	}
}
