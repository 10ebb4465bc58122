package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// FuzzConnection feeds arbitrary client bytes to a connection: the server
// must neither panic nor hang, whatever arrives. Run longer with
// go test -fuzz FuzzConnection ./internal/frontend/nbd.
func FuzzConnection(f *testing.F) {
	var session bytes.Buffer
	session.Write(be32(3))
	opt := func(o uint32, d []byte) {
		session.Write(be64(0x49484156454f5054))
		session.Write(be32(o))
		session.Write(be32(uint32(len(d))))
		session.Write(d)
	}
	opt(3, nil)
	opt(6, infoData("bs3", 3, 1, 2))
	opt(99, []byte("x"))
	opt(7, infoData("", 3))
	req := func(typ, flags uint16, off uint64, n uint32, payload []byte) {
		b := make([]byte, 28)
		binary.BigEndian.PutUint32(b, 0x25609513)
		binary.BigEndian.PutUint16(b[4:], flags)
		binary.BigEndian.PutUint16(b[6:], typ)
		binary.BigEndian.PutUint64(b[8:], 1)
		binary.BigEndian.PutUint64(b[16:], off)
		binary.BigEndian.PutUint32(b[24:], n)
		session.Write(b)
		session.Write(payload)
	}
	req(1, 1, 512, 1024, pattern(1024, 1))
	req(0, 0, 0, 2048, nil)
	req(4, 0, 0, 512, nil)
	req(6, 2, 1024, 512, nil)
	req(3, 0, 0, 0, nil)
	req(0, 0, 1<<20, 512, nil)
	req(9, 0, 0, 0, nil)
	req(2, 0, 0, 0, nil)
	f.Add(session.Bytes())
	f.Add(session.Bytes()[:40])
	var en bytes.Buffer
	en.Write(be32(1))
	en.Write(be64(0x49484156454f5054))
	en.Write(be32(1))
	en.Write(be32(0))
	f.Add(en.Bytes())
	f.Add([]byte{0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff})

	dev := newMemDevice(1<<20, 512)
	s := &Server{
		dev: dev, export: "bs3", size: dev.Size(), blockSize: dev.BlockSize(),
		maxReq: 64 << 10, log: zerolog.Nop(), conns: make(map[*conn]struct{}),
		refusing: make(map[*conn]struct{}), maxConns: 1, handshakeTimeout: time.Second,
		stall: time.Second, buffered: newBudget(128 << 10),
	}
	s.devCtx = context.Background()
	f.Fuzz(func(t *testing.T, in []byte) {
		client, server := net.Pipe()
		c := s.newConn(server)
		if a := s.track(c); a != admitServe {
			t.Fatalf("server refused a connection (admission %d)", a)
		}
		done := make(chan struct{})
		go func() {
			c.serve()
			close(done)
		}()
		drained := make(chan struct{})
		go func() {
			io.Copy(io.Discard, client) // until the server closes its end
			close(drained)
		}()
		client.Write(in) // fails once the server hangs up: fine
		client.Close()
		<-done
		<-drained
	})
}
