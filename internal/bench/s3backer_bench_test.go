package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/frontend"
	"github.com/bs3/bs3/internal/frontend/fuse"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// s3backerSide is what one system did in BenchmarkVsS3backer.
type s3backerSide struct {
	fill, overwrite, seqRead, hot1, hot2 fioResult
	// Until stored: the write jobs' rates counted until the system had
	// stored what they wrote (fill MB/s, overwrite IOPS).
	fillStored, overStored float64
}

// BenchmarkVsS3backer runs the read jobs of issue 9 on bs3 and on
// s3backer (1 MiB blocks, its default in-memory block cache) over the same
// MinIO, each through FUSE and a loop device with direct I/O, fio libaio
// with --direct=1:
//
//   - fragmented sequential read: fill the device (1 GiB) with 1 MiB
//     sequential writes, overwrite 256 MiB worth of random 4 KiB blocks,
//     restart with empty caches (bs3: a new engine with a new read cache;
//     s3backer: unmount, wait for its write-back, mount again), then read
//     it all once in 1 MiB reads at iodepth 8;
//   - hot set: 4 KiB random reads over the first 64 MiB, iodepth 32, twice;
//     the second pass is the one compared.
//
// The write jobs of the preparation are reported too, as fio's rates
// (acknowledged) and until stored: to the end of a wait until bs3 has
// uploaded what they wrote and s3backer's block cache is clean. BS3_BENCH_SCALE
// scales the fill, the overwrites and the duration of a hot-set pass (20 s
// at 1, at least 5 s). It needs root, /dev/fuse and s3backer (scripts/deps.sh).
//
//	go test -run '^$' -bench VsS3backer -benchtime 1x ./internal/bench/
func BenchmarkVsS3backer(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: FUSE mounts and loop devices")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		b.Skipf("no /dev/fuse (%v): load the fuse module", err)
	}
	for _, tool := range []string{"fio", "s3backer", "losetup", "fusermount"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s is not installed (run scripts/deps.sh)", tool)
		}
	}
	const bs = 4096
	// Whole MiB: s3backer's blocks, and a multiple of bs3's block size.
	fill := scaled(1*gib) / mib * mib
	over := scaled(256*mib) / mib * mib
	hot := min(int64(64*mib), fill)
	d := max(time.Duration(float64(20*time.Second)*scale()), 5*time.Second)
	srv := minio.Start(b)

	// Both sides run the same fio jobs on their loop device. fio's rates
	// count acknowledgements: each side then also waits (stored) until
	// what the job wrote is in the store, bs3 for its uploads, s3backer
	// for its write-back cache to be clean, and the job's rate until
	// stored is counted to the end of that wait.
	prepare := func(dev string, stored func()) (side s3backerSide) {
		t := directTarget(dev)
		start := time.Now()
		side.fill = fioSeqFill(b, t, fill)
		stored()
		side.fillStored = float64(fill) / 1e6 / time.Since(start).Seconds()
		start = time.Now()
		side.overwrite = fio(b, "rand-overwrite", append([]string{"--rw=randwrite", "--bs=4k", "--iodepth=32",
			fmt.Sprintf("--size=%d", fill), fmt.Sprintf("--io_size=%d", over)}, t...)...)
		stored()
		side.overStored = float64(over/bs) / time.Since(start).Seconds()
		return side
	}
	seqRead := func(dev string) fioResult {
		return fio(b, "seq-read", append([]string{"--rw=read", "--bs=1m", "--iodepth=8", fmt.Sprintf("--size=%d", fill)}, directTarget(dev)...)...)
	}

	// bs3 through FUSE + loop, default read cache.
	var b3 s3backerSide
	st := srv.Store(b, srv.Bucket(b))
	eo := enginetest.Options{Size: fill, BlockSize: bs, Cache: newReadCache(b), Buffers: daemonBuffers()}
	e := enginetest.Open(b, st, eo)
	m := mountBS3(b, e.Dev)
	b3 = prepare(m.LoopDevice(), func() {
		if err := e.Dev.Drain(context.Background()); err != nil {
			b.Fatalf("bs3: wait for the uploads: %v", err)
		}
	})
	if err := m.Close(); err != nil {
		b.Fatalf("unmount bs3: %v", err)
	}
	e.Close(b)
	eo.Cache = newReadCache(b) // the restart starts with an empty cache
	e = enginetest.Open(b, st, eo)
	m = mountBS3(b, e.Dev)
	s0, g0 := e.Cache.Stats(), e.Objs.Stats().Get.Attempts
	b3.seqRead = seqRead(m.LoopDevice())
	s1, g1 := e.Cache.Stats(), e.Objs.Stats().Get.Attempts
	b3.hot1 = fioHotRead(b, directTarget(m.LoopDevice()), hot, d)
	s2, g2 := e.Cache.Stats(), e.Objs.Stats().Get.Attempts
	b3.hot2 = fioHotRead(b, directTarget(m.LoopDevice()), hot, d)
	s3, g3 := e.Cache.Stats(), e.Objs.Stats().Get.Attempts
	if err := m.Close(); err != nil {
		b.Fatalf("unmount bs3: %v", err)
	}
	e.Close(b)

	// s3backer in its own bucket of the same MinIO.
	var sb s3backerSide
	bucket := srv.Bucket(b)
	srv.Store(b, bucket) // creates the bucket: s3backer does not
	sm := mountS3backer(b, srv, bucket, fill)
	sb = prepare(sm.loop, func() { sm.waitClean(b) })
	if err := sm.Close(); err != nil { // waits for its write-back
		b.Fatal(err)
	}
	sm = mountS3backer(b, srv, bucket, fill) // an empty block cache
	sb.seqRead = seqRead(sm.loop)
	sb.hot1 = fioHotRead(b, directTarget(sm.loop), hot, d)
	sb.hot2 = fioHotRead(b, directTarget(sm.loop), hot, d)
	sbStats := sm.stats()
	if err := sm.Close(); err != nil {
		b.Fatal(err)
	}

	// Printed rather than logged: a benchmark's log is cut at 10 lines.
	fmt.Printf("\nbs3 vs s3backer (1 MiB blocks), FUSE + loop with direct I/O, fio libaio --direct=1, same MinIO\n")
	fmt.Printf("%-50s %12s %12s %8s\n", "", "bs3", "s3backer", "ratio")
	row := func(name, unit string, x, y float64) {
		fmt.Printf("%-50s %12.1f %12.1f %8.2f\n", name+" ("+unit+")", x, y, x/y)
	}
	row(fmt.Sprintf("fill, 1 MiB seq writes, %d MiB", fill>>20), "MB/s", b3.fill.MBps, sb.fill.MBps)
	row("  until stored", "MB/s", b3.fillStored, sb.fillStored)
	row(fmt.Sprintf("4 KiB random overwrites, %d MiB", over>>20), "IOPS", b3.overwrite.IOPS, sb.overwrite.IOPS)
	row("  until stored", "IOPS", b3.overStored, sb.overStored)
	row("fragmented seq read, 1 MiB, qd 8, cold", "MB/s", b3.seqRead.MBps, sb.seqRead.MBps)
	row(fmt.Sprintf("hot set %d MiB, 4 KiB rand, qd 32, pass 1", hot>>20), "IOPS", b3.hot1.IOPS, sb.hot1.IOPS)
	row(fmt.Sprintf("hot set %d MiB, 4 KiB rand, qd 32, pass 2", hot>>20), "IOPS", b3.hot2.IOPS, sb.hot2.IOPS)
	fmt.Printf("bs3 cache, fragmented read: %s; readahead %d GETs, %d hits\n", cacheDelta(s0, s1, g1-g0), s1.RAFetches-s0.RAFetches, s1.RAHits-s0.RAHits)
	fmt.Printf("bs3 cache, hot set pass 1:  %s\n", cacheDelta(s1, s2, g2-g1))
	fmt.Printf("bs3 cache, hot set pass 2:  %s\n", cacheDelta(s2, s3, g3-g2))
	if sbStats != "" {
		fmt.Printf("s3backer stats after the read jobs:\n%s\n", sbStats)
	}
	b.ReportMetric(b3.seqRead.MBps/sb.seqRead.MBps, "seqread-bs3/s3backer")
	b.ReportMetric(b3.hot2.IOPS/sb.hot2.IOPS, "hotset-bs3/s3backer")
}

