package config

import (
	"strings"
	"testing"
)

// TestGCDefragRange parses gc.defrag_range and checks that Validate
// refuses bad ranges with the key's name.
func TestGCDefragRange(t *testing.T) {
	for _, tc := range []struct {
		in       string
		off, len int64
		bad      bool
	}{
		{"", 0, 0, false},
		{"  ", 0, 0, false},
		{"0-1073741824", 0, 1 << 30, false},
		{"4K-1M", 4 << 10, 1<<20 - 4<<10, false},
		{"1g - 2G", 1 << 30, 1 << 30, false},
		{"0-1T", 0, 1 << 40, false},
		{"5-5", 0, 0, true},
		{"6-5", 0, 0, true},
		{"5", 0, 0, true},
		{"-5", 0, 0, true},
		{"a-5", 0, 0, true},
		{"0-5X", 0, 0, true},
		{"0-99999999999T", 0, 0, true},
	} {
		c := Default()
		c.GC.DefragRange = tc.in
		off, n, err := c.GCDefragRange()
		if tc.bad {
			if err == nil {
				t.Errorf("%q: parsed as %d+%d, want an error", tc.in, off, n)
			}
			continue
		}
		if err != nil || off != tc.off || n != tc.len {
			t.Errorf("%q: %d+%d, %v; want %d+%d", tc.in, off, n, err, tc.off, tc.len)
		}
	}
	c := Default()
	c.S3.Bucket = "b"
	c.Size = 1
	for _, r := range []string{"1G-2G", "3-2"} {
		c.GC.DefragRange = r
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "gc.defrag_range") {
			t.Errorf("Validate with defrag_range %q on a 1 GiB device: %v, want a gc.defrag_range error", r, err)
		}
	}
	c.GC.DefragRange = "0-1G"
	if err := c.Validate(); err != nil && strings.Contains(err.Error(), "gc.defrag_range") {
		t.Errorf("Validate refused defrag_range 0-1G on a 1 GiB device: %v", err)
	}
}
