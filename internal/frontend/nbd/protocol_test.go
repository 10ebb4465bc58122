package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"strconv"
	"testing"

	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/testutil"
)

// NBD values as the protocol document defines them, spelled out here
// rather than taken from the package so a wrong constant there fails.
const (
	wantFlags = 1 | 4 | 8 | 32 | 64 | 256 // HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES CAN_MULTI_CONN
	nbdEINVAL = 22
	nbdEIO    = 5
	repACK    = 1
	repSERVER = 2
	repUNSUP  = 1<<31 + 1
	repINVAL  = 1<<31 + 3
	repUNKNWN = 1<<31 + 6
)

// runProtocolAbuse throws malformed handshakes and requests at srv, which
// serves dev, and checks that each gets the answer the protocol asks for,
// that nothing invalid changes the device, and that a well-behaved client
// connected throughout keeps being served. It works with any Device of at
// least 8 MiB with a block size of 512 or 4096; srv must have no other
// clients while it runs.
func runProtocolAbuse(t *testing.T, srv *Server, dev frontend.Device) {
	addr := srv.Addr()
	export := srv.export
	size := uint64(dev.Size())
	bs := uint64(dev.BlockSize())
	maxReq := uint64(srv.maxReq)

	good := connect(t, addr, export)
	good.mustRoundTrip(0, int(4*bs), 1)
	// guard is a region the abuse must never change.
	guardOff := uint64(1 << 20)
	guard := pattern(int(16*bs), 2)
	if e := good.writeAt(guardOff, guard, 0); e != 0 {
		t.Fatalf("write guard region: error %d", e)
	}
	lastOff := size - bs
	last := pattern(int(bs), 3)
	if e := good.writeAt(lastOff, last, 0); e != 0 {
		t.Fatalf("write last block: error %d", e)
	}
	checkUnchanged := func(t *testing.T) {
		t.Helper()
		got := make([]byte, len(guard))
		if err := dev.ReadAt(context.Background(), got, int64(guardOff)); err != nil {
			t.Fatalf("device read of guard region: %v", err)
		}
		if !bytes.Equal(got, guard) {
			t.Fatalf("guard region changed on the device")
		}
		if err := dev.ReadAt(context.Background(), got[:bs], int64(lastOff)); err != nil {
			t.Fatalf("device read of last block: %v", err)
		}
		if !bytes.Equal(got[:bs], last) {
			t.Fatalf("last block changed on the device")
		}
	}
	seed := byte(10)
	stillServed := func(t *testing.T) {
		t.Helper()
		seed++
		good.t = t
		good.mustRoundTrip(4*bs, int(2*bs), seed)
		checkUnchanged(t)
	}

	t.Run("unknown client flags close", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.greet(0x80)
		c.expectClosed()
		stillServed(t)
	})

	t.Run("bad option magic closes", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.greet(3)
		c.write(append(be64(0x1122334455667788), make([]byte, 8)...))
		c.expectClosed()
		stillServed(t)
	})

	t.Run("huge option closes", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.greet(3)
		c.write(append(append(be64(0x49484156454f5054), be32(1)...), be32(1<<30)...))
		c.expectClosed()
		stillServed(t)
	})

	t.Run("unknown options are unsupported", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.greet(3)
		for _, opt := range []uint32{99, 8 /* STRUCTURED_REPLY */, 5 /* STARTTLS */, 9, 10, 11} {
			c.sendOpt(opt, nil)
			r := c.readOptReply()
			if r.opt != opt || r.typ != repUNSUP {
				t.Fatalf("option %d: reply (opt %d, type %#x), want NBD_REP_ERR_UNSUP", opt, r.opt, r.typ)
			}
		}
		c.goExport(export)
		c.mustRoundTrip(8*bs, int(bs), 20)
		c.disconnect()
		stillServed(t)
	})

	t.Run("list", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.greet(3)
		c.sendOpt(3, nil)
		r := c.readOptReply()
		if r.typ != repSERVER || len(r.data) < 4 {
			t.Fatalf("NBD_OPT_LIST: reply type %#x with %d bytes, want NBD_REP_SERVER", r.typ, len(r.data))
		}
		n := binary.BigEndian.Uint32(r.data)
		if int(n) > len(r.data)-4 || string(r.data[4:4+n]) != export {
			t.Fatalf("NBD_OPT_LIST named %q, want %q", r.data[4:], export)
		}
		if r = c.readOptReply(); r.typ != repACK {
			t.Fatalf("NBD_OPT_LIST: final reply type %#x, want ACK", r.typ)
		}
		c.sendOpt(3, []byte("x"))
		if r = c.readOptReply(); r.typ != repINVAL {
			t.Fatalf("NBD_OPT_LIST with data: reply type %#x, want NBD_REP_ERR_INVALID", r.typ)
		}
		c.sendOpt(2, nil) // ABORT
		if r = c.readOptReply(); r.opt != 2 || r.typ != repACK {
			t.Fatalf("NBD_OPT_ABORT: reply (opt %d, type %#x), want ACK", r.opt, r.typ)
		}
		c.expectClosed()
		stillServed(t)
	})

	t.Run("info then go on the default export", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.greet(3)
		c.sendOpt(6, infoData(export, 3, 1, 2, 999))
		ei, final := c.readInfoReplies(6)
		if final.typ != repACK {
			t.Fatalf("NBD_OPT_INFO ended with %#x, want ACK", final.typ)
		}
		if ei.size != size || ei.flags != wantFlags {
			t.Fatalf("NBD_INFO_EXPORT size %d flags %#x, want %d %#x", ei.size, ei.flags, size, wantFlags)
		}
		if !ei.haveBlockSize || ei.minBS != 1 || uint64(ei.prefBS) != bs || uint64(ei.maxBS) != maxReq {
			t.Fatalf("NBD_INFO_BLOCK_SIZE %v min %d pref %d max %d, want 1 %d %d",
				ei.haveBlockSize, ei.minBS, ei.prefBS, ei.maxBS, bs, maxReq)
		}
		if !ei.haveName || ei.name != export {
			t.Fatalf("NBD_INFO_NAME %v %q, want %q", ei.haveName, ei.name, export)
		}
		if !ei.haveDescription || ei.description == "" {
			t.Fatalf("NBD_INFO_DESCRIPTION missing")
		}
		// Still negotiating: the empty name selects the default export.
		ei = c.goExport("")
		if ei.size != size {
			t.Fatalf("default export size %d, want %d", ei.size, size)
		}
		c.mustRoundTrip(8*bs, int(bs), 21)
		c.disconnect()
		stillServed(t)
	})

	t.Run("unknown and malformed export requests", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.greet(3)
		for _, opt := range []uint32{6, 7} {
			c.sendOpt(opt, infoData("no-such-export", 3))
			if _, final := c.readInfoReplies(opt); final.typ != repUNKNWN {
				t.Fatalf("option %d on unknown export: reply %#x, want NBD_REP_ERR_UNKNOWN", opt, final.typ)
			}
		}
		bad := [][]byte{
			{0, 0},                            // too short
			append(be32(100), 'a', 0, 0),      // name longer than data
			append(infoData(export, 3), 0, 1), // trailing bytes
		}
		for i, d := range bad {
			c.sendOpt(7, d)
			if _, final := c.readInfoReplies(7); final.typ != repINVAL {
				t.Fatalf("malformed NBD_OPT_GO #%d: reply %#x, want NBD_REP_ERR_INVALID", i, final.typ)
			}
		}
		c.goExport(export)
		c.mustRoundTrip(8*bs, int(bs), 22)
		stillServed(t)
	})

	t.Run("export name with and without zero padding", func(t *testing.T) {
		for _, noZeroes := range []bool{false, true} {
			c := dialRaw(t, addr)
			flags := uint32(1)
			if noZeroes {
				flags |= 2
			}
			c.greet(flags)
			c.sendOpt(1, []byte(export))
			h := c.readN(10)
			if got := binary.BigEndian.Uint64(h); got != size {
				t.Fatalf("NBD_OPT_EXPORT_NAME size %d, want %d", got, size)
			}
			if got := binary.BigEndian.Uint16(h[8:]); got != wantFlags {
				t.Fatalf("NBD_OPT_EXPORT_NAME flags %#x, want %#x", got, wantFlags)
			}
			if !noZeroes {
				if pad := c.readN(124); !bytes.Equal(pad, make([]byte, 124)) {
					t.Fatalf("padding after export info is not 124 zero bytes")
				}
			}
			// A reply magic right after shows the stream is in sync.
			c.mustRoundTrip(8*bs, int(bs), 23)
			c.disconnect()
		}
		stillServed(t)
	})

	t.Run("export name unknown closes", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.greet(3)
		c.sendOpt(1, []byte("no-such-export"))
		c.expectClosed()
		stillServed(t)
	})

	t.Run("client without fixed newstyle", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.greet(0)
		c.sendOpt(1, nil) // default export
		c.readN(10 + 124)
		c.mustRoundTrip(8*bs, int(bs), 24)
		c.disconnect()

		c = dialRaw(t, addr)
		c.greet(0)
		c.sendOpt(3, nil) // it could not parse a reply: the server hangs up
		c.expectClosed()
		stillServed(t)
	})

	t.Run("invalid requests get EINVAL and the stream stays in sync", func(t *testing.T) {
		c := connect(t, addr, export)
		type tc struct {
			name    string
			typ     uint16
			flags   uint16
			off     uint64
			length  uint32
			payload bool
		}
		cases := []tc{
			{"read past end", 0, 0, size - bs, uint32(2 * bs), false},
			{"read offset past end", 0, 0, size + bs, uint32(bs), false},
			{"read offset overflow", 0, 0, ^uint64(0) - bs + 1, uint32(2 * bs), false},
			{"read unaligned past end", 0, 0, size - 100, 200, false},
			{"read one byte past end", 0, 0, size, 1, false},
			{"read zero length", 0, 0, guardOff, 0, false},
			{"read over max", 0, 0, 0, uint32(maxReq + bs), false},
			{"read with DF flag", 0, 4, guardOff, uint32(bs), false},
			{"read with unknown flag", 0, 0x100, guardOff, uint32(bs), false},
			{"write past end", 1, 0, size - bs, uint32(2 * bs), true},
			{"write unaligned past end", 1, 0, size - 1, 2, true},
			{"write unaligned offset past end", 1, 0, size + 1, 1, true},
			{"write with NO_HOLE", 1, 2, guardOff, uint32(bs), true},
			{"trim past end", 4, 0, size - bs, uint32(2 * bs), false},
			{"trim unaligned past end", 4, 0, size - bs/2, uint32(bs), false},
			{"trim zero length", 4, 0, guardOff, 0, false},
			{"write zeroes past end", 6, 0, size, uint32(bs), false},
			{"write zeroes unaligned past end", 6, 2, size - 3, 4, false},
			{"write zeroes with FAST_ZERO", 6, 16, guardOff, uint32(bs), false},
			{"flush with NO_HOLE", 3, 2, 0, 0, false},
			{"cache", 5, 0, guardOff, uint32(bs), false},
			{"block status", 7, 0, guardOff, uint32(bs), false},
			{"unknown command", 42, 0, guardOff, uint32(bs), false},
		}
		for i, k := range cases {
			var payload []byte
			if k.payload {
				payload = pattern(int(k.length), 99)
			}
			handle := uint64(1000 + i)
			c.send(k.typ, k.flags, handle, k.off, k.length, payload)
			errno, h := c.recvReply()
			if h != handle {
				t.Fatalf("%s: reply handle %d, want %d", k.name, h, handle)
			}
			if errno != nbdEINVAL {
				t.Fatalf("%s: error %d, want NBD_EINVAL", k.name, errno)
			}
		}
		checkUnchanged(t)
		c.mustRoundTrip(8*bs, int(bs), 25)
		// FUA is valid on every command (the spec says to accept it).
		if e, _ := c.do(0, 1, guardOff, uint32(bs), nil); e != 0 {
			t.Fatalf("read with FUA: error %d", e)
		}
		if e, _ := c.do(3, 1, 0, 0, nil); e != 0 {
			t.Fatalf("flush with FUA: error %d", e)
		}
		c.disconnect()
		stillServed(t)
	})

	t.Run("oversized write closes", func(t *testing.T) {
		c := connect(t, addr, export)
		c.send(1, 0, 1, 0, uint32(maxReq+bs), nil)
		c.expectClosed()
		stillServed(t)
	})

	t.Run("bad request magic closes", func(t *testing.T) {
		c := connect(t, addr, export)
		c.mustRoundTrip(8*bs, int(bs), 26)
		b := make([]byte, 28)
		binary.BigEndian.PutUint32(b, 0x12560953) // the historic magic
		c.write(b)
		c.expectClosed()
		stillServed(t)
	})

	// onlyGood waits until the server serves just the good client, so a
	// test can watch its own connection end. Earlier subtests' clients are
	// closed but the server may not have noticed yet.
	onlyGood := func(t *testing.T, what string) {
		t.Helper()
		testutil.WaitWithin(t, ioDeadline, what, func() bool { return srv.activeConns() == 1 })
	}

	t.Run("disconnect mid-write is not applied", func(t *testing.T) {
		onlyGood(t, "earlier connections to end")
		c := connect(t, addr, export)
		payload := pattern(int(8*bs), 27)
		c.send(1, 0, 7, guardOff+4*bs, uint32(len(payload)), payload[:len(payload)-int(bs)/2])
		if err := c.nc.Close(); err != nil {
			t.Fatalf("close client: %v", err)
		}
		onlyGood(t, "server to drop the half-sent write's connection")
		checkUnchanged(t)
		stillServed(t)
	})

	t.Run("disconnect mid-header", func(t *testing.T) {
		onlyGood(t, "earlier connections to end")
		c := connect(t, addr, export)
		c.write(be32(0x25609513))
		if err := c.nc.Close(); err != nil {
			t.Fatalf("close client: %v", err)
		}
		onlyGood(t, "server to drop the connection")
		stillServed(t)
	})

	good.t = t
	good.disconnect()
}

func TestProtocolAbuse(t *testing.T) {
	for _, bs := range []int64{512, 4096} {
		t.Run("bs"+strconv.FormatInt(bs, 10), func(t *testing.T) {
			dev := newMemDevice(16<<20, bs)
			srv := startServer(t, dev, Options{MaxRequest: 1 << 20})
			runProtocolAbuse(t, srv, dev)
			if n := dev.invalid.Load(); n != 0 {
				t.Fatalf("%d invalid requests reached the device; the server must reject them", n)
			}
		})
	}
}
