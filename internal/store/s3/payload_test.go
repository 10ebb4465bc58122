package s3_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/store/storetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// corrupter is an HTTP round-tripper that flips one byte in the body of
// the next n object PUTs, after the SDK computed their checksum or signed
// hash: damage in transit, as a faulty NIC, proxy or kernel would cause.
type corrupter struct {
	next      http.RoundTripper
	n         atomic.Int64
	corrupted atomic.Int64
}

func (c *corrupter) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method != http.MethodPut || r.Body == nil || r.ContentLength <= 0 || c.n.Add(-1) < 0 {
		return c.next.RoundTrip(r)
	}
	body, err := io.ReadAll(r.Body)
	if cerr := r.Body.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("corrupter: read body: %w", err)
	}
	body[len(body)/2] ^= 0x01
	c.corrupted.Add(1)
	r2 := r.Clone(r.Context())
	r2.Body = io.NopCloser(bytes.NewReader(body))
	r2.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	return c.next.RoundTrip(r2)
}

// openCorrupting opens a store in mode whose transport runs through a
// corrupter (initially passing everything through).
func openCorrupting(t *testing.T, srv *minio.Server, mode s3.PayloadMode) (*s3.Store, *corrupter) {
	t.Helper()
	c := &corrupter{}
	o := srv.Options(t, srv.Bucket(t))
	o.PayloadChecksum = mode
	o.WrapTransport = func(next http.RoundTripper) http.RoundTripper { c.next = next; return c }
	return srv.StoreWith(t, o), c
}

// logBuffer collects a store's log lines for assertions.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func TestProbePayloadChecksumOnMinIO(t *testing.T) {
	srv := minio.Start(t)
	cases := []struct {
		want, got s3.PayloadMode
		probed    bool // the probe writes objects
	}{
		{"", s3.PayloadCRC32C, true}, // empty is auto
		{s3.PayloadAuto, s3.PayloadCRC32C, true},
		{s3.PayloadCRC32C, s3.PayloadCRC32C, true},
		{s3.PayloadMD5, s3.PayloadMD5, true},
		{s3.PayloadSigned, s3.PayloadSigned, false},
		{s3.PayloadUnsigned, s3.PayloadUnsigned, false},
	}
	for _, c := range cases {
		p := newProxy(t, srv.Endpoint)
		var logs logBuffer
		o := srv.Options(t, srv.Bucket(t))
		o.Endpoint = p.URL
		o.PayloadChecksum = c.want
		o.Logger = zerolog.New(&logs)
		st := srv.StoreWith(t, o)
		if c.want == "" || c.want == s3.PayloadAuto {
			// Before the probe, an auto store over plain http signs.
			if got := st.PayloadMode(); got != s3.PayloadSigned {
				t.Errorf("auto store before the probe: mode %s, want signed", got)
			}
		}
		const probe = "payload-checksum-probe-123-456"
		// A probe object left by a crash must not confuse the probe.
		if err := st.Put(ctxT(t), probe, []byte("leftover"), false); err != nil {
			t.Fatal(err)
		}
		before := len(p.puts())
		got, err := st.ProbePayloadChecksum(ctxT(t), probe)
		if err != nil {
			t.Fatalf("mode %q: probe on MinIO: %v", c.want, err)
		}
		if got != c.got || st.PayloadMode() != c.got {
			t.Errorf("mode %q: probe chose %s (PayloadMode %s), want %s", c.want, got, st.PayloadMode(), c.got)
		}
		if probed := len(p.puts()) > before; probed != c.probed {
			t.Errorf("mode %q: probe sent PUTs = %v, want %v", c.want, probed, c.probed)
		}
		if c.probed {
			if _, err := st.Size(ctxT(t), probe); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("mode %q: probe object not deleted: Size err = %v", c.want, err)
			}
		}
		if strings.Contains(logs.String(), "does not verify") {
			t.Errorf("mode %q: MinIO verifies checksums, but the store logged otherwise:\n%s", c.want, logs.String())
		}
	}
}

