// Package testutil holds helpers shared by the tests of several packages;
// its subpackages hold the larger harnesses (MinIO, engines, the kernel
// emulator, log checks). Production code never imports it
// (docs/ARCHITECTURE.md §2).
package testutil

import (
	"testing"
	"time"
)

// WaitDeadline is how long WaitFor polls before it fails the test: long
// enough for a loaded machine, short enough that a hang fails instead of
// blocking the suite.
const WaitDeadline = 20 * time.Second

// WaitFor polls cond until it holds, failing the test after WaitDeadline.
// It waits for a state; it does not measure time.
func WaitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	WaitWithin(tb, WaitDeadline, what, cond)
}

// WaitWithin is WaitFor with its own deadline.
func WaitWithin(tb testing.TB, d time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
