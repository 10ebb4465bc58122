package cache

import (
	"os"
	"runtime"
	"runtime/debug"
	"testing"

	"golang.org/x/sys/unix"
)

// threadFaults is the minor page faults of the calling thread so far.
func threadFaults(t *testing.T) int64 {
	t.Helper()
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		t.Fatal(err)
	}
	return ru.Minflt
}

// faultsWriting is the page faults the calling thread takes writing one
// byte into each page of b.
func faultsWriting(t *testing.T, b []byte) int64 {
	t.Helper()
	page := os.Getpagesize()
	f0 := threadFaults(t)
	for i := 0; i < len(b); i += page {
		b[i] = 1
	}
	return threadFaults(t) - f0
}

// A prefaulted window takes no page faults when it is first written, where
// an untouched one takes one per page; its bytes are still zero; a slice
// that starts and ends inside pages is handled (only whole pages).
func TestPrefaultedWindowTakesNoFaults(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	const size = 1 << 20
	pages := int64(size / os.Getpagesize())
	fresh := func() []byte {
		m, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Munmap(m) })
		return m
	}
	if n := faultsWriting(t, fresh()); n < pages/2 {
		t.Fatalf("writing %d untouched pages took %d faults: the count does not measure what this test needs", pages, n)
	}
	m := fresh()
	prefault(m[100 : size-100]) // not page-aligned at either end
	if populateOff.Load() {
		t.Skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
	}
	for i, c := range m {
		if c != 0 {
			t.Fatalf("byte %d of a prefaulted window is %d, want 0", i, c)
		}
	}
	// The first and last page are only partly inside the slice: at most
	// those two fault.
	if n := faultsWriting(t, m); n > 2 {
		t.Fatalf("writing %d prefaulted pages took %d faults, want at most 2", pages, n)
	}
}

// New pool windows are prefaulted.
func TestPoolPrefaultsNewWindows(t *testing.T) {
	p := &pool{max: 4}
	before := prefaulted.Load()
	b := p.get(1000, 64<<10)
	if len(b) != 1000 || cap(b) != 64<<10 {
		t.Fatalf("got len %d cap %d, want 1000 and 64 KiB", len(b), cap(b))
	}
	if populateOff.Load() {
		t.Skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
	}
	if got := prefaulted.Load() - before; got < 56<<10 {
		t.Fatalf("a new 64 KiB window had %d bytes prefaulted, want its whole pages", got)
	}
}

// BenchmarkFreshWindows writes 64 MiB into new 64 KiB windows from a new
// pool, as a cold cache does after a restart, with and without
// prefaulting; the memory goes back to the system between iterations.
//
//	go test -run '^$' -bench FreshWindows ./internal/cache/
func BenchmarkFreshWindows(b *testing.B) {
	const win, total = 64 << 10, 64 << 20
	src := make([]byte, win)
	for i := range src {
		src[i] = byte(i)
	}
	for _, mode := range []string{"prefault", "fault"} {
		b.Run(mode, func(b *testing.B) {
			off := populateOff.Load()
			populateOff.Store(mode == "fault")
			defer populateOff.Store(off)
			b.SetBytes(total)
			for b.Loop() {
				b.StopTimer()
				debug.FreeOSMemory()
				p := &pool{max: total / win}
				keep := make([][]byte, 0, total/win)
				b.StartTimer()
				for range total / win {
					w := p.get(win, win)
					copy(w, src)
					keep = append(keep, w)
				}
			}
		})
	}
}
