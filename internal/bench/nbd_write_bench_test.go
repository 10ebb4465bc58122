package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/frontend/nbd"
	"github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// BenchmarkNBDWrite measures the write targets of the write-path issue
// through a real NBD client (fio --ioengine=nbd) beside raw MinIO 4 MiB
// PUTs at the uploaders' concurrency, in one run: 1 MiB sequential writes
// (2 GiB, iodepth 8, twice: the second pass is the steady state once the
// heap has grown) and 4 KiB random writes (512 MiB over 4 GiB, iodepth
// 32), each followed by a flush and a drain, so the time counts until
// every byte is stored. CPU is this process's (engine + NBD server), per
// GiB written by fio. With BS3_BENCH_PROFILE=dir it writes a CPU, block
// and mutex profile of each job there.
func BenchmarkNBDWrite(b *testing.B) {
	if _, err := exec.LookPath("fio"); err != nil {
		b.Skip("fio is not installed (make deps)")
	}
	ctx := context.Background()
	srv := minio.Start(b)
	// Both sides in the payload mode bs3 picks by its probe (CRC32C with
	// UNSIGNED-PAYLOAD on MinIO), as production runs.
	openStore := func() *s3.Store {
		st := srv.StoreWith(b, srv.Options(b, srv.Bucket(b)))
		if _, err := st.ProbePayloadChecksum(ctx, "payload-probe"); err != nil {
			b.Fatal(err)
		}
		return st
	}
	_, rawPut, rawCPU := rawPuts(b, ctx, openStore())

	const devSize = 4 * gib
	e := enginetest.Open(b, openStore(), enginetest.Options{Size: devSize, BlockSize: 4096, Buffers: daemonBuffers()})
	s, err := nbd.New(e.Dev, nbd.Options{Listen: "127.0.0.1:0", Export: "bs3", Logger: zerolog.Nop()})
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve()
	defer s.Close()

	run := func(b *testing.B, name string, n int64, args ...string) result {
		stop := startProfiles(b, os.Getenv("BS3_BENCH_PROFILE"), name)
		defer stop()
		cpu := startCPU()
		f0 := minflt()
		start := time.Now()
		fioNBDWrite(b, s.URI(), name, n, args...)
		if err := e.Dev.Drain(ctx); err != nil {
			b.Fatal(err)
		}
		faults := float64(minflt()-f0) / (float64(n) / gib)
		return result{name: name, mbps: mbps(n, time.Since(start)), rawMBps: rawPut, cpuPerGiB: cpu.perGiB(n), rawCPU: rawCPU, faultsPerGiB: faults}
	}
	seq := scaled(2*gib) / mib * mib
	rnd := scaled(512*mib) / mib * mib
	// Sub-benchmarks, so one job can run alone (-bench 'NBDWrite/rand').
	var results []result
	b.Run("seq", func(b *testing.B) {
		args := []string{"--rw=write", "--bs=1m", "--iodepth=8", fmt.Sprintf("--size=%d", seq)}
		results = append(results, run(b, "nbd-1m-seq-write-qd8", seq, args...))
		// Again over the same blocks: a fresh process's first GiBs pay
		// for the heap growing to hold the read cache (page faults on
		// first touch, costly on a VM), which a daemon pays once; this
		// pass is the CPU per GiB after that.
		results = append(results, run(b, "nbd-1m-seq-write-qd8-again", seq, args...))
	})
	var nbdkitMBps float64 // the same random job on nbdkit memory
	b.Run("rand", func(b *testing.B) {
		args := []string{"--rw=randwrite", "--bs=4k", "--iodepth=32", fmt.Sprintf("--size=%d", int64(devSize))}
		results = append(results, run(b, "nbd-4k-rand-write-qd32", rnd, args...))
		if _, err := exec.LookPath("nbdkit"); err == nil {
			nbdkitMBps = nbdkitWrite(b, devSize, "nbdkit-4k-rand-write-qd32", rnd, args...)
		}
	})
	// Raw PUTs again after the jobs: a fresh MinIO is often slower at
	// first, and the faster of the two runs is the stricter baseline.
	_, rawPut2, rawCPU2 := rawPuts(b, ctx, openStore())
	fmt.Printf("\nNBD writes through fio beside raw MinIO 4 MiB PUTs at c=%d (scale %.2f; MB/s until stored; raw before %.1f, after %.1f MB/s: the faster is the baseline)\n",
		uploaders, scale(), rawPut, rawPut2)
	for _, r := range results {
		if rawPut2 > r.rawMBps {
			r.rawMBps, r.rawCPU = rawPut2, rawCPU2
		}
		fmt.Println(r)
	}
	if nbdkitMBps > 0 {
		// For reference only, not a ceiling: bs3 often goes faster
		// (measured: 162 against 63 MB/s), so what limits this run is
		// on nbdkit's side, not the client's.
		fmt.Printf("%-44s %9.1f MB/s   (the same fio job on nbdkit memory, for reference: not the client's ceiling)\n", "nbdkit-4k-rand-write-qd32", nbdkitMBps)
	}
}

// fioNBDWrite runs a fio write job of n bytes with the nbd engine against
// uri, ending with an fsync, and checks that it wrote n bytes.
func fioNBDWrite(b *testing.B, uri, name string, n int64, args ...string) {
	b.Helper()
	all := append([]string{"--name=" + name, "--ioengine=nbd", "--uri=" + uri,
		"--output-format=json", "--randrepeat=0", "--end_fsync=1",
		fmt.Sprintf("--io_size=%d", n)}, args...)
	out, err := exec.Command("fio", all...).CombinedOutput()
	if err != nil {
		b.Fatalf("fio %s: %v\n%s", name, err, out)
	}
	var res struct {
		Jobs []struct {
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
		} `json:"jobs"`
	}
	js := out[max(0, bytes.IndexByte(out, '{')):] // fio may print a line before the JSON
	if err := json.Unmarshal(js, &res); err != nil || len(res.Jobs) != 1 {
		b.Fatalf("fio %s output: %v\n%s", name, err, out)
	}
	if got := res.Jobs[0].Write.IOBytes; got != n {
		b.Fatalf("fio %s wrote %d bytes, want %d", name, got, n)
	}
}

// nbdkitWrite runs the fio job on a fresh `nbdkit memory` export of size
// bytes and returns its MB/s.
func nbdkitWrite(b *testing.B, size int64, name string, n int64, args ...string) float64 {
	b.Helper()
	addr, stop := startNbdkitMemory(b, size)
	defer stop()
	start := time.Now()
	fioNBDWrite(b, "nbd://"+addr+"/", name, n, args...)
	return mbps(n, time.Since(start))
}
