package minio

import (
	"os"
	"syscall"
	"testing"
	"time"
)

// rusageSeconds is this process's CPU time (user + system) by getrusage.
func rusageSeconds(t *testing.T) float64 {
	t.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// TestProcCPUSeconds: the CPU time read from /proc for this process
// agrees with what getrusage says, once it has used a known amount (the
// burn counts CPU time, not wall time: a loaded machine gives it less).
func TestProcCPUSeconds(t *testing.T) {
	for deadline := time.Now().Add(time.Minute); rusageSeconds(t) < 0.3; {
		if time.Now().After(deadline) {
			t.Skip("this process got under 0.3 s of CPU in a minute")
		}
		for start := time.Now(); time.Since(start) < 10*time.Millisecond; {
		}
	}
	before := rusageSeconds(t)
	got, err := procCPUSeconds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	after := rusageSeconds(t)
	// /proc counts in ticks of 10 ms; allow a few.
	if got < before-0.05 || got > after+0.05 {
		t.Fatalf("procCPUSeconds = %.2f s, getrusage %.2f-%.2f s", got, before, after)
	}
	if _, err := procCPUSeconds(-1); err == nil {
		t.Fatal("procCPUSeconds of no process: no error")
	}
}