// TestProbeStoreNotVerifying puts a proxy in front of MinIO that plays a
// store ignoring checksums (it accepts the PUT with the wrong checksum) or
// refusing the header; auto falls back to signing, a forced mode stays and
// warns.
func TestProbeStoreNotVerifying(t *testing.T) {
	srv := minio.Start(t)
	const probe = "payload-checksum-probe-1-2"
	ignore := func(w http.ResponseWriter, r *http.Request) bool {
		// The second PUT of the probe carries the wrong checksum: answer
		// it as a store would that does not look at the checksum.
		if r.Method == http.MethodPut && strings.HasSuffix(r.URL.Path, "/"+probe) && r.Header.Get("X-Amz-Checksum-Crc32c") != "" && strings.Contains(readBody(r), "does not match") {
			w.WriteHeader(http.StatusOK)
			return true
		}
		return false
	}
	refuse := func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPut && r.Header.Get("X-Amz-Checksum-Crc32c") != "" {
			w.WriteHeader(http.StatusNotImplemented)
			return true
		}
		return false
	}
	// A refusal that is not a bad digest (here 403) proves nothing.
	forbid := func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPut && strings.HasSuffix(r.URL.Path, "/"+probe) && strings.Contains(readBody(r), "does not match") {
			w.WriteHeader(http.StatusForbidden)
			return true
		}
		return false
	}
	cases := []struct {
		name   string
		handle func(http.ResponseWriter, *http.Request) bool
		want   s3.PayloadMode
		got    s3.PayloadMode
		log    string
	}{
		{"ignores/auto", ignore, s3.PayloadAuto, s3.PayloadSigned, "was accepted"},
		{"ignores/crc32c", ignore, s3.PayloadCRC32C, s3.PayloadCRC32C, "does not verify the upload checksum"},
		{"refuses/auto", refuse, s3.PayloadAuto, s3.PayloadSigned, "HTTP 501"},
		{"forbids/auto", forbid, s3.PayloadAuto, s3.PayloadSigned, "HTTP 403, not as a bad digest"},
	}
	for _, c := range cases {
		p := newProxy(t, srv.Endpoint)
		var logs logBuffer
		o := srv.Options(t, srv.Bucket(t))
		o.Endpoint = p.URL
		o.PayloadChecksum = c.want
		o.Logger = zerolog.New(&logs)
		st := srv.StoreWith(t, o)
		p.mu.Lock()
		p.handle = c.handle
		p.mu.Unlock()
		got, err := st.ProbePayloadChecksum(ctxT(t), probe)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got != c.got || st.PayloadMode() != c.got {
			t.Errorf("%s: probe chose %s (PayloadMode %s), want %s", c.name, got, st.PayloadMode(), c.got)
		}
		if !strings.Contains(logs.String(), c.log) {
			t.Errorf("%s: log does not mention %q:\n%s", c.name, c.log, logs.String())
		}
		if _, err := st.Size(ctxT(t), probe); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("%s: probe object not deleted: Size err = %v", c.name, err)
		}
	}
}

// readBody reads a request body for inspection and puts it back.
func readBody(r *http.Request) string {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		return ""
	}
	r.Body = io.NopCloser(bytes.NewReader(b))
	return string(b)
}

func TestPayloadModeRoundTrip(t *testing.T) {
	srv := minio.Start(t)
	for _, mode := range []s3.PayloadMode{s3.PayloadCRC32C, s3.PayloadMD5, s3.PayloadSigned, s3.PayloadUnsigned} {
		st, _ := openCorrupting(t, srv, mode)
		for _, size := range []int{0, 1, 4095, 4 << 20} {
			body := make([]byte, size)
			for i := range body {
				body[i] = byte(i*31 + size)
			}
			name := fmt.Sprintf("o-%d", size)
			if err := st.Put(ctxT(t), name, body, true); err != nil {
				t.Fatalf("%s: put %d bytes: %v", mode, size, err)
			}
			buf := make([]byte, size+1)
			n, err := st.GetRange(ctxT(t), name, 0, buf)
			if err != nil || n != size || !bytes.Equal(buf[:n], body) {
				t.Errorf("%s: %d-byte object read back as %d bytes (%v), equal %v", mode, size, n, err, bytes.Equal(buf[:n], body))
			}
		}
	}
}

func TestCorruptedBodyRejected(t *testing.T) {
	srv := minio.Start(t)
	body := bytes.Repeat([]byte("bs3 chunk data "), 70000)
	// In one piece (Put) and in pieces (PutV: a chunk built in cache
	// windows), empty pieces included.
	pieces := [][]byte{body[:100], body[100 : 64<<10], {}, body[64<<10:]}
	for _, mode := range []s3.PayloadMode{s3.PayloadCRC32C, s3.PayloadMD5, s3.PayloadSigned} {
		st, c := openCorrupting(t, srv, mode)
		for _, vectored := range []bool{false, true} {
			name := "damaged"
			put := func() error { return st.Put(ctxT(t), name, body, true) }
			if vectored {
				name = "damaged-in-pieces"
				put = func() error { return st.PutV(ctxT(t), name, pieces, true) }
			}
			before := c.corrupted.Load()
			c.n.Store(1)
			err := put()
			if c.corrupted.Load() != before+1 {
				t.Fatalf("%s %s: the corrupter damaged %d bodies, want 1", mode, name, c.corrupted.Load()-before)
			}
			if !errors.Is(err, s3.ErrChecksumMismatch) {
				t.Errorf("%s %s: a body damaged in transit: err = %v, want ErrChecksumMismatch", mode, name, err)
			}
			if errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrNotFound) {
				t.Errorf("%s %s: damage reported as a final answer: %v", mode, name, err)
			}
			if _, err := st.Size(ctxT(t), name); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("%s %s: the damaged body was stored: Size err = %v", mode, name, err)
			}
			// Resending the same bytes succeeds and stores them intact.
			if err := put(); err != nil {
				t.Fatalf("%s %s: resend: %v", mode, name, err)
			}
			buf := make([]byte, len(body))
			if n, err := st.GetRange(ctxT(t), name, 0, buf); err != nil || n != len(body) || !bytes.Equal(buf, body) {
				t.Errorf("%s %s: resent object reads back wrong: %d bytes, %v", mode, name, n, err)
			}
		}
	}
	// Unsigned without a checksum has nothing to detect the damage with:
	// why it is only the fallback over TLS.
	st, c := openCorrupting(t, srv, s3.PayloadUnsigned)
	c.n.Store(1)
	if err := st.Put(ctxT(t), "damaged", body, true); err != nil {
		t.Fatalf("unsigned: %v", err)
	}
	buf := make([]byte, len(body))
	if n, err := st.GetRange(ctxT(t), "damaged", 0, buf); err != nil || n != len(body) || bytes.Equal(buf, body) {
		t.Errorf("unsigned: expected the damaged body to be stored as sent: %d bytes, %v, intact %v", n, err, bytes.Equal(buf, body))
	}
}

