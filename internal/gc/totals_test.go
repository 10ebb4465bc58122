package gc

import (
	"context"
	"math/rand/v2"
	"testing"

	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/enginetest"
)

// TestTotalsAddUpRuns: the cumulative counters are the sums of what the
// runs returned, by kind, and the dead pass that ends a threshold or
// defragmentation run is counted once.
func TestTotalsAddUpRuns(t *testing.T) {
	ctx := context.Background()
	const bs = 4096
	e := enginetest.Open(t, mem.New(), enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: mib})
	m := newModel(bs)
	fill(t, e, m, 8*mib/bs)
	workload(t, e, m, rand.New(rand.NewPCG(3, 3)), 0, 8*mib/bs, 16*mib)
	c := New(e.Volume, Options{Step: 4096, LiveData: 0.5, Logger: testLogger(t)})
	if tot := c.Totals(); tot != (Totals{}) {
		t.Fatalf("a new collector has totals %+v", tot)
	}

	dead, err := c.CollectDead(ctx)
	if err != nil {
		t.Fatal(err)
	}
	th, err := c.Threshold(ctx) // includes a dead pass
	if err != nil {
		t.Fatal(err)
	}
	df, err := c.Defrag(ctx, Range{})
	if err != nil {
		t.Fatal(err)
	}
	if th.Reclaimed+th.Placeholders == 0 || th.Compacted == 0 || df.Compacted == 0 {
		t.Fatalf("the workload left nothing to collect: dead %s; threshold %s; defrag %s", describe(dead), describe(th), describe(df))
	}
	tot := c.Totals()
	for k, want := range map[Kind]int64{KindDead: 3, KindThreshold: 1, KindDefrag: 1} {
		if got := tot.Runs[k]; got.Runs != want || got.Failed != 0 || got.Seconds <= 0 {
			t.Errorf("%v runs: %+v, want %d runs, none failed, some time", k, got, want)
		}
	}
	if want := dead.Reclaimed + th.Reclaimed + df.Reclaimed; tot.Reclaimed != want {
		t.Errorf("reclaimed %d, want %d", tot.Reclaimed, want)
	}
	if want := dead.Placeholders + th.Placeholders + df.Placeholders; tot.Placeholders != want {
		t.Errorf("placeholders %d, want %d", tot.Placeholders, want)
	}
	if want := dead.BytesFreed + th.BytesFreed + df.BytesFreed; tot.BytesFreed != want {
		t.Errorf("bytes freed %d, want %d", tot.BytesFreed, want)
	}
	if tot.Compacted != th.Compacted+df.Compacted || tot.BytesRead != th.BytesRead+df.BytesRead || tot.BytesCopied != th.BytesWritten+df.BytesWritten {
		t.Errorf("copying totals %+v; threshold %s; defrag %s", tot, describe(th), describe(df))
	}
	if tot.Running {
		t.Error("running after every run returned")
	}
}
