package fuse

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/bs3/bs3/internal/frontend"
)

var blockSizes = []int64{512, 4096}

// requireFUSE skips the test unless this process can mount FUSE file
// systems and run the given tools.
func requireFUSE(t *testing.T, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: FUSE and loop device tests need root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("skipping: /dev/fuse is not available (%v); load the fuse module", err)
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("skipping: %s is not on PATH (Debian packages util-linux, e2fsprogs, mount)", tool)
		}
	}
}

func testLogger(t *testing.T) zerolog.Logger {
	return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel)
}

// mountForTest mounts dev and makes sure, even if the test fails, that the
// mount and its loop device are gone afterwards.
func mountForTest(t *testing.T, dev frontend.Device, loop bool) *Mounted {
	t.Helper()
	m, err := Mount(dev, Options{Mountpoint: filepath.Join(t.TempDir(), "mnt"), Loop: loop, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("cleanup: Close: %v", err)
		}
	})
	return m
}

// closeAndCheck closes m twice (Close is idempotent) and checks that
// neither the mount nor the loop device is left.
func closeAndCheck(t *testing.T, m *Mounted) {
	t.Helper()
	loopDev := m.LoopDevice()
	for i := range 2 {
		if err := m.Close(); err != nil {
			t.Fatalf("Close #%d: %v", i+1, err)
		}
	}
	if isMounted(t, filepath.Dir(m.FilePath())) {
		t.Fatalf("%s is still mounted after Close", filepath.Dir(m.FilePath()))
	}
	out, err := exec.Command("losetup", "-a").CombinedOutput()
	if err != nil {
		t.Fatalf("losetup -a: %v: %s", err, out)
	}
	if strings.Contains(string(out), m.FilePath()) {
		t.Fatalf("a loop device still refers to %s after Close:\n%s", m.FilePath(), out)
	}
	if loopDev != "" && loopBackingFile(loopDev) != "" {
		t.Fatalf("%s is still attached after Close", loopDev)
	}
}

// isMounted reports whether dir is a mount point in /proc/mounts.
func isMounted(t *testing.T, dir string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatalf("read /proc/mounts: %v", err)
	}
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// mountExt4 mounts the ext4 file system on dev at a new directory and
// unmounts it at cleanup if the test has not.
func mountExt4(t *testing.T, dev string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ext4")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", "-t", "ext4", dev, dir)
	t.Cleanup(func() {
		if isMounted(t, dir) {
			if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
				t.Errorf("cleanup: umount %s: %v: %s", dir, err, out)
			}
		}
	})
	return dir
}

func TestKernelPath(t *testing.T) {
	requireFUSE(t, "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount", "cp", "sync")
	for _, bs := range blockSizes {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			dev := newTestDevice(t, 128<<20, bs).(*memDevice)
			runKernelPath(t, dev, dev.reopen)
			// mkfs discards the whole device and ext4 flushes its
			// journal: both must have reached the first Device through
			// the loop device.
			t.Logf("first device: %d writes (%d FUA), %d flushes, %d discards, %d write-zeroes",
				dev.writes.Load(), dev.fuaWrites.Load(), dev.flushes.Load(), dev.discards.Load(), dev.writeZeroes.Load())
			if dev.discards.Load() == 0 {
				t.Error("no discard reached the device")
			}
			if dev.flushes.Load() == 0 {
				t.Error("no flush reached the device")
			}
		})
	}
}

