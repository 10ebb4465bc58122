package bench

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/store/sealed"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// uploadResult is one line of the upload CPU report.
type uploadResult struct {
	name        string
	mbps        float64
	cpuPerGiB   float64 // user + system CPU-seconds of this process per GiB
	allocsPerOp float64 // heap allocations per PUT
	bytesPerOp  float64 // heap bytes allocated per PUT
}

// BenchmarkUploadCPU measures the CPU the bs3 process spends per GiB
// uploaded, for each payload mode of the s3 store, through the store
// alone and through the object proxy, beside a raw aws-sdk-go-v2 client in
// the same run: 4 MiB objects at concurrency 16 (docs/ARCHITECTURE.md
// "Upload integrity and CPU"). MinIO runs as a child process, so its CPU
// is not counted (RUSAGE_SELF). Run one variant with e.g.
// -bench 'UploadCPU/bs3-crc32c$' -cpuprofile cpu.out. It reports, never
// asserts.
func BenchmarkUploadCPU(b *testing.B) {
	const (
		objSize     = 4 * mib
		concurrency = 16
		names       = 64 // objects are overwritten in turn: the bucket stays small
	)
	srv := minio.Start(b)
	body := make([]byte, objSize)
	for i := range body {
		body[i] = byte(i*7 + i>>13)
	}
	objects := scaled(1*gib) / objSize
	rawClient := newRawClient(b, srv, srv.Bucket(b))

	type variant struct {
		name string
		put  func(ctx context.Context, name string) error
		// setup runs before the measured phase (e.g. to open a store).
		setup func(b *testing.B)
	}
	// Raw client variants: what the SDK costs by itself in each mode,
	// including letting the SDK compute the CRC32C (ChecksumAlgorithm).
	rawPut := func(unsigned bool, checksum func(*awss3.PutObjectInput)) func(ctx context.Context, name string) error {
		var opts []func(*awss3.Options)
		if unsigned {
			opts = append(opts, func(o *awss3.Options) {
				o.APIOptions = append(o.APIOptions, v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware)
			})
		}
		return func(ctx context.Context, name string) error {
			in := &awss3.PutObjectInput{
				Bucket: rawClient.bucket, Key: aws.String(name),
				Body: bytes.NewReader(body), ContentLength: aws.Int64(objSize),
			}
			if checksum != nil {
				checksum(in)
			}
			_, err := rawClient.c.PutObject(ctx, in, opts...)
			return err
		}
	}
	ownCRC := func(in *awss3.PutObjectInput) {
		var sum [4]byte
		binary.BigEndian.PutUint32(sum[:], crc32.Checksum(body, crc32.MakeTable(crc32.Castagnoli)))
		in.ChecksumCRC32C = aws.String(base64.StdEncoding.EncodeToString(sum[:]))
	}
	sdkCRC := func(in *awss3.PutObjectInput) { in.ChecksumAlgorithm = types.ChecksumAlgorithmCrc32c }

	var variants []variant
	variants = append(variants,
		variant{name: "raw-sdk-signed", put: rawPut(false, nil)},
		variant{name: "raw-sdk-unsigned", put: rawPut(true, nil)},
		variant{name: "raw-sdk-unsigned-own-crc32c", put: rawPut(true, ownCRC)},
		variant{name: "raw-sdk-unsigned-sdk-crc32c", put: rawPut(true, sdkCRC)},
	)
	// The store in every mode; the object proxy (the production path) in
	// the mode bs3 used over http before the probe and the one it picks.
	type bs3Variant struct {
		mode     s3.PayloadMode
		viaProxy bool
		framing  string // "sealed" (encrypted volume) or "checksummed" (the default plaintext volume): the layer under the proxy
	}
	for _, bv := range []bs3Variant{
		{s3.PayloadSigned, false, ""}, {s3.PayloadUnsigned, false, ""}, {s3.PayloadCRC32C, false, ""}, {s3.PayloadMD5, false, ""}, {s3.PayloadAuto, false, ""},
		{s3.PayloadSigned, true, ""}, {s3.PayloadAuto, true, ""}, {s3.PayloadAuto, true, "sealed"}, {s3.PayloadAuto, true, "checksummed"},
	} {
		mode, viaProxy, framing := bv.mode, bv.viaProxy, bv.framing
		name := "bs3-store-" + string(mode)
		if viaProxy {
			name = "bs3-objproxy-" + string(mode)
		}
		if framing != "" {
			name += "-" + framing
		}
		var put func(ctx context.Context, name string) error
		variants = append(variants, variant{
			name: name,
			put:  func(ctx context.Context, name string) error { return put(ctx, name) },
			setup: func(b *testing.B) {
				o := srv.Options(b, srv.Bucket(b))
				o.PayloadChecksum = mode
				o.MaxConns = concurrency
				st := srv.StoreWith(b, o)
				_, err := st.ProbePayloadChecksum(context.Background(), "probe")
				if err != nil {
					b.Fatal(err)
				}
				put = func(ctx context.Context, name string) error { return st.Put(ctx, name, body, false) }
				var under store.Store = st
				switch framing {
				case "sealed":
					if under, err = sealed.New(st, bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 16)); err != nil {
						b.Fatal(err)
					}
				case "checksummed":
					if under, err = sealed.NewChecksummed(st, bytes.Repeat([]byte{2}, 16)); err != nil {
						b.Fatal(err)
					}
				}
				if viaProxy {
					p := objproxy.New(under, objproxy.Options{Uploaders: concurrency, Downloaders: 1, Logger: zerolog.Nop()})
					b.Cleanup(p.Close)
					put = func(ctx context.Context, name string) error {
						return p.Put(ctx, objproxy.High, name, body, false)
					}
				}
			},
		})
	}

	var results []uploadResult
	for _, v := range variants {
		b.Run(v.name, func(b *testing.B) {
			if v.setup != nil {
				v.setup(b)
			}
			ctx := context.Background()
			// One untimed PUT per connection first: connection set-up is
			// not what is measured.
			if _, err := parallel(concurrency, concurrency, func(_ int, i int64) error {
				return v.put(ctx, fmt.Sprintf("%s/warm/%d", v.name, i))
			}); err != nil {
				b.Fatal(err)
			}
			runtime.GC()
			var ms0, ms1 runtime.MemStats
			runtime.ReadMemStats(&ms0)
			cpu := startCPU()
			b.ResetTimer()
			d, err := parallel(concurrency, objects, func(_ int, i int64) error {
				return v.put(ctx, fmt.Sprintf("%s/%d", v.name, i%names))
			})
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			c := cpu.perGiB(objects * objSize)
			runtime.ReadMemStats(&ms1)
			r := uploadResult{
				name: v.name, mbps: mbps(objects*objSize, d), cpuPerGiB: c[0] + c[1],
				allocsPerOp: float64(ms1.Mallocs-ms0.Mallocs) / float64(objects),
				bytesPerOp:  float64(ms1.TotalAlloc-ms0.TotalAlloc) / float64(objects),
			}
			results = append(results, r)
			b.ReportMetric(r.mbps, "MB/s")
			b.ReportMetric(r.cpuPerGiB, "CPU-s/GiB")
			b.ReportMetric(r.allocsPerOp, "allocs/PUT")
		})
	}
	if len(results) == 0 {
		return
	}
	var rawSigned, rawUnsigned uploadResult
	for _, r := range results {
		switch r.name {
		case "raw-sdk-signed":
			rawSigned = r
		case "raw-sdk-unsigned":
			rawUnsigned = r
		}
	}
	fmt.Println()
	fmt.Printf("upload CPU (MinIO on loopback over http, %d x %d MiB PUTs at concurrency %d, %d CPUs; CPU = bs3 process user+sys)\n",
		objects, objSize/mib, concurrency, runtime.NumCPU())
	fmt.Printf("%-30s %9s %10s %13s %13s %11s %12s\n", "variant", "MB/s", "CPU-s/GiB", "CPU/raw-sign", "CPU/raw-unsg", "allocs/PUT", "KiB/PUT")
	for _, r := range results {
		fmt.Printf("%-30s %9.1f %10.3f %13s %13s %11.0f %12.1f\n", r.name, r.mbps, r.cpuPerGiB,
			ratio(r.cpuPerGiB, rawSigned.cpuPerGiB), ratio(r.cpuPerGiB, rawUnsigned.cpuPerGiB), r.allocsPerOp, r.bytesPerOp/kib)
	}
}

