package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/frontend/fuse"
	"github.com/bs3/bs3/internal/frontend/nbd"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// fioJob is one of the four jobs of the report.
type fioJob struct {
	name, rw string
	bs       string
}

var fioJobs = []fioJob{
	{"4k randwrite", "randwrite", "4k"},
	{"4k randread", "randread", "4k"},
	{"1m seq write", "write", "1m"},
	{"1m seq read", "read", "1m"},
}

// runFio runs one job for d and returns MB/s (reads and writes summed).
func runFio(b *testing.B, args []string, job fioJob, size int64, d time.Duration) float64 {
	b.Helper()
	all := append([]string{
		"--name=" + strings.ReplaceAll(job.name, " ", "-"), "--rw=" + job.rw, "--bs=" + job.bs,
		"--iodepth=32", fmt.Sprintf("--size=%d", size), "--time_based", fmt.Sprintf("--runtime=%d", int(d.Seconds())),
		"--output-format=json", "--randrepeat=0", "--verify_state_save=0",
	}, args...)
	cmd := exec.Command("fio", all...)
	cmd.Dir = b.TempDir()
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("fio %s: %v\n%s", job.name, err, out)
	}
	s := string(out)
	var res struct {
		Jobs []struct {
			Read struct {
				BW int64 `json:"bw_bytes"`
			} `json:"read"`
			Write struct {
				BW int64 `json:"bw_bytes"`
			} `json:"write"`
		} `json:"jobs"`
	}
	if i := strings.Index(s, "{"); i < 0 || json.Unmarshal([]byte(s[i:]), &res) != nil || len(res.Jobs) == 0 {
		b.Fatalf("fio %s: cannot parse output:\n%s", job.name, s)
	}
	return float64(res.Jobs[0].Read.BW+res.Jobs[0].Write.BW) / 1e6
}

func freePort(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// BenchmarkFio is the fio report of `make bench`: the four jobs against bs3
// on MinIO through NBD, against `nbdkit memory` (the NBD ceiling of this
// machine), and through FUSE + loop with libaio and direct I/O.
func BenchmarkFio(b *testing.B) {
	for _, tool := range []string{"fio", "nbdkit"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s is not installed (make deps)", tool)
		}
	}
	d := time.Duration(float64(30*time.Second) * scale())
	d = max(d, 5*time.Second)
	const size = 4 << 30
	results := map[string][]float64{}

	// nbdkit memory: the NBD ceiling.
	addr := freePort(b)
	_, port, _ := net.SplitHostPort(addr)
	kit := exec.Command("nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", port, "memory", fmt.Sprint(size))
	if err := kit.Start(); err != nil {
		b.Fatal(err)
	}
	defer kit.Process.Kill()
	time.Sleep(500 * time.Millisecond)
	for _, j := range fioJobs {
		results["nbdkit memory (NBD)"] = append(results["nbdkit memory (NBD)"],
			runFio(b, []string{"--ioengine=nbd", "--uri=nbd://" + addr + "/"}, j, size, d))
	}

	srv := minio.Start(b)
	e := enginetest.Open(b, srv.Store(b, srv.Bucket(b)), enginetest.Options{Size: size, BlockSize: 4096, Buffers: daemonBuffers()})
	s, err := nbd.New(e.Dev, nbd.Options{Listen: "127.0.0.1:0", Export: "bs3", Logger: zerolog.Nop()})
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve()
	for _, j := range fioJobs {
		results["bs3 on MinIO (NBD)"] = append(results["bs3 on MinIO (NBD)"],
			runFio(b, []string{"--ioengine=nbd", "--uri=" + s.URI()}, j, size, d))
	}
	s.Close()

	if os.Geteuid() == 0 {
		if _, err := os.Stat("/dev/fuse"); err == nil {
			m, err := fuse.Mount(e.Dev, fuse.Options{Mountpoint: filepath.Join(b.TempDir(), "mnt"), Loop: true, Logger: zerolog.Nop()})
			if err != nil {
				b.Fatal(err)
			}
			for _, j := range fioJobs {
				results["bs3 on MinIO (FUSE+loop, libaio direct)"] = append(results["bs3 on MinIO (FUSE+loop, libaio direct)"],
					runFio(b, []string{"--ioengine=libaio", "--direct=1", "--filename=" + m.LoopDevice()}, j, size, d))
			}
			if err := m.Close(); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := e.Dev.Drain(context.Background()); err != nil {
		b.Fatal(err)
	}

	fmt.Printf("\nfio, iodepth 32, %v per job, MB/s\n%-42s", d, "")
	for _, j := range fioJobs {
		fmt.Printf("%14s", j.name)
	}
	fmt.Println()
	for _, k := range []string{"nbdkit memory (NBD)", "bs3 on MinIO (NBD)", "bs3 on MinIO (FUSE+loop, libaio direct)"} {
		if r, ok := results[k]; ok {
			fmt.Printf("%-42s", k)
			for _, v := range r {
				fmt.Printf("%14.1f", v)
			}
			fmt.Println()
		}
	}
}