// runKernelPath puts ext4 on the device through FUSE and a loop device,
// copies a tree of files onto it, detaches everything, serves the content
// again from restart() (a new Device over what dev stored; nil reuses dev)
// and checks that fsck finds the file system clean and every file intact.
func runKernelPath(t *testing.T, dev frontend.Device, restart func() frontend.Device) {
	t.Helper()
	requireFUSE(t, "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount", "cp", "sync")

	m := mountForTest(t, dev, true)
	loopDev := m.LoopDevice()
	if !strings.HasPrefix(loopDev, "/dev/loop") {
		t.Fatalf("LoopDevice() = %q, want /dev/loopN", loopDev)
	}
	if got := loopBackingFile(loopDev); got != m.FilePath() {
		t.Fatalf("%s backs onto %q, want %q", loopDev, got, m.FilePath())
	}
	direct, err := loopDirectIO(loopDev)
	if err != nil {
		t.Fatalf("read direct I/O state of %s: %v", loopDev, err)
	}
	t.Logf("%s: direct I/O %t", loopDev, direct)
	if os.Getenv("BS3_FUSE_ALLOW_BUFFERED_LOOP") == "" && !direct {
		t.Fatalf("%s does not use direct I/O (set BS3_FUSE_ALLOW_BUFFERED_LOOP=1 on kernels that refuse it)", loopDev)
	}
	if got := blockDevSize(t, loopDev, "--getss"); got != dev.BlockSize() {
		t.Fatalf("%s logical sector size = %d, want %d", loopDev, got, dev.BlockSize())
	}
	if got := blockDevSize(t, loopDev, "--getsize64"); got != dev.Size() {
		t.Fatalf("%s size = %d, want %d", loopDev, got, dev.Size())
	}

	run(t, "mkfs.ext4", "-q", loopDev)
	fsDir := mountExt4(t, loopDev)
	src := t.TempDir()
	sums := makeTree(t, src, 50)
	run(t, "cp", "-a", src+"/.", fsDir)
	run(t, "sync")
	run(t, "umount", fsDir)
	closeAndCheck(t, m)

	if restart != nil {
		dev = restart()
	}
	m = mountForTest(t, dev, true)
	run(t, "fsck.ext4", "-fn", m.LoopDevice())
	fsDir = mountExt4(t, m.LoopDevice())
	checkTree(t, fsDir, sums)
	run(t, "umount", fsDir)
	closeAndCheck(t, m)
}

func blockDevSize(t *testing.T, dev, flag string) int64 {
	t.Helper()
	out, err := exec.Command("blockdev", flag, dev).Output()
	if err != nil {
		t.Fatalf("blockdev %s %s: %v", flag, dev, err)
	}
	var n int64
	if _, err := fmt.Sscan(string(out), &n); err != nil {
		t.Fatalf("blockdev %s %s printed %q", flag, dev, out)
	}
	return n
}

// makeTree writes n files of random content in nested directories under
// dir and returns their SHA-256 sums by relative path. Sizes are spread
// log-uniformly over 1 B – 4 MiB (both ends always present), so there are
// many small files and a few large ones.
func makeTree(t *testing.T, dir string, n int) map[string][32]byte {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	t.Logf("tree seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 2))
	sums := make(map[string][32]byte, n)
	for i := range n {
		var size int64
		switch i {
		case 0:
			size = 1
		case 1:
			size = 4 << 20
		default:
			size = int64(math.Exp(rng.Float64() * math.Log(4<<20)))
		}
		rel := filepath.Join(fmt.Sprintf("d%d", i%5), fmt.Sprintf("e%d", i%3), fmt.Sprintf("f%02d", i))
		p := make([]byte, size)
		fillRandom(rng, p)
		path := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, p, 0o644); err != nil {
			t.Fatal(err)
		}
		sums[rel] = sha256.Sum256(p)
	}
	return sums
}

