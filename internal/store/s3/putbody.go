package s3

import (
	"context"
	"io"
	"net"
	"net/http"
	"sync"

	"github.com/bs3/bs3/internal/store"
)

// PUT bodies go from their buffers to the socket without a copy.
//
// net/http sends a body of known length as io.Copy(conn, io.LimitReader(
// body, n)); the connection does not recognise the body behind the limit,
// so every byte went through a 32 KiB copy buffer (about 0.1 CPU-s per
// GiB uploaded in the write profile, docs/ARCHITECTURE.md §18). The SDK
// wraps the body it is given in types of its own, so the pieces of a PUT
// ride in the request's context instead (withPutBody): bodyTransport puts
// them back as the body net/http unwraps, and bodyConn, the connection
// the transport dials, writes them to the socket with one writev when
// net/http hands it that body. Any other body, and every TLS connection
// (the TLS layer copies anyway), takes the usual path.

type putBodyKey struct{}

// withPutBody returns ctx carrying body, the pieces of the PUT about to be
// sent with ctx.
func withPutBody(ctx context.Context, body [][]byte) context.Context {
	return context.WithValue(ctx, putBodyKey{}, body)
}

// bodyTransport sends a PUT whose pieces its context carries with a body
// reading them, which bodyConn recognises.
type bodyTransport struct{ next http.RoundTripper }

func (t bodyTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	body, ok := req.Context().Value(putBodyKey{}).([][]byte)
	if !ok || req.Method != http.MethodPut || req.Body == nil || req.ContentLength != int64(store.PiecesLen(body)) {
		return t.next.RoundTrip(req)
	}
	// A RoundTripper must close the body it was given and not modify the
	// request: the SDK's body is closed here, and a copy is sent.
	if err := req.Body.Close(); err != nil {
		return nil, err
	}
	r := req.Clone(req.Context())
	// The reader itself is the body (no io.NopCloser around it): net/http
	// unwraps only its own wrapper and hands the body on as it is.
	r.Body = newPiecesReader(body)
	r.GetBody = func() (io.ReadCloser, error) { return newPiecesReader(body), nil }
	return t.next.RoundTrip(r)
}

// bodyConn is a dialed connection that writes a body of pieces straight
// from them.
type bodyConn struct{ net.Conn }

// ReadFrom is where net/http's io.Copy of a request body lands.
func (c bodyConn) ReadFrom(r io.Reader) (int64, error) {
	if lr, ok := r.(*io.LimitedReader); ok {
		if pr, ok := lr.R.(*piecesReader); ok {
			n, err := pr.writeTo(c.Conn, lr.N)
			lr.N -= n
			return n, err
		}
	}
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

// Close implements io.Closer: there is nothing to release.
func (r *piecesReader) Close() error { return nil }

// writeLists holds the iovec lists of writeTo for reuse.
var writeLists = sync.Pool{New: func() any { return new(net.Buffers) }}

// writeTo writes up to limit bytes from the read position to w, with one
// writev where w is a socket, and advances the position by what it wrote.
func (r *piecesReader) writeTo(w io.Writer, limit int64) (int64, error) {
	// Its own list (WriteTo consumes the list it is given), pooled: a
	// checksummed chunk comes in over two thousand pieces.
	bp := writeLists.Get().(*net.Buffers)
	bufs := (*bp)[:0]
	if need := len(r.pieces) - r.i; cap(bufs) < need {
		bufs = make(net.Buffers, 0, need)
	}
	defer func(all net.Buffers) {
		clear(all[:cap(all)]) // no reference to a body stays in the pool
		*bp = all[:0]
		writeLists.Put(bp)
	}(bufs)
	for i, in := r.i, r.in; i < len(r.pieces) && limit > 0; i, in = i+1, 0 {
		p := r.pieces[i][in:]
		if int64(len(p)) > limit {
			p = p[:limit]
		}
		if len(p) > 0 {
			bufs = append(bufs, p)
			limit -= int64(len(p))
		}
	}
	n, err := bufs.WriteTo(w)
	r.off += n
	r.locate()
	return n, err
}