func TestConformanceEveryPayloadMode(t *testing.T) {
	srv := minio.Start(t)
	for _, mode := range []s3.PayloadMode{s3.PayloadAuto, s3.PayloadCRC32C, s3.PayloadMD5, s3.PayloadSigned, s3.PayloadUnsigned} {
		t.Run(string(mode), func(t *testing.T) {
			storetest.Run(t, func(t *testing.T) store.Store {
				o := srv.Options(t, srv.Bucket(t))
				o.PayloadChecksum = mode
				st := srv.StoreWith(t, o)
				if mode == s3.PayloadAuto {
					got, err := st.ProbePayloadChecksum(ctxT(t), "probe")
					if err != nil || got != s3.PayloadCRC32C {
						t.Fatalf("auto probe: %s, %v; want crc32c", got, err)
					}
				}
				return st
			})
		})
	}
}

func TestUnknownPayloadMode(t *testing.T) {
	srv := minio.Start(t)
	o := srv.Options(t, srv.Bucket(t))
	o.PayloadChecksum = "sha1"
	_, err := s3.New(ctxT(t), o)
	if err == nil || !strings.Contains(err.Error(), `"sha1"`) || !strings.Contains(err.Error(), "crc32c") {
		t.Errorf("New with payload mode sha1: err = %v, want one naming the mode and the accepted ones", err)
	}
}

// TestPayloadModeOverTLS: over https, auto sends the CRC32C in a header
// like over http (not the SDK's aws-chunked trailers, which several stores
// reject), and a store that does not verify it falls back to unsigned:
// TLS protects the body, so signing its SHA-256 would be wasted CPU.
func TestPayloadModeOverTLS(t *testing.T) {
	srv := minio.Start(t)
	const probe = "payload-checksum-probe-7-8"
	body := bytes.Repeat([]byte("over tls "), 50000)
	cases := []struct {
		name   string
		ignore bool
		want   s3.PayloadMode
	}{
		{"verifying store", false, s3.PayloadCRC32C},
		{"store ignoring checksums", true, s3.PayloadUnsigned},
	}
	for _, c := range cases {
		p := startProxy(t, srv.Endpoint, true)
		o := srv.Options(t, srv.Bucket(t))
		o.Endpoint = p.URL
		o.WrapTransport = func(http.RoundTripper) http.RoundTripper { return p.Transport }
		st := srv.StoreWith(t, o)
		if got := st.PayloadMode(); got != s3.PayloadUnsigned {
			t.Errorf("%s: auto over https before the probe: %s, want unsigned", c.name, got)
		}
		if c.ignore {
			p.mu.Lock()
			p.handle = func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method == http.MethodPut && strings.HasSuffix(r.URL.Path, "/"+probe) && strings.Contains(readBody(r), "does not match") {
					w.WriteHeader(http.StatusOK)
					return true
				}
				return false
			}
			p.mu.Unlock()
		}
		got, err := st.ProbePayloadChecksum(ctxT(t), probe)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got != c.want {
			t.Errorf("%s: probe over https chose %s, want %s", c.name, got, c.want)
		}
		if err := st.Put(ctxT(t), "tls", body, true); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		buf := make([]byte, len(body))
		if n, err := st.GetRange(ctxT(t), "tls", 0, buf); err != nil || n != len(body) || !bytes.Equal(buf, body) {
			t.Errorf("%s: read back %d bytes, %v", c.name, n, err)
		}
		puts := p.puts()
		h := puts[len(puts)-1].Header
		if got := h.Get("X-Amz-Content-Sha256"); got != "UNSIGNED-PAYLOAD" {
			t.Errorf("%s: x-amz-content-sha256 = %q, want UNSIGNED-PAYLOAD", c.name, got)
		}
		if hasCRC := h.Get("X-Amz-Checksum-Crc32c") != ""; hasCRC != (c.want == s3.PayloadCRC32C) {
			t.Errorf("%s: x-amz-checksum-crc32c present = %v in mode %s", c.name, hasCRC, c.want)
		}
		if h.Get("X-Amz-Trailer") != "" || strings.Contains(h.Get("Content-Encoding"), "aws-chunked") {
			t.Errorf("%s: PUT uses trailers: x-amz-trailer %q, content-encoding %q", c.name, h.Get("X-Amz-Trailer"), h.Get("Content-Encoding"))
		}
	}
}
