package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// BenchmarkFUSEReadJobs runs bs3's side of BenchmarkVsS3backer alone (the
// fragmented sequential read from an empty cache and the two hot-set
// passes, through FUSE + loop), for quick turns on the read path. It
// prints what the Device saw: reads by size, how many arrived out of
// order (not where the previous read ended), and the cache and GET counts.
// With BS3_BENCH_PROFILE=dir it writes a CPU, block and mutex profile of
// each read job there (seqread.cpu, hot2.block, ...).
//
//	go test -run '^$' -bench FUSEReadJobs -benchtime 1x ./internal/bench/
func BenchmarkFUSEReadJobs(b *testing.B) {
	skipWithoutKernelPath(b)
	const bs = 4096
	fill := scaled(1*gib) / mib * mib
	over := scaled(256*mib) / mib * mib
	hot := min(int64(64*mib), fill)
	d := max(time.Duration(float64(20*time.Second)*scale()), 5*time.Second)
	profDir := os.Getenv("BS3_BENCH_PROFILE")
	srv := minio.Start(b)

	st := srv.Store(b, srv.Bucket(b))
	eo := enginetest.Options{Size: fill, BlockSize: bs, Cache: newReadCache(b), Buffers: daemonBuffers()}
	e := enginetest.Open(b, st, eo)
	m := mountBS3(b, e.Dev)
	t := directTarget(m.LoopDevice())
	fillRes := fioSeqFill(b, t, fill)
	overRes := fio(b, "rand-overwrite", append([]string{"--rw=randwrite", "--bs=4k", "--iodepth=32",
		fmt.Sprintf("--size=%d", fill), fmt.Sprintf("--io_size=%d", over)}, t...)...)
	if err := m.Close(); err != nil {
		b.Fatalf("unmount bs3: %v", err)
	}
	e.Close(b)
	eo.Cache = newReadCache(b)
	e = enginetest.Open(b, st, eo)
	td := &tracingDevice{Device: e.Dev}
	m = mountBS3(b, td)
	t = directTarget(m.LoopDevice())
	fmt.Printf("\nbs3 alone, FUSE + loop (%s), fio libaio --direct=1\n", loopQueue(m.LoopDevice()))
	fmt.Printf("fill %.1f MB/s, 4 KiB random overwrites %.0f IOPS\n", fillRes.MBps, overRes.IOPS)

	job := func(name string, run func() fioResult) {
		td.reset()
		s0, g0 := e.Cache.Stats(), e.Objs.Stats().Get.Attempts
		stop := startProfiles(b, profDir, name)
		r := run()
		stop()
		s1, g1 := e.Cache.Stats(), e.Objs.Stats().Get.Attempts
		fmt.Printf("%-8s %8.1f MB/s %9.0f IOPS | device: %s\n         cache: %s\n", name, r.MBps, r.IOPS, td.summary(), cacheDelta(s0, s1, g1-g0))
	}
	job("seqread", func() fioResult {
		return fio(b, "seq-read", append([]string{"--rw=read", "--bs=1m", "--iodepth=8", fmt.Sprintf("--size=%d", fill)}, t...)...)
	})
	job("hot1", func() fioResult { return fioHotRead(b, t, hot, d) })
	job("hot2", func() fioResult { return fioHotRead(b, t, hot, d) })
	if err := m.Close(); err != nil {
		b.Fatalf("unmount bs3: %v", err)
	}
}

// skipWithoutKernelPath skips a benchmark that needs FUSE, a loop device
// and fio when one of them is missing.
func skipWithoutKernelPath(b *testing.B) {
	b.Helper()
	if os.Geteuid() != 0 {
		b.Skip("needs root: FUSE mounts and loop devices")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		b.Skipf("no /dev/fuse (%v): load the fuse module", err)
	}
	for _, tool := range []string{"fio", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s is not installed (run scripts/deps.sh)", tool)
		}
	}
}

// loopQueue describes the request queue of a loop device as sysfs shows
// it: what the kernel may send to FUSE at once and in one piece.
func loopQueue(dev string) string {
	q := filepath.Join("/sys/block", filepath.Base(dev), "queue")
	var parts []string
	for _, f := range []string{"max_sectors_kb", "nr_requests", "read_ahead_kb"} {
		v, err := os.ReadFile(filepath.Join(q, f))
		if err != nil {
			continue
		}
		parts = append(parts, f+"="+strings.TrimSpace(string(v)))
	}
	return strings.Join(parts, " ")
}

// startProfiles starts a CPU profile and block and mutex profiling into
// dir (nothing when dir is empty); the returned function stops them and
// writes the files.
func startProfiles(b *testing.B, dir, name string) func() {
	if dir == "" {
		return func() {}
	}
	f, err := os.Create(filepath.Join(dir, name+".cpu"))
	if err != nil {
		b.Fatalf("profile: %v", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		b.Fatalf("profile: %v", err)
	}
	runtime.SetBlockProfileRate(10000) // one blocking event per 10 µs blocked
	runtime.SetMutexProfileFraction(10)
	// Allocations are cumulative: name.allocs0 is the base to subtract
	// (go tool pprof -base name.allocs0 name.allocs).
	writeProfile(b, "allocs", filepath.Join(dir, name+".allocs0"))
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			b.Errorf("profile: %v", err)
		}
		for _, p := range []string{"block", "mutex", "allocs"} {
			writeProfile(b, p, filepath.Join(dir, name+"."+p))
		}
		runtime.SetBlockProfileRate(0)
		runtime.SetMutexProfileFraction(0)
	}
}

// writeProfile writes the named runtime profile to path.
func writeProfile(b *testing.B, name, path string) {
	if name == "allocs" {
		runtime.GC() // the allocation profile is as of the last collection
	}
	f, err := os.Create(path)
	if err != nil {
		b.Fatalf("profile: %v", err)
	}
	if err := pprof.Lookup(name).WriteTo(f, 0); err != nil {
		b.Errorf("profile %s: %v", name, err)
	}
	if err := f.Close(); err != nil {
		b.Errorf("profile: %v", err)
	}
}

// tracingDevice counts the reads a frontend passes to the Device: by
// size, and how many do not start where the previous one to arrive ended.
type tracingDevice struct {
	frontend.Device
	mu       sync.Mutex
	sizes    map[int]int
	next     int64
	reads    int
	outOfSeq int
	inflight atomic.Int64
	maxIn    int64
}

func (d *tracingDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	n := d.inflight.Add(1)
	d.mu.Lock()
	if d.sizes == nil {
		d.sizes = make(map[int]int)
	}
	d.sizes[len(p)]++
	d.reads++
	if off != d.next {
		d.outOfSeq++
	}
	d.next = off + int64(len(p))
	d.maxIn = max(d.maxIn, n)
	d.mu.Unlock()
	err := d.Device.ReadAt(ctx, p, off)
	d.inflight.Add(-1)
	return err
}

func (d *tracingDevice) reset() {
	d.mu.Lock()
	d.sizes, d.reads, d.outOfSeq, d.maxIn = nil, 0, 0, 0
	d.mu.Unlock()
}

func (d *tracingDevice) summary() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var sz []int
	for s := range d.sizes {
		sz = append(sz, s)
	}
	sort.Ints(sz)
	var parts []string
	for _, s := range sz {
		parts = append(parts, fmt.Sprintf("%d KiB×%d", s>>10, d.sizes[s]))
	}
	return fmt.Sprintf("%d reads (%s), %d not where the previous ended, up to %d at once", d.reads, strings.Join(parts, " "), d.outOfSeq, d.maxIn)
}
