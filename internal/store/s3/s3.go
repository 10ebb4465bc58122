// Package s3 is the store.Store on S3-compatible object storage (AWS S3,
// MinIO, Ceph RGW, ...), built on aws-sdk-go-v2.
//
// It owns the translation between store semantics and S3 requests: byte
// ranges, conditional writes (If-None-Match: *), and the mapping of HTTP
// statuses to store.ErrNotFound / ErrExists / ErrConflict. It must never
// retry (the object proxy above retries with its own backoff; SDK retries
// would multiply them), never set a per-request overall timeout (the proxy
// sets per-attempt contexts), and never log credentials.
//
// It also owns how an upload's body is protected (the payload mode, see
// payload.go and docs/ARCHITECTURE.md "Upload integrity and CPU").
package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/logging"
	smithyhttp "github.com/aws/smithy-go/transport/http"
	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store"
)

// Options configure a Store.
type Options struct {
	// Endpoint is the S3 endpoint URL; empty means AWS. A custom endpoint
	// (e.g. "http://127.0.0.1:9000") is addressed path-style.
	Endpoint string
	// Region; empty means the AWS default chain's region, else us-east-1.
	Region string
	Bucket string
	// AccessKey and SecretKey; both empty selects the AWS default
	// credential chain (environment, shared config, instance role).
	AccessKey, SecretKey string
	// MaxConns bounds the HTTP connections to the endpoint (and the idle
	// ones kept). Set it to uploaders+downloaders; 0 means 64.
	MaxConns int
	// CreateBucket creates the bucket if it does not exist.
	CreateBucket bool
	// PayloadChecksum selects how Put bodies are protected (see
	// PayloadMode); empty means PayloadAuto.
	PayloadChecksum PayloadMode
	// WrapTransport, if set, wraps the HTTP transport of every request:
	// tests use it to damage bodies after they were checksummed.
	WrapTransport func(http.RoundTripper) http.RoundTripper
	// WrapConn, if set, wraps every connection dialed, below bs3's own
	// connection type: tests use it to watch what goes to the socket.
	WrapConn func(net.Conn) net.Conn
	Logger   zerolog.Logger
}

// Store is an S3 bucket seen as a store.Store. Safe for concurrent use.
type Store struct {
	client *s3.Client
	// unsigned is client with UNSIGNED-PAYLOAD in place of the payload's
	// SHA-256; Put uses it in every mode but PayloadSigned.
	unsigned  *s3.Client
	transport *http.Transport
	bucket    string
	endpoint  string // for messages: the URL, or "AWS S3 (region)"
	tls       bool   // requests go over https
	// want is the configured mode; payload the one Put uses now (an
	// auto store starts with its fallback and switches after the probe).
	want    PayloadMode
	payload atomic.Pointer[PayloadMode]
	log     zerolog.Logger
}

var (
	_ store.VectorReader = (*Store)(nil)
	_ store.VectorWriter = (*Store)(nil)
)

const defaultMaxConns = 64

