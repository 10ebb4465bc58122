package nbd

import (
	"encoding/binary"
	"io"
	"testing"
)

// benchPipelined keeps depth requests of n bytes in flight on one
// connection against the in-memory device and reports throughput; it
// measures the server's own per-request cost.
func benchPipelined(b *testing.B, typ uint16, n, depth int) {
	const size = 256 << 20
	dev := newMemDevice(size, 4096)
	srv, err := New(dev, Options{Listen: "127.0.0.1:0", Logger: testLogger(b)})
	if err != nil {
		b.Fatalf("New: %v", err)
	}
	go func() {
		if err := srv.Serve(); err != nil {
			b.Errorf("Serve: %v", err)
		}
	}()
	defer func() {
		if err := srv.Close(); err != nil {
			b.Errorf("Close: %v", err)
		}
	}()
	c := dialRaw(b, srv.Addr())
	c.greet(3)
	c.goExport("bs3")

	msg := make([]byte, 28, 28+n)
	if typ == 1 {
		msg = append(msg, pattern(n, 1)...)
	}
	hdr := msg[:28]
	binary.BigEndian.PutUint32(hdr[0:], 0x25609513)
	binary.BigEndian.PutUint16(hdr[6:], typ)
	binary.BigEndian.PutUint32(hdr[24:], uint32(n))
	send := func(i int) {
		binary.BigEndian.PutUint64(hdr[8:], uint64(i))
		binary.BigEndian.PutUint64(hdr[16:], uint64(i*n)%(size-uint64(n)+1)/4096*4096)
		if _, err := c.nc.Write(msg); err != nil {
			b.Fatalf("send: %v", err)
		}
	}
	tokens := make(chan struct{}, depth)
	done := make(chan error, 1)
	go func() {
		rh := make([]byte, 16)
		data := make([]byte, n)
		for range b.N {
			if _, err := io.ReadFull(c.r, rh); err != nil {
				done <- err
				return
			}
			if typ == 0 {
				if _, err := io.ReadFull(c.r, data); err != nil {
					done <- err
					return
				}
			}
			<-tokens
		}
		done <- nil
	}()
	b.SetBytes(int64(n))
	b.ResetTimer()
	for i := range b.N {
		tokens <- struct{}{} // at most depth requests outstanding
		send(i)
	}
	if err := <-done; err != nil {
		b.Fatalf("replies: %v", err)
	}
}

func BenchmarkWrite4KDepth32(b *testing.B) { benchPipelined(b, 1, 4096, 32) }
func BenchmarkRead4KDepth32(b *testing.B)  { benchPipelined(b, 0, 4096, 32) }
func BenchmarkWrite1MDepth8(b *testing.B)  { benchPipelined(b, 1, 1<<20, 8) }
func BenchmarkRead1MDepth8(b *testing.B)   { benchPipelined(b, 0, 1<<20, 8) }
