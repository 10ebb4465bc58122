package s3

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"unsafe"
)

// countingConn records, for each Read from the socket, whether its
// destination lies inside one of the caller's buffers.
type countingConn struct {
	net.Conn
	mu      *sync.Mutex
	inside  func(p []byte) bool
	direct  *int
	through *int
}

func (c countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	if c.inside(p) {
		*c.direct += n
	} else {
		*c.through += n
	}
	c.mu.Unlock()
	return n, err
}

// TestBodyReadsLandInCallerBuffers: the transport's read buffer must not
// stand between the socket and the buffers a GET body is read into (the
// read cache's 64 KiB windows): almost every body byte must be read from
// the socket straight into them. With a 64 KiB read buffer every byte
// went through it and was copied a second time.
func TestBodyReadsLandInCallerBuffers(t *testing.T) {
	const window = 64 << 10
	const size = 4 << 20
	body := make([]byte, size)
	for i := range body {
		body[i] = byte(i * 7)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "4194304")
		if _, err := w.Write(body); err != nil {
			t.Errorf("serve: %v", err)
		}
	}))
	defer srv.Close()

	bufs := make([][]byte, size/window)
	for i := range bufs {
		bufs[i] = make([]byte, window)
	}
	inside := func(p []byte) bool {
		if len(p) == 0 {
			return false
		}
		a := uintptr(unsafe.Pointer(&p[0]))
		for _, b := range bufs {
			s := uintptr(unsafe.Pointer(&b[0]))
			if a >= s && a < s+uintptr(len(b)) {
				return true
			}
		}
		return false
	}
	var mu sync.Mutex
	var direct, through int
	tr := newTransport(nil, 4, nil)
	dial := tr.DialContext
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return countingConn{Conn: c, mu: &mu, inside: inside, direct: &direct, through: &through}, nil
	}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	for i, b := range bufs {
		if _, err := io.ReadFull(resp.Body, b); err != nil {
			t.Fatalf("window %d: %v", i, err)
		}
		for j := range b {
			if b[j] != body[i*window+j] {
				t.Fatalf("window %d byte %d: wrong", i, j)
			}
		}
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("socket reads: %d bytes into the windows, %d through the transport's buffer", direct, through)
	// The headers and what arrived with them go through the transport's
	// buffer (a few KiB); a window's worth is already too much.
	if through > window {
		t.Fatalf("%d of %d body bytes went through the transport's read buffer (copied twice); want under a window (%d)", through, size, window)
	}
}