func ratio(a, b float64) string {
	if b <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", a/b)
}

type rawS3 struct {
	c      *awss3.Client
	bucket *string
}

// newRawClient is a plain aws-sdk-go-v2 client on bucket (created through
// the bs3 store, then left alone), tuned as far as the SDK allows without
// bs3's code: no retries, no 100-continue, connections for 16 uploaders,
// no default CRC32 (MinIO would verify it, but it is CPU the baseline
// should not spend).
func newRawClient(b *testing.B, srv *minio.Server, bucket string) rawS3 {
	srv.Store(b, bucket) // creates the bucket
	hc := awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) {
		tr.MaxIdleConnsPerHost = 64
		tr.WriteBufferSize, tr.ReadBufferSize = 64<<10, 64<<10
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg, err := config.LoadDefaultConfig(ctx,
		config.WithRegion(srv.Region),
		config.WithCredentialsProvider(credentials.NewStaticCredentialsProvider(srv.AccessKey, srv.SecretKey, "")),
		config.WithRetryer(func() aws.Retryer { return aws.NopRetryer{} }),
		config.WithHTTPClient(hc),
		config.WithRequestChecksumCalculation(aws.RequestChecksumCalculationWhenRequired),
		config.WithResponseChecksumValidation(aws.ResponseChecksumValidationWhenRequired),
	)
	if err != nil {
		b.Fatal(err)
	}
	c := awss3.NewFromConfig(cfg, func(o *awss3.Options) {
		o.BaseEndpoint = aws.String(srv.Endpoint)
		o.UsePathStyle = true
		o.ContinueHeaderThresholdBytes = -1
	})
	if !strings.HasPrefix(srv.Endpoint, "http://") {
		b.Fatalf("expected a plain http endpoint, got %s", srv.Endpoint)
	}
	return rawS3{c: c, bucket: aws.String(bucket)}
}
