package extentmap

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
)

// dump lists a map's observables that a checkpoint must keep: every
// extent Scan reports with its seqno, and every object with its live
// count, total and data start.
func dump(m *Map) string {
	var sb strings.Builder
	m.Scan(0, m.Blocks(), func(e Extent, seq uint64) bool {
		fmt.Fprintf(&sb, "%d %d %d %d %v %d\n", e.Block, e.N, e.Key, e.Off, e.Zero, seq)
		return true
	})
	m.Objects(func(key, live, total int64) bool {
		fmt.Fprintf(&sb, "obj %d %d %d %d\n", key, live, total, m.DataStart(key))
		return true
	})
	return sb.String()
}

// TestLoadsVersion2Checkpoint loads a map body that bs3 wrote before body
// version 3 existed (main at c3e888d; testdata/version2.map: sequential 1 MiB items over two
// pages, then random writes and discards, objects with data starts;
// testdata/version2.txt: its Scan and objects as that bs3 reported them).
// An existing volume's checkpoint must load unchanged, and its next
// checkpoint, in version 3, must too.
func TestLoadsVersion2Checkpoint(t *testing.T) {
	data, err := os.ReadFile("testdata/version2.map")
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile("testdata/version2.txt")
	if err != nil {
		t.Fatal(err)
	}
	if data[len(magic)] != version2 {
		t.Fatalf("fixture is version %d, want %d", data[len(magic)], version2)
	}
	m, err := UnmarshalBinary(data)
	if err != nil {
		t.Fatalf("version 2 checkpoint rejected: %v", err)
	}
	checkInternals(t, m)
	if got := dump(m); got != string(want) {
		t.Fatalf("version 2 checkpoint decodes to other extents or objects")
	}
	if m.runPages == 0 {
		t.Fatal("sequential pages of a version 2 checkpoint did not load as runs")
	}
	v3, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	m3, err := UnmarshalBinary(v3)
	if err != nil {
		t.Fatal(err)
	}
	if got := dump(m3); got != string(want) {
		t.Fatal("version 3 re-encoding decodes to other extents or objects")
	}
	if bytes.Equal(v3, data) || len(v3) >= len(data) {
		t.Fatalf("version 3 body %d bytes, version 2 %d", len(v3), len(data))
	}
	t.Logf("version 2 body %d bytes, version 3 %d", len(data), len(v3))
}
