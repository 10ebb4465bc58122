package progress

import (
	"bytes"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// clock is a fake clock the test moves by hand.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func lines(t *testing.T, buf *bytes.Buffer) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		out = append(out, m)
	}
	buf.Reset()
	return out
}

func TestLinesAtTheIntervalWithRatesAndETA(t *testing.T) {
	clk := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	var buf bytes.Buffer
	r := New(zerolog.New(&buf), "dead GC pass", Options{Unit: "objects", BytesName: "bytes_freed", Total: 400, Now: clk.now})

	// Before the first interval: nothing.
	clk.advance(4 * time.Second)
	r.Add(40, 4000)
	clk.advance(5 * time.Second)
	r.Add(50, 5000)
	if got := lines(t, &buf); len(got) != 0 {
		t.Fatalf("logged before 10 s: %v", got)
	}

	// At 10 s: 100 of 400 objects in 10 s, so 10/s and 30 s left.
	clk.advance(time.Second)
	r.Add(10, 1000)
	got := lines(t, &buf)
	if len(got) != 1 {
		t.Fatalf("want one line at 10 s, got %v", got)
	}
	want := map[string]any{
		"level": "info", "message": "dead GC pass", "finished": false,
		"objects_done": 100.0, "objects_total": 400.0, "percent": 25.0,
		"bytes_freed": 10000.0, "elapsed_ms": 10000.0,
		"objects_per_s": 10.0, "bytes_freed_per_s": 1000.0, "eta_ms": 30000.0,
	}
	for k, v := range want {
		if got[0][k] != v {
			t.Errorf("%s = %v, want %v (line %v)", k, got[0][k], v, got[0])
		}
	}
	if len(got[0]) != len(want) {
		t.Errorf("line has fields %v, want exactly %v", got[0], want)
	}

	// The next line comes 10 s after the previous one, not after the
	// previous update.
	clk.advance(9 * time.Second)
	r.Add(90, 0)
	if got := lines(t, &buf); len(got) != 0 {
		t.Fatalf("logged 9 s after the last line: %v", got)
	}
	clk.advance(time.Second)
	r.Set(300, 30000) // absolute counters
	got = lines(t, &buf)
	if len(got) != 1 || got[0]["objects_done"] != 300.0 || got[0]["eta_ms"] != 6667.0 {
		t.Fatalf("second line: %v, want 300 done and 100 left at 15/s (6.667 s)", got)
	}

	// The end: no interval line at 100 % even after the interval, then
	// the final line, without time left.
	clk.advance(15 * time.Second)
	r.Add(100, 10000)
	if got := lines(t, &buf); len(got) != 0 {
		t.Fatalf("interval line once all is done: %v", got)
	}
	r.Finish()
	got = lines(t, &buf)
	if len(got) != 1 || got[0]["finished"] != true || got[0]["objects_done"] != 400.0 ||
		got[0]["percent"] != 100.0 || got[0]["elapsed_ms"] != 35000.0 || got[0]["objects_per_s"] != 11.4 {
		t.Fatalf("final line: %v", got)
	}
	if _, ok := got[0]["eta_ms"]; ok {
		t.Errorf("final line has eta_ms: %v", got[0])
	}
}

func TestUnknownTotal(t *testing.T) {
	clk := &clock{t: time.Unix(0, 0)}
	var buf bytes.Buffer
	r := New(zerolog.New(&buf), "roll-forward", Options{Every: time.Second, Now: clk.now})
	clk.advance(2 * time.Second)
	r.Add(64, 0)
	got := lines(t, &buf)
	if len(got) != 1 || got[0]["objects_done"] != 64.0 || got[0]["objects_per_s"] != 32.0 {
		t.Fatalf("line: %v", got)
	}
	for _, k := range []string{"objects_total", "percent", "eta_ms", "bytes", "bytes_per_s"} {
		if _, ok := got[0][k]; ok {
			t.Errorf("%s logged without a total or byte name: %v", k, got[0])
		}
	}
	// A total found later (a listing) brings the time left.
	r.SetTotal(192)
	clk.advance(2 * time.Second)
	r.Add(64, 0)
	got = lines(t, &buf)
	if len(got) != 1 || got[0]["objects_total"] != 192.0 || got[0]["eta_ms"] != 2000.0 {
		t.Fatalf("line after SetTotal: %v, want 64 left at 32/s", got)
	}
}

func TestShortRunLogsOnlyWhenAsked(t *testing.T) {
	clk := &clock{t: time.Unix(0, 0)}
	var buf bytes.Buffer
	r := New(zerolog.New(&buf), "quick", Options{Now: clk.now})
	clk.advance(time.Second)
	r.Add(5, 5)
	r.Finish()
	if buf.Len() != 0 {
		t.Fatalf("a run shorter than the interval logged: %s", buf.String())
	}
	r = New(zerolog.New(&buf), "summary", Options{Always: true, Now: clk.now})
	clk.advance(500 * time.Millisecond)
	r.Add(5, 5)
	r.Finish()
	got := lines(t, &buf)
	if len(got) != 1 || got[0]["finished"] != true || got[0]["objects_per_s"] != 10.0 {
		t.Fatalf("Always: %v", got)
	}
}

// Updates from many goroutines are all counted (run with -race).
func TestConcurrentAdds(t *testing.T) {
	clk := &clock{t: time.Unix(0, 0)}
	var buf bytes.Buffer
	r := New(zerolog.New(&buf), "parallel", Options{BytesName: "bytes", Always: true, Now: clk.now})
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 1000 {
				r.Add(1, 2)
			}
		}()
	}
	wg.Wait()
	clk.advance(time.Second)
	r.Finish()
	got := lines(t, &buf)
	if len(got) != 1 || got[0]["objects_done"] != 8000.0 || got[0]["bytes"] != 16000.0 {
		t.Fatalf("final line: %v", got)
	}
}