// New connects to the bucket and checks that it is reachable (creating it
// if o.CreateBucket is set). The error names the endpoint and bucket and
// says whether the endpoint could not be reached, access was denied, or the
// bucket does not exist.
func New(ctx context.Context, o Options) (*Store, error) {
	if o.Bucket == "" {
		return nil, errors.New("s3: no bucket configured")
	}
	if (o.AccessKey == "") != (o.SecretKey == "") {
		return nil, errors.New("s3: set both access key and secret key, or neither to use the AWS default credential chain")
	}
	want := o.PayloadChecksum
	if want == "" {
		want = PayloadAuto
	}
	if err := want.Check(); err != nil {
		return nil, fmt.Errorf("s3: %w", err)
	}
	maxConns := o.MaxConns
	if maxConns <= 0 {
		maxConns = defaultMaxConns
	}
	loadOpts := []func(*config.LoadOptions) error{
		// Retries belong to the object proxy.
		config.WithRetryer(func() aws.Retryer { return aws.NopRetryer{} }),
		// The SDK's own logger prints to stderr outside our structured log.
		config.WithLogger(logging.Nop{}),
		// Since service/s3 v1.73 the SDK adds CRC32 checksums by default,
		// which several S3-compatible stores reject.
		config.WithRequestChecksumCalculation(aws.RequestChecksumCalculationWhenRequired),
		config.WithResponseChecksumValidation(aws.ResponseChecksumValidationWhenRequired),
	}
	if o.Region != "" {
		loadOpts = append(loadOpts, config.WithRegion(o.Region))
	}
	creds := "default chain"
	if o.AccessKey != "" {
		creds = "static"
		loadOpts = append(loadOpts, config.WithCredentialsProvider(
			credentials.NewStaticCredentialsProvider(o.AccessKey, o.SecretKey, "")))
	}
	cfg, err := config.LoadDefaultConfig(ctx, loadOpts...)
	if err != nil {
		return nil, fmt.Errorf("s3: load AWS configuration: %w", err)
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	// Our own pool, sized for the proxy's workers, but built on the SDK's
	// transport so settings it loaded (AWS_CA_BUNDLE, proxies, TLS
	// minimum) are kept.
	transport := newTransport(cfg.HTTPClient, maxConns, o.WrapConn)
	var rt http.RoundTripper = transport
	if o.WrapTransport != nil {
		rt = o.WrapTransport(rt)
	}
	rt = bodyTransport{next: rt} // outermost: a wrapper sees the body sent
	cfg.HTTPClient = &http.Client{
		Transport: rt,
		// S3 redirects (wrong region) are errors to report, not to follow.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}

	endpoint := o.Endpoint
	if endpoint == "" {
		endpoint = fmt.Sprintf("AWS S3 (%s)", cfg.Region)
	}
	clientOpts := func(so *s3.Options) {
		if o.Endpoint != "" {
			so.BaseEndpoint = aws.String(o.Endpoint)
			// Custom endpoints rarely have per-bucket DNS names.
			so.UsePathStyle = true
		}
		so.Retryer = aws.NopRetryer{}
		// No "Expect: 100-continue" on large Puts: it costs a round trip
		// per chunk, and our bodies are never rejected for their size.
		so.ContinueHeaderThresholdBytes = -1
	}
	client := s3.NewFromConfig(cfg, clientOpts)
	// A client of its own rather than a per-call option: per-call options
	// copy the middleware list on every request.
	unsigned := s3.NewFromConfig(cfg, clientOpts, func(so *s3.Options) {
		// Clipped: the list may share its array with client's.
		so.APIOptions = append(slices.Clip(so.APIOptions), v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware)
	})

	s := &Store{
		client:    client,
		unsigned:  unsigned,
		transport: transport,
		bucket:    o.Bucket,
		endpoint:  endpoint,
		tls:       o.Endpoint == "" || strings.HasPrefix(strings.ToLower(o.Endpoint), "https://"),
		want:      want,
		log:       o.Logger.With().Str("bucket", o.Bucket).Str("endpoint", endpoint).Logger(),
	}
	mode := want
	if mode == PayloadAuto {
		mode = s.fallback()
	}
	s.payload.Store(&mode)
	if err := s.checkBucket(ctx, o.CreateBucket, cfg.Region); err != nil {
		return nil, err
	}
	s.log.Info().Str("region", cfg.Region).Str("credentials", creds).
		Int("max_conns", maxConns).Str("payload_checksum", string(want)).Str("payload_mode", string(mode)).Msg("s3 store ready")
	return s, nil
}

// newTransport returns the HTTP transport of the SDK's default client with
// the connection pool set to maxConns, and no timeout on a whole request.
func newTransport(sdkClient aws.HTTPClient, maxConns int, wrap func(net.Conn) net.Conn) *http.Transport {
	var tr *http.Transport
	if bc, ok := sdkClient.(*awshttp.BuildableClient); ok {
		tr = bc.GetTransport() // a copy
	} else if dt, ok := http.DefaultTransport.(*http.Transport); ok {
		tr = dt.Clone()
	} else {
		tr = &http.Transport{Proxy: http.ProxyFromEnvironment}
	}
	dial := (&net.Dialer{
		Timeout:   10 * time.Second,
		KeepAlive: 30 * time.Second,
	}).DialContext
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		if wrap != nil {
			c = wrap(c)
		}
		return bodyConn{c}, nil // PUT bodies without a copy (putbody.go)
	}
	tr.TLSHandshakeTimeout = 10 * time.Second
	tr.MaxIdleConns = maxConns
	tr.MaxIdleConnsPerHost = maxConns
	tr.MaxConnsPerHost = maxConns
	tr.IdleConnTimeout = 90 * time.Second
	// Both buffers stay at the 4 KiB default. The read buffer is smaller
	// than every read of a body (a window, at least a block): a read that
	// finds it empty goes straight into the caller's buffer. At 64 KiB, a
	// GET into 64 KiB windows went through it for good once the headers
	// left part of the body in it, and every byte fetched was copied
	// twice. The write buffer holds only a request's headers: net/http
	// flushes them before a body it does not know as in-memory, and
	// bodyConn writes the body straight from its buffers (putbody.go).
	// S3 speaks HTTP/1.1: one connection per request in flight.
	tr.ForceAttemptHTTP2 = false
	return tr
}

// Close releases the idle HTTP connections. The store stays usable (new
// requests open new connections); call it when the store is dropped.
func (s *Store) Close() {
	s.transport.CloseIdleConnections()
}

// checkBucket runs HeadBucket and turns failures into errors a user can
// act on.
func (s *Store) checkBucket(ctx context.Context, create bool, region string) error {
	_, err := s.client.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(s.bucket)})
	if err == nil {
		return nil
	}
	status := httpStatus(err)
	if status == http.StatusNotFound && create {
		return s.createBucket(ctx, region)
	}
	return s.describe("check bucket", status, err)
}

