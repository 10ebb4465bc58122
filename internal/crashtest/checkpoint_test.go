package crashtest

import (
	"bufio"
	"context"
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// TestCheckpointCorruption damages checkpoint objects on MinIO and attaches
// again. Per kind of damage (truncated to half, one flipped byte):
//
//  1. engine 1 writes set 1, checkpoints (C1), writes set 2 and closes
//     (final checkpoint C2);
//  2. C2 is damaged; engine 2 must attach, report C2 unusable, load C1,
//     roll forward over set 2's objects, and read sets 1–2 exactly; it
//     writes set 3 and closes (C3);
//  3. C3 is damaged too, so both checkpoints left are bad (C1 was pruned):
//     engine 3 must report both unusable, load none (a full replay from
//     the first key) and read sets 1–3 exactly; its final checkpoint
//     replaces C3;
//  4. engine 4 must load that checkpoint and read sets 1–3 exactly.
func TestCheckpointCorruption(t *testing.T) {
	srv := minio.Start(t)
	damage := map[string]func(b []byte, rng *rand.Rand) []byte{
		"truncated": func(b []byte, _ *rand.Rand) []byte { return b[:len(b)/2] },
		"flipped-byte": func(b []byte, rng *rand.Rand) []byte {
			c := append([]byte(nil), b...)
			c[rng.IntN(len(c))] ^= 1 << rng.IntN(8)
			return c
		},
	}
	for name, spoil := range damage {
		t.Run(name, func(t *testing.T) {
			st := srv.Store(t, srv.Bucket(t))
			ctx := context.Background()
			rng := rand.New(rand.NewPCG(3, uint64(len(name))))
			const size = 32 << 20
			want := make(map[int64]uint64)
			nextID := uint64(0)
			// No periodic checkpoints: only Checkpoint calls and Close.
			open := func(logs *logBuffer) *engine {
				t.Helper()
				lg := zerolog.Nop()
				if logs != nil {
					lg = zerolog.New(logs).Level(zerolog.InfoLevel)
				}
				e, err := openEngine(ctx, st, engineOpts{size: size, durable: true, log: lg, ckptObjects: 1 << 40, ckptInterval: time.Hour})
				if err != nil {
					t.Fatalf("attach: %v", err)
				}
				return e
			}
			writeSet := func(e *engine) {
				t.Helper()
				for range 40 {
					n := 1 + rng.Int64N(64)
					block := rng.Int64N(size/blockSize - n + 1)
					if rng.IntN(8) == 0 {
						if err := e.dev.Zero(ctx, block*blockSize, n*blockSize, true, false); err != nil {
							t.Fatal(err)
						}
						for b := block; b < block+n; b++ {
							want[b] = 0
						}
						continue
					}
					nextID++
					if err := e.dev.WriteAt(ctx, stamped(nextID, block, n), block*blockSize, false); err != nil {
						t.Fatal(err)
					}
					for b := block; b < block+n; b++ {
						want[b] = nextID
					}
				}
				if err := e.dev.Flush(ctx); err != nil {
					t.Fatal(err)
				}
			}
			closeEngine := func(e *engine) {
				t.Helper()
				if err := e.close(); err != nil {
					t.Fatalf("close: %v", err)
				}
			}
			checkpoints := func() []string {
				t.Helper()
				var names []string
				if err := st.List(ctx, store.CheckpointPrefix, func(n string, _ int64) error {
					names = append(names, n)
					return nil
				}); err != nil {
					t.Fatal(err)
				}
				return names
			}
			corrupt := func(name string) {
				t.Helper()
				size, err := st.Size(ctx, name)
				if err != nil {
					t.Fatal(err)
				}
				body := make([]byte, size)
				if _, err := st.GetRange(ctx, name, 0, body); err != nil {
					t.Fatal(err)
				}
				if err := st.Put(ctx, name, spoil(body, rng), false); err != nil {
					t.Fatal(err)
				}
			}

			e1 := open(nil)
			writeSet(e1)
			if err := e1.vol.Checkpoint(ctx); err != nil {
				t.Fatalf("checkpoint after set 1: %v", err)
			}
			writeSet(e1)
			closeEngine(e1)
			names := checkpoints()
			if len(names) != 2 {
				t.Fatalf("after a checkpoint and a clean close the bucket holds checkpoints %q, want two", names)
			}
			c1, c2 := names[0], names[1]

			corrupt(c2)
			var logs2 logBuffer
			e2 := open(&logs2)
			expectExactly(t, e2, want)
			expectCheckpointLog(t, logs2.String(), []string{c2}, c1)
			writeSet(e2)
			closeEngine(e2)
			names = checkpoints()
			if len(names) != 2 || names[0] != c2 {
				t.Fatalf("after engine 2 closed, checkpoints are %q; want the damaged %s and a new one", names, c2)
			}
			c3 := names[1]

			corrupt(c3)
			var logs3 logBuffer
			e3 := open(&logs3)
			expectExactly(t, e3, want)
			expectCheckpointLog(t, logs3.String(), []string{c3, c2}, "")
			closeEngine(e3)
			// Every attach claims a window of keys, so e3's final
			// checkpoint has a watermark of its own: the newest name.
			names = checkpoints()
			c4 := names[len(names)-1]
			if c4 == c3 {
				t.Fatalf("engine 3 wrote no new checkpoint at close: %q", names)
			}

			var logs4 logBuffer
			e4 := open(&logs4)
			expectExactly(t, e4, want)
			expectCheckpointLog(t, logs4.String(), nil, c4)
			closeEngine(e4)
		})
	}
}

// expectCheckpointLog checks in an engine's JSON log that each checkpoint
// in unusable was reported at warn level, and that loaded (or none, if
// empty) was the checkpoint recovery started from.
func expectCheckpointLog(t *testing.T, log string, unusable []string, loaded string) {
	t.Helper()
	warned := make(map[string]bool)
	var got []string
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var ev struct {
			Level      string `json:"level"`
			Checkpoint string `json:"checkpoint"`
			Watermark  *int64 `json:"watermark"`
		}
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil || ev.Checkpoint == "" {
			continue
		}
		switch {
		case ev.Level == "warn":
			warned[ev.Checkpoint] = true
		case ev.Level == "info" && ev.Watermark != nil:
			got = append(got, ev.Checkpoint)
		}
	}
	for _, n := range unusable {
		if !warned[n] {
			t.Errorf("the damaged checkpoint %s was not reported unusable; log:\n%s", n, tail(log, 20))
		}
	}
	switch {
	case loaded == "" && len(got) > 0:
		t.Errorf("recovery loaded checkpoint(s) %q; all were damaged, want a full replay", got)
	case loaded != "" && (len(got) != 1 || got[0] != loaded):
		t.Errorf("recovery loaded checkpoint(s) %q, want %s; log:\n%s", got, loaded, tail(log, 20))
	}
}
