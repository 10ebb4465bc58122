package volume

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/frontend/buse"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/kernelemu"
)

// lockedBuffer collects log output written from several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// The roll-forward ends with a line saying how many objects it replayed
// and how many bytes of writes they held (the interval lines of a long
// replay come from the same reporter, tested in internal/progress).
func TestRollForwardReportsProgress(t *testing.T) {
	st := mem.New()
	o := testOptions(64*mib, 4096)
	o.SkipCheckpoint = true // a replay from key 0
	v, objs := open(t, st, o)
	em := kernelemu.New(buse.NewAdapter(v), v.Layout(), v.Size(), mib, 1, 2)
	const writes, size = 20, 8192
	for i := range writes {
		if err := em.Write(0, int64(i)*2*mib, bytes.Repeat([]byte{byte(i + 1)}, size)); err != nil {
			t.Fatal(err)
		}
		if err := em.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if err := em.Close(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	objs.Close()

	// The bucket's data objects: the claim window of the first attach,
	// then the writes; all contiguous from key 0.
	var keys int64
	if err := st.List(context.Background(), "", func(name string, _ int64) error {
		if _, ok := store.ParseDataName(name); ok {
			keys++
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if keys <= writes {
		t.Fatalf("%d data objects for %d flushed writes and a claim window", keys, writes)
	}

	var logs lockedBuffer
	o.Logger = zerolog.New(&logs)
	v, objs = open(t, st, o)
	defer objs.Close()
	defer v.Close(context.Background())

	var final map[string]any
	for _, l := range strings.Split(logs.String(), "\n") {
		if !strings.Contains(l, `"message":"roll-forward"`) {
			continue
		}
		if err := json.Unmarshal([]byte(l), &final); err != nil {
			t.Fatalf("%q: %v", l, err)
		}
	}
	if final == nil {
		t.Fatalf("no roll-forward line in:\n%s", logs.String())
	}
	if final["finished"] != true || final["objects_done"] != float64(keys) || final["write_bytes"] != float64(writes*size) {
		t.Errorf("roll-forward line %v, want finished, %d objects, %d write bytes", final, keys, writes*size)
	}
	if _, ok := final["elapsed_ms"]; !ok {
		t.Errorf("roll-forward line without elapsed_ms: %v", final)
	}

	// The estimate of a long replay counts the data objects from a key.
	for _, from := range []int64{0, keys - 5, keys} {
		n, err := v.countDataKeys(context.Background(), from)
		if err != nil {
			t.Fatal(err)
		}
		// The second attach claimed a window of its own past the end.
		want := keys - from + v.claimWindow()
		if n != want {
			t.Errorf("countDataKeys(%d) = %d, want %d", from, n, want)
		}
	}
}
