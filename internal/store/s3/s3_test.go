package s3_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/store/storetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestConformance(t *testing.T) {
	srv := minio.Start(t)
	storetest.Run(t, func(t *testing.T) store.Store {
		return srv.Store(t, srv.Bucket(t))
	})
}

func TestProbeConditionalWrites(t *testing.T) {
	srv := minio.Start(t)
	st := srv.Store(t, srv.Bucket(t))
	ctx := ctxT(t)
	// A probe object left behind by a crash must not break the probe.
	if err := st.Put(ctx, "probe", []byte("leftover"), false); err != nil {
		t.Fatal(err)
	}
	if err := st.ProbeConditionalWrites(ctx, "probe"); err != nil {
		t.Fatalf("probe on MinIO: %v", err)
	}
	if _, err := st.Size(ctx, "probe"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("probe object not deleted: Size err = %v", err)
	}
}

// proxy is a reverse proxy in front of MinIO that records requests and can
// rewrite responses, to reproduce stores that behave differently. Only
// responses are changed, so SigV4 signatures stay valid.
type proxy struct {
	URL       string
	Transport http.RoundTripper // for a TLS proxy: trusts its certificate

	mu       sync.Mutex
	requests []*http.Request // clones of what reached the proxy
	modify   func(*http.Response) error
	handle   func(http.ResponseWriter, *http.Request) bool // true: answered, do not forward
}

func newProxy(t *testing.T, target string) *proxy { return startProxy(t, target, false) }

// startProxy starts the proxy, serving https with a test certificate if
// tls is set; then p.Transport is a transport that trusts it.
func startProxy(t *testing.T, target string, tls bool) *proxy {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{}
	rp := httputil.NewSingleHostReverseProxy(u) // keeps the signed Host header
	rp.ModifyResponse = func(r *http.Response) error {
		p.mu.Lock()
		m := p.modify
		p.mu.Unlock()
		if m != nil {
			return m(r)
		}
		return nil
	}
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.requests = append(p.requests, r.Clone(context.Background()))
		handle := p.handle
		p.mu.Unlock()
		if handle != nil && handle(w, r) {
			return
		}
		rp.ServeHTTP(w, r)
	}))
	if tls {
		ts.StartTLS()
		p.Transport = ts.Client().Transport
	} else {
		ts.Start()
	}
	t.Cleanup(ts.Close)
	p.URL = ts.URL
	return p
}

func (p *proxy) puts() []*http.Request {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []*http.Request
	for _, r := range p.requests {
		if r.Method == http.MethodPut && strings.Count(r.URL.Path, "/") >= 2 {
			out = append(out, r)
		}
	}
	return out
}

