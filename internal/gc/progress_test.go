package gc

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/enginetest"
)

// tickClock is a fake clock that moves by step each time it is read, so
// a run of a few dozen steps spans several progress intervals without
// sleeping.
type tickClock struct {
	mu   sync.Mutex
	t    time.Time
	step time.Duration
}

func (c *tickClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(c.step)
	return c.t
}

// logLines collects JSON log lines written from several goroutines.
type logLines struct {
	mu    sync.Mutex
	lines []map[string]any
	bad   []string
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var m map[string]any
	if err := json.Unmarshal(p, &m); err != nil {
		l.bad = append(l.bad, string(p))
	} else {
		l.lines = append(l.lines, m)
	}
	return len(p), nil
}

// phase returns the progress lines of one phase, and resets the log.
func (l *logLines) phase(t *testing.T, phase string) (interval, final []map[string]any) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.bad) > 0 {
		t.Fatalf("lines that are not JSON: %q", l.bad)
	}
	for _, m := range l.lines {
		if m["message"] != "GC progress" || m["phase"] != phase {
			continue
		}
		if m["finished"] == true {
			final = append(final, m)
		} else {
			interval = append(interval, m)
		}
	}
	return interval, final
}

// Dead passes and threshold runs log "GC progress" lines at the interval
// and at their end: units done of the total, bytes, rate, time left.
func TestGCLogsProgress(t *testing.T) {
	ctx := context.Background()
	st := mem.New()
	const (
		bs     = 4096
		size   = 64 * mib
		blocks = size / bs
		step   = 256 // blocks per window: 64 windows over the device
	)
	e := enginetest.Open(t, st, enginetest.Options{Size: size, BlockSize: bs, ChunkSize: 1 * mib})
	m := newModel(bs)
	fill(t, e, m, 16*mib/bs)
	workload(t, e, m, rand.New(rand.NewPCG(3, 3)), 0, 4*mib/bs, 24*mib)

	var logs logLines
	c := New(e.Volume, Options{Step: step, LiveData: 0.5, Logger: zerolog.New(&logs)})
	// Each update reads the clock once: 5 s per read is a line every
	// second update.
	c.now = (&tickClock{t: time.Unix(1e9, 0), step: 5 * time.Second}).now

	dead, err := c.CollectDead(ctx)
	if err != nil {
		t.Fatalf("dead pass: %v", err)
	}
	done := dead.Reclaimed + dead.Placeholders
	if done < 6 {
		t.Fatalf("dead pass did only %s; the test needs a longer one", describe(dead))
	}
	interval, final := logs.phase(t, "dead pass")
	if len(interval) == 0 || len(final) != 1 {
		t.Fatalf("dead pass of %d objects, 5 clock seconds per update: %d interval lines, %d final lines", done, len(interval), len(final))
	}
	f := final[0]
	total, _ := f["objects_total"].(float64)
	if f["objects_done"] != total || total < float64(done) || f["percent"] != 100.0 || f["bytes_freed"] != float64(dead.BytesFreed) {
		t.Errorf("final dead-pass line %v; pass: %s", f, describe(dead))
	}
	for _, l := range interval {
		if l["objects_done"].(float64) >= total || l["eta_ms"] == nil || l["objects_per_s"] == nil || l["elapsed_ms"] == nil {
			t.Errorf("interval line %v: want done below the total %v, a rate and the time left", l, total)
		}
	}

	ts, err := c.Threshold(ctx)
	if err != nil {
		t.Fatalf("threshold run: %v", err)
	}
	if ts.Compacted == 0 || ts.BytesWritten == 0 {
		t.Fatalf("threshold run compacted nothing: %s", describe(ts))
	}
	for _, phase := range []string{"count live data", "copy live data"} {
		interval, final := logs.phase(t, phase)
		if len(interval) == 0 || len(final) != 1 {
			t.Fatalf("%s over %d windows: %d interval lines, %d final lines", phase, blocks/step, len(interval), len(final))
		}
		f := final[0]
		if f["blocks_done"] != float64(blocks) || f["blocks_total"] != float64(blocks) || f["percent"] != 100.0 {
			t.Errorf("%s: final line %v, want all %d blocks", phase, f, blocks)
		}
		last := 0.0
		for _, l := range interval {
			d := l["blocks_done"].(float64)
			if d <= last || d >= blocks || l["eta_ms"] == nil {
				t.Errorf("%s: interval line %v after %v blocks: want growing, below %d, with the time left", phase, l, last, blocks)
			}
			last = d
		}
		_, hasBytes := f["bytes_written"]
		if hasBytes != (phase == "copy live data") {
			t.Errorf("%s: final line %v: bytes_written only for the copy", phase, f)
		}
		if phase == "copy live data" && f["bytes_written"] != float64(ts.BytesWritten) {
			t.Errorf("copy: bytes_written %v, run wrote %d", f["bytes_written"], ts.BytesWritten)
		}
	}
}
