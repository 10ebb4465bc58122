package minio

import (
	"os"
	"syscall"
	"testing"
	"time"
)

// TestProcCPUSeconds: the CPU time read from /proc for this process
// agrees with what getrusage says, after burning a known amount.
func TestProcCPUSeconds(t *testing.T) {
	for start := time.Now(); time.Since(start) < 300*time.Millisecond; {
	}
	got, err := procCPUSeconds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	want := time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
	if got < 0.25 || got > want+0.05 || got < want-0.1 {
		t.Fatalf("procCPUSeconds = %.2f s, getrusage %.2f s (after burning 0.3 s)", got, want)
	}
	if _, err := procCPUSeconds(-1); err == nil {
		t.Fatal("procCPUSeconds of no process: no error")
	}
}
