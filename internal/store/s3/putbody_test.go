package s3_test

import (
	"bytes"
	"fmt"
	"net"
	"sync"
	"testing"
	"unsafe"

	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// writeWatch counts, of the bytes written to the socket, those written
// straight from the caller's buffers and the rest (headers, copies).
type writeWatch struct {
	mu       sync.Mutex
	inside   func(p []byte) bool
	direct   int
	through  int
	requests int
}

type watchedConn struct {
	net.Conn
	w *writeWatch
}

func (c watchedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.w.mu.Lock()
	if c.w.inside(p) {
		c.w.direct += n
	} else {
		c.w.through += n
	}
	c.w.mu.Unlock()
	return n, err
}

// TestPutBodyWrittenFromItsBuffers: a PUT body, contiguous or in pieces
// (the chunk's metadata and cache windows), goes from its own buffers to
// the socket in every payload mode: what is written from elsewhere is
// headers and the few KiB net/http's write buffer takes before the body
// is handed over, not a copy of the body. MinIO checks the checksum and
// the object reads back.
func TestPutBodyWrittenFromItsBuffers(t *testing.T) {
	srv := minio.Start(t)
	const size = 4 << 20
	body := make([]byte, size)
	for i := range body {
		body[i] = byte(i*7 + i>>16)
	}
	watch := &writeWatch{inside: func(p []byte) bool {
		if len(p) == 0 {
			return false
		}
		a, s := uintptr(unsafe.Pointer(&p[0])), uintptr(unsafe.Pointer(&body[0]))
		return a >= s && a < s+size
	}}
	var pieces [][]byte
	for off := 0; off < size; off += 64 << 10 {
		pieces = append(pieces, body[off:off+64<<10])
	}
	for _, mode := range []s3.PayloadMode{s3.PayloadCRC32C, s3.PayloadSigned, s3.PayloadUnsigned} {
		o := srv.Options(t, srv.Bucket(t))
		o.PayloadChecksum = mode
		o.WrapConn = func(c net.Conn) net.Conn { return watchedConn{c, watch} }
		st := srv.StoreWith(t, o)
		for _, vectored := range []bool{false, true} {
			watch.mu.Lock()
			watch.direct, watch.through = 0, 0
			watch.mu.Unlock()
			name := fmt.Sprintf("o-%s-%v", mode, vectored)
			var err error
			if vectored {
				err = st.PutV(ctxT(t), name, pieces, true)
			} else {
				err = st.Put(ctxT(t), name, body, true)
			}
			if err != nil {
				t.Fatalf("%s: put: %v", name, err)
			}
			watch.mu.Lock()
			direct, through := watch.direct, watch.through
			watch.mu.Unlock()
			t.Logf("%s: %d bytes written from the body's buffers, %d from elsewhere", name, direct, through)
			if through > 16<<10 || direct+through < size {
				t.Errorf("%s: %d of the body's %d bytes were written from the body's buffers, %d bytes from elsewhere (a copy)", name, direct, size, through)
			}
			got := make([]byte, size)
			if n, err := st.GetRange(ctxT(t), name, 0, got); err != nil || n != size || !bytes.Equal(got, body) {
				t.Fatalf("%s: reads back %d bytes, %v, equal %v", name, n, err, bytes.Equal(got, body))
			}
		}
	}
}
