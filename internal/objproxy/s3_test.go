package objproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// damagingTransport flips one byte in the body of the next n object PUTs
// after the s3 store computed their checksum: damage in transit.
type damagingTransport struct {
	next http.RoundTripper
	n    atomic.Int64
}

func (d *damagingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method != http.MethodPut || r.Body == nil || r.ContentLength <= 0 || d.n.Add(-1) < 0 {
		return d.next.RoundTrip(r)
	}
	body, err := io.ReadAll(r.Body)
	if cerr := r.Body.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("damaging transport: read body: %w", err)
	}
	body[len(body)/3] ^= 0x80
	r2 := r.Clone(r.Context())
	r2.Body = io.NopCloser(bytes.NewReader(body))
	r2.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	return d.next.RoundTrip(r2)
}

// TestDamagedUploadRetried: a body damaged in transit is refused by the
// store (its CRC32C does not match), and the proxy resends it, a bounded
// number of times, until an intact copy is stored.
func TestDamagedUploadRetried(t *testing.T) {
	srv := minio.Start(t)
	for _, mode := range []s3.PayloadMode{s3.PayloadCRC32C, s3.PayloadSigned} {
		t.Run(string(mode), func(t *testing.T) {
			d := &damagingTransport{}
			o := srv.Options(t, srv.Bucket(t))
			o.PayloadChecksum = mode
			o.WrapTransport = func(next http.RoundTripper) http.RoundTripper { d.next = next; return d }
			st := srv.StoreWith(t, o)
			body := bytes.Repeat([]byte("chunk bytes "), 100000)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()

			// Two damaged attempts, then an intact one.
			p := newProxy(t, st, Options{Uploaders: 2, MaxAttempts: 5})
			d.n.Store(2)
			if err := p.Put(ctx, High, store.DataName(1), body, true); err != nil {
				t.Fatalf("Put with two damaged attempts: %v", err)
			}
			if s := p.Stats().Put; s.Attempts != 3 || s.Retries != 2 || s.Failures != 0 {
				t.Errorf("stats after two damaged attempts: %+v, want 3 attempts, 2 retries", s)
			}
			buf := make([]byte, len(body))
			if n, err := p.GetRange(ctx, High, store.DataName(1), 0, buf); err != nil || n != len(body) || !bytes.Equal(buf, body) {
				t.Errorf("stored object: %d bytes, %v, intact %v", n, err, bytes.Equal(buf, body))
			}

			// Every attempt damaged: the proxy gives up after MaxAttempts
			// with the store's refusal, and nothing is stored.
			p2 := newProxy(t, st, Options{Uploaders: 2, MaxAttempts: 3})
			d.n.Store(1 << 30)
			err := p2.Put(ctx, High, store.DataName(2), body, true)
			if !errors.Is(err, s3.ErrChecksumMismatch) {
				t.Errorf("Put with every attempt damaged: err = %v, want ErrChecksumMismatch", err)
			}
			if s := p2.Stats().Put; s.Attempts != 3 || s.Failures != 1 {
				t.Errorf("stats with every attempt damaged: %+v, want 3 attempts, 1 failure", s)
			}
			d.n.Store(0)
			if _, err := p2.Size(ctx, High, store.DataName(2)); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("a damaged body was stored: Size err = %v", err)
			}
		})
	}
}