// describe explains a failed bucket-level request.
func (s *Store) describe(what string, status int, err error) error {
	var sendErr *smithyhttp.RequestSendError
	switch {
	case strings.Contains(err.Error(), "get credentials"):
		// The SDK reports a failed credential chain only as text; its
		// HTTP status is the instance metadata service's, not S3's.
		return fmt.Errorf("s3: no credentials for bucket %q at %s: s3.access_key and s3.secret_key are empty and the AWS default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, instance role) found none: %w", s.bucket, s.endpoint, err)
	case status == http.StatusNotFound:
		return fmt.Errorf("s3: bucket %q does not exist at %s: %w", s.bucket, s.endpoint, err)
	case status == http.StatusForbidden:
		return fmt.Errorf("s3: access denied to bucket %q at %s (wrong access key or secret key, or no permission on the bucket): %w", s.bucket, s.endpoint, err)
	case status == http.StatusMovedPermanently || status == http.StatusBadRequest:
		return fmt.Errorf("s3: bucket %q at %s refused the request with HTTP %d (wrong region?): %w", s.bucket, s.endpoint, status, err)
	case status != 0:
		return fmt.Errorf("s3: %s %q at %s: HTTP %d: %w", what, s.bucket, s.endpoint, status, err)
	case errors.As(err, &sendErr):
		return fmt.Errorf("s3: cannot reach endpoint %s (bucket %q): %w", s.endpoint, s.bucket, err)
	}
	return fmt.Errorf("s3: %s %q at %s: %w", what, s.bucket, s.endpoint, err)
}

func (s *Store) createBucket(ctx context.Context, region string) error {
	in := &s3.CreateBucketInput{Bucket: aws.String(s.bucket)}
	if region != "us-east-1" {
		// AWS wants the location for every region but the default one.
		in.CreateBucketConfiguration = &types.CreateBucketConfiguration{
			LocationConstraint: types.BucketLocationConstraint(region),
		}
	}
	_, err := s.client.CreateBucket(ctx, in)
	var owned *types.BucketAlreadyOwnedByYou
	if err != nil && !errors.As(err, &owned) {
		return s.describe("create bucket", httpStatus(err), err)
	}
	if err == nil {
		s.log.Info().Msg("created bucket")
	}
	return nil
}

