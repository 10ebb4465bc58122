package testutil

import (
	"sync/atomic"
	"testing"
	"time"
)

func TestWaitFor(t *testing.T) {
	var n atomic.Int32
	go func() {
		for range 3 {
			n.Add(1)
		}
	}()
	WaitFor(t, "three increments", func() bool { return n.Load() == 3 })
}

// fatalRecorder notes Fatalf instead of stopping the test.
type fatalRecorder struct {
	testing.TB
	failed bool
}

func (f *fatalRecorder) Helper() {}

func (f *fatalRecorder) Fatalf(string, ...any) { f.failed = true }

func TestWaitWithinFails(t *testing.T) {
	f := &fatalRecorder{TB: t}
	WaitWithin(f, time.Millisecond, "never", func() bool { return f.failed })
	if !f.failed {
		t.Fatal("WaitWithin did not fail on a condition that never held")
	}
}