// directTarget is fio's target for a block device: libaio, O_DIRECT.
func directTarget(dev string) []string {
	return []string{"--ioengine=libaio", "--direct=1", "--filename=" + dev}
}

// mountBS3 serves dev (an engine's chunker) through FUSE with a loop device, as `frontend = "fuse"`
// with `[fuse] loop = true` does; the mount is closed at the end of the
// benchmark unless the caller closed it first.
func mountBS3(b *testing.B, dev frontend.Device) *fuse.Mounted {
	b.Helper()
	m, err := fuse.Mount(dev, fuse.Options{Mountpoint: filepath.Join(b.TempDir(), "mnt"), Loop: true, Logger: zerolog.Nop()})
	if err != nil {
		b.Fatalf("mount bs3: %v", err)
	}
	b.Cleanup(func() {
		if err := m.Close(); err != nil {
			b.Errorf("unmount bs3: %v", err)
		}
	})
	return m
}

// s3backerMount is one s3backer process (in the foreground, so that its
// exit, after the write-back of its dirty blocks, can be waited for) and
// the loop device over its file.
type s3backerMount struct {
	dir     string // the FUSE mountpoint
	loop    string // /dev/loopN, "" once detached
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error // set before exited is closed
}

// mountS3backer mounts bucket of srv with s3backer (1 MiB blocks, size
// bytes), waits for its file and attaches a loop device with direct I/O
// and 4 KiB sectors to it. Cleanup unmounts it and detaches the loop
// device even when the benchmark fails.
func mountS3backer(b *testing.B, srv *minio.Server, bucket string, size int64) *s3backerMount {
	b.Helper()
	tmp := b.TempDir()
	// Credentials in a 0600 file rather than in the command line, which
	// every local user can read in /proc.
	access := filepath.Join(tmp, "access")
	if err := os.WriteFile(access, []byte(srv.AccessKey+":"+srv.SecretKey+"\n"), 0o600); err != nil {
		b.Fatalf("write s3backer access file: %v", err)
	}
	s := &s3backerMount{dir: filepath.Join(tmp, "mnt"), logPath: filepath.Join(tmp, "s3backer.log"), exited: make(chan struct{})}
	if err := os.Mkdir(s.dir, 0o755); err != nil {
		b.Fatalf("create s3backer mountpoint: %v", err)
	}
	logf, err := os.Create(s.logPath)
	if err != nil {
		b.Fatalf("create s3backer log: %v", err)
	}
	s.cmd = exec.Command("s3backer", "-f",
		// Path-style requests: no --vhost, and no --region, which implies
		// it (s3backer signs for us-east-1, MinIO's region, by default).
		"--baseURL="+srv.Endpoint+"/",
		"--accessFile="+access,
		"--blockSize=1m",
		fmt.Sprintf("--size=%d", size),
		"--listBlocks", // blocks never written read as zeros without a GET
		bucket, s.dir)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	// If the benchmark binary dies, SIGTERM makes s3backer unmount itself.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := s.cmd.Start(); err != nil {
		logf.Close()
		b.Fatalf("start s3backer: %v", err)
	}
	go func() {
		s.waitErr = s.cmd.Wait()
		logf.Close()
		close(s.exited)
	}()
	b.Cleanup(func() {
		if err := s.Close(); err != nil {
			b.Error(err)
		}
	})

	file := filepath.Join(s.dir, "file")
	deadline := time.Now().Add(60 * time.Second)
	for {
		if fi, err := os.Stat(file); err == nil && fi.Size() == size {
			break
		}
		select {
		case <-s.exited:
			b.Fatalf("s3backer exited before mounting (%v):\n%s", s.waitErr, s.log())
		default:
		}
		if time.Now().After(deadline) {
			b.Fatalf("s3backer: %s not there after 60 s:\n%s", file, s.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	var stderr strings.Builder
	lo := exec.Command("losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096", file)
	lo.Stderr = &stderr
	out, err := lo.Output()
	if err != nil {
		b.Fatalf("attach a loop device to %s: %v: %s", file, err, stderr.String())
	}
	s.loop = strings.TrimSpace(string(out))
	if !strings.HasPrefix(s.loop, "/dev/loop") {
		b.Fatalf("losetup printed %q, not a loop device", s.loop)
	}
	if dio, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(s.loop), "loop", "dio")); err != nil || strings.TrimSpace(string(dio)) != "1" {
		b.Logf("s3backer: loop device %s does not use direct I/O (%q, %v): its reads go through the page cache", s.loop, dio, err)
	}
	return s
}

