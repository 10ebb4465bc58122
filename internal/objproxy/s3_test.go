package objproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/crc32c"
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

// TestBodyDamagedInMemoryNotRetried: a body whose bytes changed after the
// checksum that came with it was taken (store.WithBodyCRC32C: taken as
// the chunk was built) is refused by the store, and the upload fails at
// once as damaged, naming the cause, instead of being resent without end.
// The same checksum over an intact body damaged on the wire is retried.
func TestBodyDamagedInMemoryNotRetried(t *testing.T) {
	srv := minio.Start(t)
	d := &damagingTransport{}
	o := srv.Options(t, srv.Bucket(t))
	o.PayloadChecksum = s3.PayloadCRC32C
	o.WrapTransport = func(next http.RoundTripper) http.RoundTripper { d.next = next; return d }
	st := srv.StoreWith(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p := newProxy(t, st, Options{Uploaders: 2, MaxAttempts: 5})

	// Damaged on the wire once: resent, stored.
	body := bytes.Repeat([]byte("chunk bytes "), 100000)
	d.n.Store(1)
	if err := p.Put(store.WithBodyCRC32C(ctx, body, crc32c.Checksum(body)), High, store.DataName(1), body, true); err != nil {
		t.Fatalf("Put damaged once in transit: %v", err)
	}
	if s := p.Stats().Put; s.Attempts != 2 || s.Failures != 0 {
		t.Fatalf("stats after damage in transit: %+v, want 2 attempts", s)
	}

	// Changed in memory after its checksum was taken: one attempt, a
	// final error.
	sum := crc32c.Checksum(body)
	body[12345] ^= 1
	err := p.Put(store.WithBodyCRC32C(ctx, body, sum), High, store.DataName(2), body, true)
	if !errors.Is(err, store.ErrCorrupt) || !strings.Contains(err.Error(), "changed in memory") {
		t.Fatalf("Put of a body changed in memory: %v, want store.ErrCorrupt naming the cause", err)
	}
	if s := p.Stats().Put; s.Attempts != 3 {
		t.Fatalf("stats: %+v: the damaged body was sent %d times, want once", s, s.Attempts-2)
	}
	if _, err := p.Size(ctx, High, store.DataName(2)); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a body changed in memory was stored: Size err = %v", err)
	}
}