func openVia(t *testing.T, srv *minio.Server, endpoint, bucket string, mode s3.PayloadMode) *s3.Store {
	t.Helper()
	st, err := s3.New(ctxT(t), s3.Options{
		Endpoint: endpoint, Region: srv.Region, Bucket: bucket,
		AccessKey: srv.AccessKey, SecretKey: srv.SecretKey,
		MaxConns: 4, CreateBucket: true, PayloadChecksum: mode,
		Logger: zerolog.Nop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return st
}

// putStatusRewrite makes the proxy turn the 412 MinIO gives a refused
// conditional Put into another status.
func putStatusRewrite(status int) func(*http.Response) error {
	return func(r *http.Response) error {
		if r.Request.Method == http.MethodPut && r.StatusCode == http.StatusPreconditionFailed {
			r.StatusCode = status
			r.Status = http.StatusText(status)
			r.Body = http.NoBody
			r.ContentLength = 0
			r.Header.Del("Content-Length")
		}
		return nil
	}
}

func TestProbeDetectsStoresWithoutConditionalWrites(t *testing.T) {
	srv := minio.Start(t)
	p := newProxy(t, srv.Endpoint)
	st := openVia(t, srv, p.URL, srv.Bucket(t), s3.PayloadSigned)
	ctx := ctxT(t)

	cases := []struct {
		status int
		want   string
	}{
		{http.StatusOK, "does not support conditional writes"}, // the overwrite "succeeded"
		{http.StatusNotModified, "304"},
		{http.StatusForbidden, "HTTP 403"},
	}
	for _, c := range cases {
		p.mu.Lock()
		p.modify = putStatusRewrite(c.status)
		p.mu.Unlock()
		err := st.ProbeConditionalWrites(ctx, "probe")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("store answering %d to a refused conditional write: probe err = %v, want one mentioning %q", c.status, err, c.want)
		}
		if err != nil && !strings.Contains(err.Error(), p.URL) {
			t.Errorf("probe error does not name the endpoint: %v", err)
		}
		p.mu.Lock()
		p.modify = nil
		p.mu.Unlock()
		if _, err := st.Size(ctx, "probe"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("after a failed probe the probe object remains: %v", err)
		}
	}
	// A 409 from the store is reported as a retryable conflict by Put.
	p.mu.Lock()
	p.modify = putStatusRewrite(http.StatusConflict)
	p.mu.Unlock()
	if err := st.Put(ctx, "x", []byte("1"), true); err != nil {
		t.Fatal(err)
	}
	if err := st.Put(ctx, "x", []byte("2"), true); !errors.Is(err, store.ErrConflict) {
		t.Errorf("Put answered 409: err = %v, want ErrConflict", err)
	}
}

func TestRequestHeaders(t *testing.T) {
	srv := minio.Start(t)
	body := bytes.Repeat([]byte("bs3"), 100000)
	sha := sha256.Sum256(body)
	md := md5.Sum(body)
	var crc [4]byte
	binary.BigEndian.PutUint32(crc[:], crc32.Checksum(body, crc32.MakeTable(crc32.Castagnoli)))
	cases := []struct {
		mode                s3.PayloadMode
		contentSHA, crc, md string
	}{
		{s3.PayloadSigned, hex.EncodeToString(sha[:]), "", ""},
		{s3.PayloadUnsigned, "UNSIGNED-PAYLOAD", "", ""},
		{s3.PayloadCRC32C, "UNSIGNED-PAYLOAD", base64.StdEncoding.EncodeToString(crc[:]), ""},
		{s3.PayloadMD5, "UNSIGNED-PAYLOAD", "", base64.StdEncoding.EncodeToString(md[:])},
	}
	for _, c := range cases {
		p := newProxy(t, srv.Endpoint)
		st := openVia(t, srv, p.URL, srv.Bucket(t), c.mode)
		if got := st.PayloadMode(); got != c.mode {
			t.Errorf("%s: PayloadMode() = %s", c.mode, got)
		}
		if err := st.Put(ctxT(t), "h", body, false); err != nil {
			t.Fatalf("%s: %v", c.mode, err)
		}
		buf := make([]byte, len(body))
		if n, err := st.GetRange(ctxT(t), "h", 0, buf); err != nil || n != len(body) || !bytes.Equal(buf, body) {
			t.Fatalf("%s: read back %d bytes, %v", c.mode, n, err)
		}
		puts := p.puts()
		if len(puts) != 1 {
			t.Fatalf("%s: saw %d object PUTs, want 1", c.mode, len(puts))
		}
		h := puts[0].Header
		if got := h.Get("X-Amz-Content-Sha256"); got != c.contentSHA {
			t.Errorf("%s: x-amz-content-sha256 = %q, want %q", c.mode, got, c.contentSHA)
		}
		if got := h.Get("X-Amz-Checksum-Crc32c"); got != c.crc {
			t.Errorf("%s: x-amz-checksum-crc32c = %q, want %q", c.mode, got, c.crc)
		}
		if got := h.Get("Content-Md5"); got != c.md {
			t.Errorf("%s: Content-MD5 = %q, want %q", c.mode, got, c.md)
		}
		// Only the checksum bs3 chose: the SDK's default checksums
		// (CRC32, trailers) are rejected by several S3-compatible stores.
		for k := range h {
			lk := strings.ToLower(k)
			if (strings.HasPrefix(lk, "x-amz-checksum-") && lk != "x-amz-checksum-crc32c") || lk == "x-amz-sdk-checksum-algorithm" || lk == "x-amz-trailer" {
				t.Errorf("%s: PUT carries checksum header %s", c.mode, k)
			}
		}
		if h.Get("Expect") != "" {
			t.Errorf("%s: PUT sent Expect: %s", c.mode, h.Get("Expect"))
		}
	}
}

func TestNoSDKRetries(t *testing.T) {
	srv := minio.Start(t)
	p := newProxy(t, srv.Endpoint)
	st := openVia(t, srv, p.URL, srv.Bucket(t), s3.PayloadSigned)
	before := len(p.puts())
	p.mu.Lock()
	p.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPut {
			w.WriteHeader(http.StatusServiceUnavailable)
			return true
		}
		return false
	}
	p.mu.Unlock()
	err := st.Put(ctxT(t), "r", []byte("x"), false)
	if err == nil {
		t.Fatal("Put succeeded through a proxy answering 503")
	}
	if n := len(p.puts()) - before; n != 1 {
		t.Errorf("one Put sent %d requests; the SDK retried", n)
	}
}