// httpStatus returns the HTTP status of a failed request, or 0 if no
// response was received.
func httpStatus(err error) int {
	var re interface{ HTTPStatusCode() int }
	if errors.As(err, &re) {
		return re.HTTPStatusCode()
	}
	return 0
}

func errorCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

// Put implements store.Store. A conditional Put sends If-None-Match: *;
// HTTP 412 becomes store.ErrExists and 409 store.ErrConflict. The body is
// protected as the payload mode says; a body the store found damaged
// yields ErrChecksumMismatch (retryable: the damage happened in transit),
// unless its checksum came with it (store.WithBodyCRC32C) and the body no
// longer matches it: then the damage is in memory, and the error is
// store.ErrCorrupt, which the object proxy does not retry.
func (s *Store) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	one := [1][]byte{body}
	if crc, ok := store.BodyCRC32C(ctx, body); ok {
		ctx = store.WithPiecesCRC32C(ctx, one[:], crc)
	}
	return s.put(ctx, name, one[:], ifAbsent, *s.payload.Load(), "")
}

// PutV implements store.VectorWriter: one PUT whose body is read from the
// pieces in turn.
func (s *Store) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	return s.put(ctx, name, body, ifAbsent, *s.payload.Load(), "")
}

// put is Put of the concatenation of body in the given mode; a non-empty
// sum replaces the computed checksum (the probe sends a wrong one on
// purpose).
func (s *Store) put(ctx context.Context, name string, body [][]byte, ifAbsent bool, mode PayloadMode, sum string) error {
	ctx = withPutBody(ctx, body)
	in := &s3.PutObjectInput{
		Bucket:        aws.String(s.bucket),
		Key:           aws.String(name),
		Body:          newPiecesReader(body),
		ContentLength: aws.Int64(int64(store.PiecesLen(body))),
	}
	if ifAbsent {
		in.IfNoneMatch = aws.String("*")
	}
	client := s.unsigned
	ingested := false // sum was taken as the data came in, not from body now
	switch mode {
	case PayloadCRC32C:
		if sum == "" {
			if crc, ok := store.PiecesCRC32C(ctx, body); ok {
				sum, ingested = crc32cString(crc), true // computed as the chunk was built
			} else {
				sum = crc32cBase64(body)
			}
		}
		// Set by us, the SDK sends it as it is and hashes nothing.
		in.ChecksumCRC32C = aws.String(sum)
	case PayloadMD5:
		if sum == "" {
			sum = md5Base64(body)
		}
		in.ContentMD5 = aws.String(sum)
	case PayloadSigned:
		client = s.client
	}
	_, err := client.PutObject(ctx, in)
	if err != nil {
		switch httpStatus(err) {
		case http.StatusPreconditionFailed:
			return fmt.Errorf("s3 put %q: %w: %w", name, store.ErrExists, err)
		case http.StatusConflict:
			return fmt.Errorf("s3 put %q: %w: %w", name, store.ErrConflict, err)
		}
		if checksumMismatch(err) {
			// A checksum taken from body now matched what was sent; one
			// taken as the data came in is checked against body now.
			if ingested {
				if now := crc32cBase64(body); now != sum {
					// Not damage in transit: the bytes changed in memory
					// after they were written. No retry can bring them
					// back, and storing them would serve acknowledged
					// writes wrong.
					return fmt.Errorf("s3 put %q: %w: the chunk's bytes changed in memory after its writes were taken (CRC32C %s when written, %s now): memory damage or a bs3 bug; not uploaded: %w",
						name, store.ErrCorrupt, sum, now, err)
				}
			}
			return fmt.Errorf("s3 put %q (%s payload): %w: %w", name, mode, ErrChecksumMismatch, err)
		}
		return fmt.Errorf("s3 put %q: %w", name, err)
	}
	return nil
}

