package fuse

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Done reports an unmount from outside as an error (the device is gone)
// and an unmount by Close as nil.
func TestDoneReportsHowTheSessionEnded(t *testing.T) {
	requireFUSE(t, "umount", "losetup")

	m := mountForTest(t, newTestDevice(t, 1<<20, 4096), false)
	select {
	case err := <-m.Done():
		t.Fatalf("Done fired while mounted: %v", err)
	default:
	}
	run(t, "umount", filepath.Dir(m.FilePath()))
	select {
	case err := <-m.Done():
		if err == nil || !strings.Contains(err.Error(), "unmounted from outside") {
			t.Fatalf("Done after an outside unmount = %v, want an error saying so", err)
		}
	case <-time.After(time.Minute): // a hang guard, not a timing check
		t.Fatal("Done did not fire after umount")
	}
	closeAndCheck(t, m)

	m2 := mountForTest(t, newTestDevice(t, 1<<20, 4096), false)
	closeAndCheck(t, m2)
	select {
	case err := <-m2.Done():
		if err != nil {
			t.Fatalf("Done after Close = %v, want nil", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Done did not fire after Close")
	}
}