// TestServerIgnoringRange: HTTP allows a server to answer a range request
// with the whole object (200, no Content-Range); GetRange must still
// return the right bytes.
func TestServerIgnoringRange(t *testing.T) {
	srv := minio.Start(t)
	bucket := srv.Bucket(t)
	direct := srv.Store(t, bucket)
	p := newProxy(t, srv.Endpoint)
	st := openVia(t, srv, p.URL, bucket, s3.PayloadSigned)
	body := make([]byte, 10000)
	for i := range body {
		body[i] = byte(i * 7)
	}
	for name, b := range map[string][]byte{"full": body, "empty": nil} {
		if err := direct.Put(ctxT(t), name, b, false); err != nil {
			t.Fatal(err)
		}
	}
	var served atomic.Int32
	p.mu.Lock()
	p.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || r.Header.Get("Range") == "" {
			return false
		}
		name := r.URL.Path[strings.LastIndexByte(r.URL.Path, '/')+1:]
		size, err := direct.Size(r.Context(), name)
		if err != nil {
			return false // let MinIO answer (404)
		}
		whole := make([]byte, size)
		if _, err := direct.GetRange(r.Context(), name, 0, whole); err != nil {
			t.Error(err)
			return false
		}
		served.Add(1)
		w.Header().Set("Content-Length", strconv.Itoa(len(whole)))
		w.WriteHeader(http.StatusOK)
		w.Write(whole) //nolint:errcheck // the client side checks what arrives
		return true
	}
	p.mu.Unlock()

	cases := []struct {
		name      string
		off       int64
		len, want int
	}{
		{"full", 0, 100, 100},
		{"full", 1234, 4096, 4096},
		{"full", 9990, 100, 10},
		{"full", 10000, 10, 0},
		{"full", 20000, 10, 0},
		{"empty", 0, 10, 0},
		{"empty", 5, 10, 0},
	}
	for _, c := range cases {
		buf := make([]byte, c.len)
		n, err := st.GetRange(ctxT(t), c.name, c.off, buf)
		if err != nil || n != c.want {
			t.Errorf("GetRange(%s, %d, %d) = %d, %v; want %d", c.name, c.off, c.len, n, err, c.want)
			continue
		}
		if n > 0 && !bytes.Equal(buf[:n], body[c.off:c.off+int64(n)]) {
			t.Errorf("GetRange(%s, %d, %d): wrong bytes", c.name, c.off, c.len)
		}
	}
	if int(served.Load()) != len(cases) {
		t.Errorf("proxy served %d full-object answers, want %d", served.Load(), len(cases))
	}
	if _, err := st.GetRange(ctxT(t), "missing", 0, make([]byte, 1)); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("missing object: %v", err)
	}
}

func closedPort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

