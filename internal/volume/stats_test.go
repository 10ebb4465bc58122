package volume

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/mem"
)

// waitStats polls the volume's stats until cond holds; a hang fails.
func waitStats(t *testing.T, v *Volume, what string, cond func(Stats) bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		s, err := v.Stats(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if cond(s) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: %+v", what, s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStats: the object states, byte counts, checkpoint and lease figures
// follow what was done to the volume.
func TestStats(t *testing.T) {
	o := testOptions(64*mib, 4096)
	o.LeaseInterval = 100 * time.Millisecond
	f := faulty.New(mem.New())
	v, objs := open(t, f, o)
	defer objs.Close()
	ctx := context.Background()

	s, err := v.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	claimed := s.Watermark // a new volume: every key below is its claim window
	if s.Generation != 1 || !s.Map || s.Failed || claimed < 1 || s.Placeholders != claimed || s.LiveObjects != 0 || s.StoredBytes != 0 || s.Checkpoints != 0 {
		t.Fatalf("fresh volume: %+v", s)
	}
	if s.CheckpointAt.IsZero() || time.Since(s.CheckpointAt) < 0 {
		t.Errorf("fresh volume: checkpoint time %v, want the attach", s.CheckpointAt)
	}

	writeFlushed(t, v, 0, 'a', 'b') // two objects; 'b' overwrites 'a'
	writeFlushed(t, v, 5, 'c')
	s, err = v.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.Watermark != claimed+3 || s.NextKey != claimed+3 {
		t.Errorf("watermark %d, next key %d, want both %d", s.Watermark, s.NextKey, claimed+3)
	}
	if s.LiveObjects != 2 || s.DeadObjects != 1 || s.Placeholders != claimed {
		t.Errorf("objects live %d dead %d placeholders %d, want 2, 1, %d", s.LiveObjects, s.DeadObjects, s.Placeholders, claimed)
	}
	if s.StoredBytes != 3*4096 || s.LiveBytes != 2*4096 {
		t.Errorf("stored %d live %d bytes, want %d and %d", s.StoredBytes, s.LiveBytes, 3*4096, 2*4096)
	}
	if s.MapBlocks != 2 || s.MapBytes <= 0 {
		t.Errorf("map blocks %d bytes %d, want 2 and > 0", s.MapBlocks, s.MapBytes)
	}
	if s.PendingObjects != claimed+3 {
		t.Errorf("pending objects %d, want %d (nothing checkpointed yet)", s.PendingObjects, claimed+3)
	}

	if err := v.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	s, err = v.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.Checkpoints != 1 || s.CheckpointBytes <= ckptHeaderSize || s.PendingObjects != 0 {
		t.Errorf("after a checkpoint: %d written, newest %d bytes, %d pending; want 1, > header, 0", s.Checkpoints, s.CheckpointBytes, s.PendingObjects)
	}

	// Renewals succeed (each has one interval to be done: on a loaded
	// machine one may still fail, which is not what is checked here)...
	waitStats(t, v, "two lease renewals", func(s Stats) bool { return s.LeaseRenewals >= 2 })
	// ...and a renewal the store refuses counts as a failure.
	remove := f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Match: func(name string) bool { return name == LeaseName }, Err: errors.New("injected")})
	waitStats(t, v, "a failed lease renewal", func(s Stats) bool { return s.LeaseFailures >= 1 })
	remove()

	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
	s, err = v.Stats(ctx)
	if err == nil || s.Map {
		t.Errorf("stats of a closed volume: map %v, err %v; want an error", s.Map, err)
	}
	if s.Generation != 1 {
		t.Errorf("stats of a closed volume lost the generation: %+v", s)
	}
}