// stats is the part of s3backer's statistics file that explains its
// reads: GETs, their mean time, and its block cache hits and misses.
func (s *s3backerMount) stats() string {
	st, err := os.ReadFile(filepath.Join(s.dir, "stats"))
	if err != nil {
		return ""
	}
	var keep []string
	for _, line := range strings.Split(string(st), "\n") {
		for _, k := range []string{"http_gets", "http_avg_get_time", "block_cache_read_hits", "block_cache_read_misses"} {
			if strings.HasPrefix(line, k+" ") {
				keep = append(keep, "  "+line)
			}
		}
	}
	return strings.Join(keep, "\n")
}

// waitClean waits until s3backer's block cache holds no dirty block
// (its statistics file's block_cache_dirty_ratio is 0): what was written
// is in the store.
func (s *s3backerMount) waitClean(b *testing.B) {
	b.Helper()
	deadline := time.Now().Add(10 * time.Minute)
	for {
		st, err := os.ReadFile(filepath.Join(s.dir, "stats"))
		if err != nil {
			b.Fatalf("s3backer statistics: %v", err)
		}
		ratio, found := -1.0, false
		for _, line := range strings.Split(string(st), "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == "block_cache_dirty_ratio" {
				if ratio, err = strconv.ParseFloat(f[1], 64); err != nil {
					b.Fatalf("s3backer statistics: %q: %v", line, err)
				}
				found = true
			}
		}
		if !found {
			b.Fatalf("s3backer statistics have no block_cache_dirty_ratio:\n%s", st)
		}
		if ratio == 0 {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("s3backer still has dirty blocks (ratio %v) after 10 minutes", ratio)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *s3backerMount) log() string {
	l, err := os.ReadFile(s.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	return string(l)
}

// Close detaches the loop device, unmounts and waits until s3backer has
// written back its dirty blocks and exited (fusermount returns before
// that; see BUGS in s3backer(1)). It may be called again.
func (s *s3backerMount) Close() error {
	if s.loop != "" {
		var err error
		for range 20 { // the loop device may be busy for a moment after fio
			if err = run("losetup", "--detach", s.loop); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			// Unmounting under an attached loop device cannot work.
			return fmt.Errorf("s3backer at %s left mounted: %w", s.dir, err)
		}
		s.loop = ""
	}
	select {
	case <-s.exited:
		return nil
	default:
	}
	var errs []error
	// After an unmount s3backer writes back what is dirty, which may take
	// a while; if the unmount failed (it never mounted), there is nothing
	// to wait for.
	wait := 5 * time.Minute
	if err := run("fusermount", "-u", s.dir); err != nil {
		errs = append(errs, fmt.Errorf("unmount s3backer: %w", err))
		wait = 5 * time.Second
	}
	select {
	case <-s.exited:
		if s.waitErr != nil {
			errs = append(errs, fmt.Errorf("s3backer exited with %v:\n%s", s.waitErr, s.log()))
		}
		return errors.Join(errs...)
	case <-time.After(wait):
	}
	// Stuck: stop it (SIGTERM lets libfuse unmount), and leave no mount behind.
	errs = append(errs, fmt.Errorf("s3backer still running %v after the unmount; stopped:\n%s", wait, s.log()))
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		errs = append(errs, fmt.Errorf("stop s3backer: %w", err))
	}
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		if err := s.cmd.Process.Kill(); err != nil {
			errs = append(errs, fmt.Errorf("kill s3backer: %w", err))
		}
		<-s.exited
	}
	if mounted(s.dir) {
		if err := run("umount", "-l", s.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// mounted reports whether something is mounted on dir.
func mounted(dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return true // cannot tell: try to unmount
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// run runs a command and returns an error with its output if it fails.
func run(name string, args ...string) error {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