func TestNewUnreachableEndpoint(t *testing.T) {
	endpoint := "http://" + closedPort(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := s3.New(ctx, s3.Options{
		Endpoint: endpoint, Bucket: "vol", AccessKey: "k", SecretKey: "secretsecret",
		Logger: zerolog.Nop(),
	})
	if err == nil {
		t.Fatal("New succeeded against a closed port")
	}
	// It must fail on its own (connection refused), not by running into
	// the caller's deadline.
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("New waited for the context deadline: %v", err)
	}
	for _, want := range []string{endpoint, "cannot reach", `"vol"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestNewBadCredentialsAndMissingBucket(t *testing.T) {
	srv := minio.Start(t)
	bucket := srv.Bucket(t)
	srv.Store(t, bucket) // creates it

	const wrongSecret = "definitely-not-the-secret"
	_, err := s3.New(ctxT(t), s3.Options{
		Endpoint: srv.Endpoint, Region: srv.Region, Bucket: bucket,
		AccessKey: srv.AccessKey, SecretKey: wrongSecret, Logger: zerolog.Nop(),
	})
	if err == nil {
		t.Fatal("New succeeded with a wrong secret key")
	}
	for _, want := range []string{"access denied", bucket, srv.Endpoint} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if strings.Contains(err.Error(), wrongSecret) {
		t.Error("error message contains the secret key")
	}

	_, err = s3.New(ctxT(t), s3.Options{
		Endpoint: srv.Endpoint, Region: srv.Region, Bucket: "no-such-bucket-here",
		AccessKey: srv.AccessKey, SecretKey: srv.SecretKey, Logger: zerolog.Nop(),
	})
	if err == nil || !strings.Contains(err.Error(), "does not exist") || !strings.Contains(err.Error(), "no-such-bucket-here") {
		t.Errorf("New on a missing bucket without CreateBucket: err = %v", err)
	}

	// Opening an existing bucket with CreateBucket is fine.
	st := srv.Store(t, bucket)
	if err := st.Put(ctxT(t), "x", []byte("x"), false); err != nil {
		t.Fatal(err)
	}
	// Only one of the two key fields set is a configuration mistake.
	if _, err := s3.New(ctxT(t), s3.Options{Endpoint: srv.Endpoint, Bucket: bucket, AccessKey: "only"}); err == nil {
		t.Error("New accepted an access key without a secret key")
	}
}

func TestSurvivesServerRestart(t *testing.T) {
	srv := minio.Start(t)
	st := srv.Store(t, srv.Bucket(t))
	before := bytes.Repeat([]byte{0xA5}, 1<<20)
	if err := st.Put(ctxT(t), store.DataName(0), before, true); err != nil {
		t.Fatal(err)
	}

	srv.Kill()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := st.Put(ctx, store.DataName(1), []byte("during outage"), true); err == nil {
		t.Fatal("Put succeeded while the server was down")
	} else if errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrNotFound) {
		t.Fatalf("outage reported as %v", err)
	}
	if _, err := st.GetRange(ctx, store.DataName(0), 0, make([]byte, 10)); err == nil || errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetRange during the outage: err = %v, want a non-ErrNotFound error", err)
	}

	srv.Restart(t)
	// The same store (and its connection pool) works again.
	buf := make([]byte, len(before))
	if n, err := st.GetRange(ctxT(t), store.DataName(0), 0, buf); err != nil || n != len(buf) || !bytes.Equal(buf, before) {
		t.Fatalf("after restart, object written before the crash: %d bytes, %v", n, err)
	}
	if err := st.Put(ctxT(t), store.DataName(1), []byte("after"), true); err != nil {
		t.Fatalf("Put after restart: %v", err)
	}
	if err := st.Put(ctxT(t), store.DataName(0), []byte("x"), true); !errors.Is(err, store.ErrExists) {
		t.Fatalf("conditional Put after restart: err = %v, want ErrExists", err)
	}
}

// BenchmarkRawPut4MiB measures plain 4 MiB PUTs to MinIO from 4 uploaders
// per CPU: the ceiling bs3's write path is compared with.
func BenchmarkRawPut4MiB(b *testing.B) {
	srv := minio.Start(b)
	st := srv.Store(b, srv.Bucket(b))
	body := bytes.Repeat([]byte("0123456789abcdef"), (4<<20)/16)
	var key atomic.Int64
	// Sub-benchmark so MinIO starts once while b.N ramps up.
	b.Run("par4", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.SetParallelism(4)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := st.Put(context.Background(), store.DataName(key.Add(1)), body, false); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkRawGetRange4KiB measures random 4 KiB range GETs from 4 MiB
// objects with 16 readers per CPU: the ceiling of bs3's random reads.
func BenchmarkRawGetRange4KiB(b *testing.B) {
	srv := minio.Start(b)
	st := srv.Store(b, srv.Bucket(b))
	const objects, size = 8, 4 << 20
	body := bytes.Repeat([]byte("fedcba9876543210"), size/16)
	for k := range int64(objects) {
		if err := st.Put(context.Background(), store.DataName(k), body, false); err != nil {
			b.Fatal(err)
		}
	}
	var seq atomic.Uint64
	b.Run("par16", func(b *testing.B) {
		b.SetBytes(4096)
		b.SetParallelism(16)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			buf := make([]byte, 4096)
			for pb.Next() {
				// A cheap spread over objects and offsets without a shared RNG.
				i := seq.Add(1) * 0x9e3779b97f4a7c15
				k := int64(i % objects)
				off := int64((i>>32)%(size/4096)) * 4096
				n, err := st.GetRange(context.Background(), store.DataName(k), off, buf)
				if err != nil || n != len(buf) {
					b.Errorf("GetRange: %d, %v", n, err)
					return
				}
			}
		})
	})
}
