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
	"github.com/bs3/bs3/internal/null"
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
// GiB written by fio. The baseline writes as many bytes as the sequential
// job, and it and every job start from a dropped page cache
// (dropPageCache). The random job runs again on bs3's NBD server over a
// null device: what the client reaches with no engine and no store.
// bs3 writes through the daemon's default store stack unless
// BS3_BENCH_STACK=raw. With BS3_BENCH_PROFILE=dir it writes a CPU, block
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
	// MinIO's CPU is measured beside ours: on a small machine it shares
	// the cores, so what it spends per GiB bounds every client.
	minioCPU := func() float64 {
		c, err := srv.CPUSeconds()
		if err != nil {
			b.Fatal(err)
		}
		return c
	}
	// The baseline writes as many bytes as the sequential job: MinIO's
	// cost per GiB rises after the first GiB written (dropPageCache).
	seq := scaled(2*gib) / mib * mib
	rawRun := func() (float64, [2]float64, float64, float64) {
		dropPageCache(b)
		m0, t0 := minioCPU(), time.Now()
		n, mb, cpu := rawPuts(b, ctx, openStore(), seq)
		g := float64(n*4*mib) / gib
		m := (minioCPU() - m0) / g
		return mb, cpu, m, (cpu[0] + cpu[1] + m) * g / time.Since(t0).Seconds()
	}
	rawPut, rawCPU, rawMinio, rawBusy := rawRun()

	const devSize = 4 * gib
	// bs3 writes through the store stack of the daemon's default
	// configuration (checksummed objects under the compressed store,
	// codec none), as users run it; BS3_BENCH_STACK=raw writes straight
	// to the S3 store, to see what the stack costs.
	daemonStack := os.Getenv("BS3_BENCH_STACK") != "raw"
	e := enginetest.Open(b, openStore(), enginetest.Options{Size: devSize, BlockSize: 4096, Buffers: daemonBuffers(), DaemonStack: daemonStack})
	s, err := nbd.New(e.Dev, nbd.Options{Listen: nbdListen(b), Export: "bs3", Logger: zerolog.Nop()})
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve()
	defer s.Close()

	run := func(b *testing.B, name string, n int64, args ...string) result {
		dropPageCache(b)
		stop := startProfiles(b, os.Getenv("BS3_BENCH_PROFILE"), name)
		defer stop()
		cpu := startCPU()
		f0, m0 := minflt(), minioCPU()
		// How many uploads run at once, sampled: a job that keeps fewer
		// than the uploaders busy is not limited by the store.
		sampled := make(chan float64)
		done := make(chan struct{})
		go func() {
			var sum, k float64
			t := time.NewTicker(10 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-done:
					sampled <- sum / max(k, 1)
					return
				case <-t.C:
					up, _ := e.Objs.Pools()
					sum, k = sum+float64(up.Running), k+1
				}
			}
		}()
		start := time.Now()
		fioCPU := fioNBDWrite(b, s.URI(), name, n, args...)
		if err := e.Dev.Drain(ctx); err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		close(done)
		uploading := <-sampled
		g := float64(n) / gib
		r := result{name: name, mbps: mbps(n, d), rawMBps: rawPut, cpuPerGiB: cpu.perGiB(n), rawCPU: rawCPU,
			faultsPerGiB: float64(minflt()-f0) / g,
			side:         sideCPU{fio: fioCPU / g, minio: (minioCPU() - m0) / g, rawMinio: rawMinio, rawBusy: rawBusy}}
		r.side.busy = (r.cpuPerGiB[0] + r.cpuPerGiB[1] + r.side.fio + r.side.minio) * g / d.Seconds()
		r.side.uploading = uploading
		return r
	}
	rnd := scaled(512*mib) / mib * mib
	// Sub-benchmarks, so one job can run alone (-bench 'NBDWrite/rand').
	var results []result
	var nullSeqCPU [2]float64 // CPU-s/GiB of bs3's NBD server over a null device, sequential job
	b.Run("seq", func(b *testing.B) {
		args := []string{"--rw=write", "--bs=1m", "--iodepth=8", fmt.Sprintf("--size=%d", seq)}
		results = append(results, run(b, "nbd-1m-seq-write-qd8", seq, args...))
		// Again over the same blocks: a fresh process's first GiBs pay
		// for the heap growing to hold the read cache (page faults on
		// first touch, costly on a VM), which a daemon pays once; this
		// pass is the CPU per GiB after that.
		results = append(results, run(b, "nbd-1m-seq-write-qd8-again", seq, args...))
		// The same job on bs3's NBD server over a null device: the CPU
		// that receiving the payloads alone costs this process.
		_, nullSeqCPU = nullWrite(b, devSize, "null-1m-seq-write-qd8", seq, args...)
	})
	var nbdkitMBps, nullRandMBps float64 // the same random job on nbdkit memory, on bs3's server over a null device
	b.Run("rand", func(b *testing.B) {
		args := []string{"--rw=randwrite", "--bs=4k", "--iodepth=32", fmt.Sprintf("--size=%d", int64(devSize))}
		results = append(results, run(b, "nbd-4k-rand-write-qd32", rnd, args...))
		nullRandMBps, _ = nullWrite(b, devSize, "null-4k-rand-write-qd32", rnd, args...)
		if _, err := exec.LookPath("nbdkit"); err == nil {
			nbdkitMBps = nbdkitWrite(b, devSize, "nbdkit-4k-rand-write-qd32", rnd, args...)
		}
	})
	// Raw PUTs again after the jobs: MinIO's speed drifts within a run,
	// and the faster of the two runs is the stricter baseline.
	rawPut2, rawCPU2, rawMinio2, rawBusy2 := rawRun()
	stack := "the daemon's default store stack"
	if !daemonStack {
		stack = "the raw S3 store (BS3_BENCH_STACK=raw)"
	}
	fmt.Printf("\nNBD writes through fio beside raw MinIO 4 MiB PUTs at c=%d (scale %.2f; MB/s until stored; raw before %.1f, after %.1f MB/s: the faster is the baseline); bs3 over %s\n",
		uploaders, scale(), rawPut, rawPut2, stack)
	for _, r := range results {
		if rawPut2 > r.rawMBps {
			r.rawMBps, r.rawCPU, r.side.rawMinio, r.side.rawBusy = rawPut2, rawCPU2, rawMinio2, rawBusy2
		}
		fmt.Println(r)
		fmt.Println(r.side.String(r))
	}
	if nullSeqCPU[0]+nullSeqCPU[1] > 0 {
		// A floor for bs3's CPU per GiB written: it must receive the
		// payloads (the null server's cost) and send them to the store
		// (the raw client's cost, which skips the NBD side entirely).
		// What bs3 spends above their sum is the engine's own work.
		raw := rawCPU
		if rawPut2 > rawPut {
			raw = rawCPU2
		}
		floor := nullSeqCPU[0] + nullSeqCPU[1] + raw[0] + raw[1]
		fmt.Printf("%-44s CPU-s/GiB user %.2f sys %.2f: receiving the sequential job on bs3's NBD server over a null device; with the raw client's %.2f to send it, a floor of %.2f CPU-s/GiB for any bs3",
			"null-1m-seq-write-qd8", nullSeqCPU[0], nullSeqCPU[1], raw[0]+raw[1], floor)
		for _, r := range results {
			if r.name == "nbd-1m-seq-write-qd8-again" {
				fmt.Printf("; bs3 spent %.2f, %.2f above it", r.cpuPerGiB[0]+r.cpuPerGiB[1], r.cpuPerGiB[0]+r.cpuPerGiB[1]-floor)
			}
		}
		fmt.Println()
	}
	if nullRandMBps > 0 {
		// What the client and bs3's NBD server reach with nothing behind
		// them. Measured on this 2-core VM: 203-229 MB/s against a
		// `null = true` daemon with MinIO idle, 68-282 MB/s here after
		// the bs3 job (MinIO may still be writing back); two fio jobs of
		// iodepth 16 reached 295 MB/s. A ratio to raw PUTs above this
		// one's is out of this client's reach in this run.
		fmt.Printf("%-44s %9.1f MB/s   ratio %5.2f of raw: the same fio job on bs3's NBD server over a null device (no engine, no store); bs3 reached %.2f of it\n",
			"null-4k-rand-write-qd32", nullRandMBps, nullRandMBps/max(rawPut, rawPut2), randMBps(results)/nullRandMBps)
	}
	if nbdkitMBps > 0 {
		// For reference only, not a ceiling: bs3 often goes faster
		// (measured: 162 against 63 MB/s), so what limits this run is
		// on nbdkit's side, not the client's.
		fmt.Printf("%-44s %9.1f MB/s   (the same fio job on nbdkit memory, for reference: not the client's ceiling)\n", "nbdkit-4k-rand-write-qd32", nbdkitMBps)
	}
}