// checkTree checks that dir holds exactly the files in sums with the same
// content (lost+found aside).
func checkTree(t *testing.T, dir string, sums map[string][32]byte) {
	t.Helper()
	seen := 0
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		if d.IsDir() {
			if rel == "lost+found" {
				return filepath.SkipDir
			}
			return nil
		}
		want, ok := sums[rel]
		if !ok {
			return fmt.Errorf("unexpected file %s", rel)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if sha256.Sum256(b) != want {
			return fmt.Errorf("%s: content differs (%d bytes)", rel, len(b))
		}
		seen++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(sums) {
		t.Fatalf("found %d files, want %d", seen, len(sums))
	}
}

// TestFileIO drives the FUSE file directly (no loop device) with unaligned
// requests and checks it against a reference copy and the device itself.
func TestFileIO(t *testing.T) {
	requireFUSE(t, "losetup")
	for _, bs := range blockSizes {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			const size = 8 << 20
			dev := newTestDevice(t, size, bs).(*memDevice)
			m := mountForTest(t, dev, false)
			if m.LoopDevice() != "" {
				t.Fatalf("LoopDevice() = %q without Loop", m.LoopDevice())
			}

			var st syscall.Stat_t
			if err := syscall.Stat(m.FilePath(), &st); err != nil {
				t.Fatal(err)
			}
			if st.Size != size || st.Mode != syscall.S_IFREG|0o600 || st.Uid != 0 || st.Gid != 0 {
				t.Fatalf("stat: size %d mode %o uid %d gid %d; want %d, %o, 0, 0", st.Size, st.Mode, st.Uid, st.Gid, size, syscall.S_IFREG|0o600)
			}
			entries, err := os.ReadDir(filepath.Dir(m.FilePath()))
			if err != nil || len(entries) != 1 || entries[0].Name() != DefaultFileName {
				t.Fatalf("mountpoint lists %v, %v; want just %q", entries, err, DefaultFileName)
			}

			f, err := os.OpenFile(m.FilePath(), os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			ref := make([]byte, size)
			rng := rand.New(rand.NewPCG(uint64(bs), 3))

			t.Run("unaligned", func(t *testing.T) {
				for i := range 300 {
					off := rng.Int64N(size)
					n := 1 + rng.Int64N(3*bs)
					if i%20 == 0 {
						n = 1 + rng.Int64N(1<<20)
					}
					want := min(n, size-off)
					p := make([]byte, n)
					if rng.IntN(2) == 0 {
						fillRandom(rng, p)
						// One pwrite(2): os.File.WriteAt would retry the
						// rest past the end and drop the count.
						got, err := unix.Pwrite(int(f.Fd()), p, off)
						if int64(got) != want || err != nil {
							t.Fatalf("pwrite(%d bytes at %d) = %d, %v; want %d", n, off, got, err, want)
						}
						copy(ref[off:], p[:want])
					} else {
						got, err := unix.Pread(int(f.Fd()), p, off)
						if int64(got) != want || err != nil {
							t.Fatalf("pread(%d bytes at %d) = %d, %v; want %d", n, off, got, err, want)
						}
						if !bytes.Equal(p[:got], ref[off:off+want]) {
							t.Fatalf("pread(%d bytes at %d) returned wrong data", n, off)
						}
					}
				}
				if !bytes.Equal(dev.snapshot(), ref) {
					t.Fatal("device content differs from the reference after unaligned I/O")
				}
			})

			t.Run("concurrent-rmw", func(t *testing.T) {
				// Eight writers own interleaved 3-byte pieces of the same
				// few blocks; a read-modify-write that is not serialised
				// against its neighbours loses their bytes.
				const writers, piece = 8, 3
				dev.slowReads.Store(true)
				defer dev.slowReads.Store(false)
				region := 2 * bs
				base := bs + 1
				var wg sync.WaitGroup
				errs := make(chan error, writers)
				for g := range writers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						val := bytes.Repeat([]byte{byte(0xa0 + g)}, piece)
						for off := int64(g * piece); off+piece <= region; off += writers * piece {
							if _, err := f.WriteAt(val, base+off); err != nil {
								errs <- err
								return
							}
						}
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Fatal(err)
				}
				// Every piece-sized slot that fits belongs to writer
				// (slot index mod writers).
				for off := int64(0); off+piece <= region; off += piece {
					g := (off / piece) % writers
					copy(ref[base+off:], bytes.Repeat([]byte{byte(0xa0 + g)}, piece))
				}
				if got := dev.snapshot(); !bytes.Equal(got, ref) {
					i := firstDiff(got, ref)
					t.Fatalf("byte %d = %#x, want %#x (lost update)", i, got[i], ref[i])
				}
			})

			t.Run("end-of-device", func(t *testing.T) {
				if _, err := f.WriteAt([]byte{1}, size); !errors.Is(err, syscall.ENOSPC) {
					t.Fatalf("pwrite at the end: %v; want ENOSPC", err)
				}
				if _, err := f.WriteAt([]byte{1}, size+bs); !errors.Is(err, syscall.ENOSPC) {
					t.Fatalf("pwrite past the end: %v; want ENOSPC", err)
				}
				p := bytes.Repeat([]byte{0x5c}, 100)
				if n, err := unix.Pwrite(int(f.Fd()), p, size-40); n != 40 || err != nil {
					t.Fatalf("pwrite across the end = %d, %v; want 40, nil", n, err)
				}
				copy(ref[size-40:], p)
				if n, err := unix.Pread(int(f.Fd()), make([]byte, 10), size); n != 0 || err != nil {
					t.Fatalf("pread at the end = %d, %v; want 0, nil", n, err)
				}
				if err := f.Truncate(size - bs); err == nil {
					t.Fatal("shrinking truncate succeeded")
				}
				if err := f.Truncate(size + bs); err == nil {
					t.Fatal("growing truncate succeeded")
				}
				if err := f.Truncate(size); err != nil {
					t.Fatalf("truncate to the current size: %v", err)
				}
				if err := os.Chmod(m.FilePath(), 0o644); err == nil {
					t.Fatal("chmod succeeded")
				}
				fi, err := f.Stat()
				if err != nil || fi.Size() != size {
					t.Fatalf("size after writes past the end: %v, %v; want %d", fi.Size(), err, size)
				}
				if _, err := os.OpenFile(m.FilePath(), os.O_RDWR|os.O_TRUNC, 0); err == nil {
					t.Fatal("open with O_TRUNC succeeded")
				}
				if err := os.WriteFile(filepath.Join(filepath.Dir(m.FilePath()), "other"), nil, 0o600); err == nil {
					t.Fatal("creating a second file succeeded")
				}
				if !bytes.Equal(dev.snapshot(), ref) {
					t.Fatal("device content differs from the reference")
				}
			})

			t.Run("fallocate", func(t *testing.T) {
				fd := int(f.Fd())
				off, n := 3*bs+17, 5*bs+100 // unaligned both ends
				discards := dev.discards.Load()
				if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
					t.Fatalf("punch hole: %v", err)
				}
				clear(ref[off : off+n])
				if dev.discards.Load() == discards {
					t.Fatal("punch hole did not discard on the device")
				}
				got := make([]byte, n+2*bs)
				if _, err := f.ReadAt(got, off-bs); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, ref[off-bs:off+n+bs]) {
					t.Fatal("punched range does not read as zeros, or its neighbours changed")
				}

				off, n = 20*bs+5, 2*bs
				fill := bytes.Repeat([]byte{0xee}, int(n))
				if _, err := f.WriteAt(fill, off); err != nil {
					t.Fatal(err)
				}
				writeZeroes := dev.writeZeroes.Load()
				if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
					t.Fatalf("zero range: %v", err)
				}
				clear(ref[off : off+n])
				if dev.writeZeroes.Load() == writeZeroes {
					t.Fatal("zero range did not write zeroes on the device")
				}
				if err := unix.Fallocate(fd, unix.FALLOC_FL_COLLAPSE_RANGE, 0, bs); !errors.Is(err, unix.EOPNOTSUPP) {
					t.Fatalf("collapse range: %v; want EOPNOTSUPP", err)
				}
				if err := unix.Fallocate(fd, 0, size-bs, 2*bs); err == nil {
					t.Fatal("fallocate growing the file succeeded")
				}
				if !bytes.Equal(dev.snapshot(), ref) {
					t.Fatal("device content differs from the reference after fallocate")
				}
			})

			t.Run("flush-and-fua", func(t *testing.T) {
				flushes := dev.flushes.Load()
				if err := f.Sync(); err != nil {
					t.Fatal(err)
				}
				if err := unix.Fdatasync(int(f.Fd())); err != nil {
					t.Fatal(err)
				}
				if got := dev.flushes.Load() - flushes; got < 2 {
					t.Fatalf("fsync+fdatasync flushed the device %d times, want 2", got)
				}

				fua := dev.fuaWrites.Load()
				if _, err := f.WriteAt(make([]byte, bs), 0); err != nil {
					t.Fatal(err)
				}
				if dev.fuaWrites.Load() != fua {
					t.Fatal("a plain write was sent with FUA")
				}
				if _, err := unix.Pwritev2(int(f.Fd()), [][]byte{make([]byte, bs)}, bs, unix.RWF_DSYNC); err != nil {
					t.Fatalf("pwritev2(RWF_DSYNC): %v", err)
				}
				if dev.fuaWrites.Load() != fua+1 {
					t.Fatal("an RWF_DSYNC write was not sent with FUA")
				}
				g, err := os.OpenFile(m.FilePath(), os.O_RDWR|os.O_SYNC, 0)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := g.WriteAt(make([]byte, 10), 2*bs+3); err != nil {
					t.Fatal(err)
				}
				if dev.fuaWrites.Load() != fua+2 {
					t.Fatal("a write through an O_SYNC descriptor was not sent with FUA")
				}
				clear(ref[:2*bs])
				clear(ref[2*bs+3 : 2*bs+13])
				flushes = dev.flushes.Load()
				if err := g.Close(); err != nil {
					t.Fatal(err)
				}
				if dev.flushes.Load() == flushes {
					t.Fatal("closing a descriptor that wrote did not flush the device")
				}
			})

			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(dev.snapshot(), ref) {
				t.Fatal("device content differs from the reference")
			}
			closeAndCheck(t, m)
			if _, err := os.Stat(m.FilePath()); err == nil {
				t.Fatal("the file is still there after Close")
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestWaitAfterExternalUnmount checks that Wait returns when the file
// system is unmounted from outside and that Close still succeeds.
func TestWaitAfterExternalUnmount(t *testing.T) {
	requireFUSE(t, "umount", "losetup")
	m := mountForTest(t, newTestDevice(t, 1<<20, 4096), false)
	done := make(chan struct{})
	go func() {
		m.Wait()
		close(done)
	}()
	run(t, "umount", filepath.Dir(m.FilePath()))
	select {
	case <-done:
	case <-time.After(time.Minute): // a hang guard, not a timing check
		t.Fatal("Wait did not return after umount")
	}
	closeAndCheck(t, m)
}

func TestCloseWithLoopIsIdempotent(t *testing.T) {
	requireFUSE(t, "losetup")
	m := mountForTest(t, newTestDevice(t, 4<<20, 512), true)
	if m.LoopDevice() == "" {
		t.Fatal("no loop device with Loop set")
	}
	closeAndCheck(t, m)
}

func TestMountWithoutFUSEDevice(t *testing.T) {
	old := fuseDevice
	fuseDevice = filepath.Join(t.TempDir(), "no-fuse")
	defer func() { fuseDevice = old }()
	_, err := Mount(newTestDevice(t, 1<<20, 4096), Options{Mountpoint: t.TempDir()})
	if err == nil {
		t.Fatal("Mount succeeded without a FUSE device")
	}
	if msg := err.Error(); !strings.Contains(msg, "FUSE is not available") || !strings.Contains(msg, "frontend = nbd") {
		t.Fatalf("error %q does not say FUSE is unavailable and what to do", msg)
	}
}

func TestMountRejectsBadGeometry(t *testing.T) {
	dev := &memDevice{store: &memStore{data: make([]byte, 4096+512)}, bs: 4096}
	if _, err := Mount(dev, Options{Mountpoint: t.TempDir()}); err == nil {
		t.Fatal("Mount accepted a size that is not a multiple of the block size")
	}
}