// GetRange implements store.Store. The body is read straight into buf.
func (s *Store) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	one := [1][]byte{buf}
	return s.getRange(ctx, name, off, len(buf), one[:])
}

// GetRangeV implements store.VectorReader: one GET, its body read
// straight into bufs in turn.
func (s *Store) GetRangeV(ctx context.Context, name string, off int64, bufs [][]byte) (int, error) {
	total := 0
	for _, b := range bufs {
		total += len(b)
	}
	return s.getRange(ctx, name, off, total, bufs)
}

// getRange reads up to total bytes at off into bufs (total bytes long
// together).
func (s *Store) getRange(ctx context.Context, name string, off int64, total int, bufs [][]byte) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("s3 get %q: negative offset %d", name, off)
	}
	if total == 0 {
		// No byte range is empty in HTTP; only existence can be checked.
		if _, err := s.Size(ctx, name); err != nil {
			return 0, err
		}
		return 0, nil
	}
	end := off + int64(total) - 1
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{
		Bucket: aws.String(s.bucket),
		Key:    aws.String(name),
		Range:  aws.String("bytes=" + strconv.FormatInt(off, 10) + "-" + strconv.FormatInt(end, 10)),
	})
	if err != nil {
		switch status := httpStatus(err); {
		case status == http.StatusRequestedRangeNotSatisfiable:
			// off is at or past the end (or the object is empty).
			return 0, nil
		case status == http.StatusNotFound && errorCode(err) != "NoSuchBucket":
			return 0, fmt.Errorf("s3 get %q: %w: %w", name, store.ErrNotFound, err)
		}
		return 0, fmt.Errorf("s3 get %q at %d: %w", name, off, err)
	}
	defer out.Body.Close()

	remaining := int64(-1) // body bytes still to come; -1 = unknown
	if out.ContentLength != nil && *out.ContentLength >= 0 {
		remaining = *out.ContentLength
	}
	if out.ContentRange == nil {
		// HTTP lets a server ignore Range and send the whole object (some
		// stores do for empty objects); skip to off.
		if off > 0 {
			skipped, err := io.CopyN(io.Discard, out.Body, off)
			if err == io.EOF && (remaining < 0 || skipped == remaining) {
				return 0, nil // the object ends before off
			}
			if err != nil {
				return 0, fmt.Errorf("s3 get %q at %d: skip to offset in a full-object response: %w", name, off, err)
			}
			if remaining >= 0 {
				remaining -= off
			}
		}
	} else if want := "bytes " + strconv.FormatInt(off, 10) + "-"; !strings.HasPrefix(*out.ContentRange, want) {
		return 0, fmt.Errorf("s3 get %q at %d: unexpected Content-Range %q", name, off, *out.ContentRange)
	}
	want := total
	if remaining >= 0 && remaining < int64(want) {
		want = int(remaining) // the object ends inside the range
	}
	n := 0
	for _, b := range bufs {
		if n >= want {
			break
		}
		b = b[:min(len(b), want-n)]
		k, err := io.ReadFull(out.Body, b)
		n += k
		if err != nil {
			if remaining < 0 && (err == io.ErrUnexpectedEOF || err == io.EOF) {
				return n, nil // length unknown: the end of the body is the end of the object
			}
			return n, fmt.Errorf("s3 get %q at %d: body ended after %d of %d bytes: %w", name, off, n, want, err)
		}
	}
	return n, nil
}

// Size implements store.Store.
func (s *Store) Size(ctx context.Context, name string) (int64, error) {
	out, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{
		Bucket: aws.String(s.bucket),
		Key:    aws.String(name),
	})
	if err != nil {
		if httpStatus(err) == http.StatusNotFound {
			return 0, fmt.Errorf("s3 size %q: %w: %w", name, store.ErrNotFound, err)
		}
		return 0, fmt.Errorf("s3 size %q: %w", name, err)
	}
	if out.ContentLength == nil {
		return 0, fmt.Errorf("s3 size %q: response has no Content-Length", name)
	}
	return *out.ContentLength, nil
}