// fioNBDWrite runs a fio write job of n bytes with the nbd engine against
// uri, ending with an fsync, checks that it wrote n bytes and returns
// the CPU seconds fio used.
func fioNBDWrite(b *testing.B, uri, name string, n int64, args ...string) float64 {
	b.Helper()
	all := append([]string{"--name=" + name, "--ioengine=nbd", "--uri=" + uri,
		"--output-format=json", "--randrepeat=0", "--end_fsync=1",
		fmt.Sprintf("--io_size=%d", n)}, args...)
	cmd := exec.Command("fio", all...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("fio %s: %v\n%s", name, err, out)
	}
	fioCPU := (cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()).Seconds()
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
	return fioCPU
}

// nullWrite runs the fio job on bs3's NBD server over a null device of
// size bytes (writes discarded, no engine, no store) and returns its MB/s
// and this process's user and system CPU-s per GiB: what the client and
// the server alone reach, and what receiving the payloads costs.
func nullWrite(b *testing.B, size int64, name string, n int64, args ...string) (float64, [2]float64) {
	b.Helper()
	dropPageCache(b) // its sync also waits out MinIO's writeback of the job before
	s, err := nbd.New(null.New(size, 4096), nbd.Options{Listen: nbdListen(b), Export: "null", Logger: zerolog.Nop()})
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve()
	cpu, start := startCPU(), time.Now()
	fioNBDWrite(b, s.URI(), name, n, args...)
	d, c := time.Since(start), cpu.perGiB(n)
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	return mbps(n, d), c
}

// randMBps is the random write job's MB/s among results (0 if absent).
func randMBps(results []result) float64 {
	for _, r := range results {
		if r.name == "nbd-4k-rand-write-qd32" {
			return r.mbps
		}
	}
	return 0
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