// List implements store.Store. S3 lists keys in UTF-8 binary order, which
// is Go's string order.
func (s *Store) List(ctx context.Context, prefix string, fn func(name string, size int64) error) error {
	p := s3.NewListObjectsV2Paginator(s.client, &s3.ListObjectsV2Input{
		Bucket: aws.String(s.bucket),
		Prefix: aws.String(prefix),
	})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return fmt.Errorf("s3 list %q: %w", prefix, err)
		}
		for _, obj := range page.Contents {
			if obj.Key == nil {
				continue
			}
			if err := fn(*obj.Key, aws.ToInt64(obj.Size)); err != nil {
				return err
			}
		}
	}
	return nil
}

// Delete implements store.Store. S3 answers success for missing keys.
func (s *Store) Delete(ctx context.Context, name string) error {
	_, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{
		Bucket: aws.String(s.bucket),
		Key:    aws.String(name),
	})
	if err != nil {
		return fmt.Errorf("s3 delete %q: %w", name, err)
	}
	return nil
}

// ProbeConditionalWrites checks that the store refuses an overwrite sent
// with If-None-Match: * (HTTP 412), which bs3 relies on to detect a second
// writer on a volume. It writes probeName twice and deletes it afterwards.
// The error says what the store did instead: accepted the overwrite (no
// conditional write support), or answered something else (some MinIO
// releases answered 304).
func (s *Store) ProbeConditionalWrites(ctx context.Context, probeName string) (err error) {
	// A probe left by an earlier crash would make the first write fail.
	if err := s.Delete(ctx, probeName); err != nil {
		return fmt.Errorf("conditional write probe at %s: %w", s.endpoint, err)
	}
	defer func() {
		if derr := s.Delete(ctx, probeName); derr != nil && err == nil {
			err = fmt.Errorf("conditional write probe at %s: remove probe object: %w", s.endpoint, derr)
		}
	}()
	first := []byte("bs3 conditional write probe: first")
	second := []byte("bs3 conditional write probe: second, must be refused")
	if err := s.Put(ctx, probeName, first, true); err != nil {
		return fmt.Errorf("conditional write probe at %s: first write with If-None-Match: * failed: %w", s.endpoint, err)
	}
	perr := s.Put(ctx, probeName, second, true)
	switch status := httpStatus(perr); {
	case perr == nil:
		return fmt.Errorf("conditional write probe at %s: the store accepted an overwrite sent with If-None-Match: *, so it does not support conditional writes and a second writer on a volume could not be detected", s.endpoint)
	case errors.Is(perr, store.ErrExists):
		// Refused as it should be; check the refusal did not change the object.
	case status == http.StatusNotModified:
		return fmt.Errorf("conditional write probe at %s: the store answered 304 Not Modified instead of 412 Precondition Failed to an overwrite sent with If-None-Match: * (known from some MinIO releases; upgrade the store): %w", s.endpoint, perr)
	case status != 0:
		return fmt.Errorf("conditional write probe at %s: the store answered HTTP %d instead of 412 Precondition Failed to an overwrite sent with If-None-Match: *: %w", s.endpoint, status, perr)
	default:
		return fmt.Errorf("conditional write probe at %s: second write: %w", s.endpoint, perr)
	}
	buf := make([]byte, len(second))
	n, err := s.GetRange(ctx, probeName, 0, buf)
	if err != nil {
		return fmt.Errorf("conditional write probe at %s: read back: %w", s.endpoint, err)
	}
	if !bytes.Equal(buf[:n], first) {
		return fmt.Errorf("conditional write probe at %s: the store refused the overwrite with 412 but changed the object anyway", s.endpoint)
	}
	return nil
}
