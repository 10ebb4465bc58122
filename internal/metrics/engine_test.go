package metrics

import (
	"bytes"
	"context"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// TestEngineOnMinIO runs a real engine on MinIO behind the metrics and
// checks, scrape by scrape over HTTP, that each kind of I/O moves its
// counters by what was done.
func TestEngineOnMinIO(t *testing.T) {
	ctx := context.Background()
	srv := minio.Start(t)
	st := srv.Store(t, srv.Bucket(t))
	const (
		bs    = 4096
		chunk = 1 << 20
		req   = 64 << 10 // bytes per write request
		n     = 3*chunk + 5*req
	)
	m := New(zerolog.Nop())
	e := enginetest.Open(t, st, enginetest.Options{Size: 64 << 20, BlockSize: bs, ChunkSize: chunk, Durable: true, StoreObserver: m.StoreObserver()})
	col := gc.New(e.Volume, gc.Options{Step: 4096, LiveData: 0.5, Logger: zerolog.Nop()}) // runs only when asked
	defer col.Stop()
	if err := m.AddEngine(Engine{Proxy: e.Objs, Volume: e.Volume, Chunker: e.Dev, Cache: e.Cache, GC: col}); err != nil {
		t.Fatal(err)
	}
	dev := m.Device(e.Dev)
	s, err := Listen("127.0.0.1:0", m)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(ctx)
	url := "http://" + s.Addr() + Path
	last := scrape(t, url)
	// delta scrapes again and returns how much each series grew.
	delta := func() sample {
		t.Helper()
		now := scrape(t, url)
		d := sample{}
		for k, v := range now {
			d[k] = v - last[k]
		}
		last = now
		return d
	}
	if last["bs3_volume_generation"] != 1 {
		t.Fatalf("generation %v, want 1", last["bs3_volume_generation"])
	}

	// Writes: exactly what was written, and the uploads that stored it.
	data := make([]byte, n)
	for i := range data {
		data[i] = byte(i*7 + i>>12)
	}
	for off := 0; off < n; off += req {
		if err := dev.WriteAt(ctx, data[off:off+req], int64(off), false); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.Flush(ctx); err != nil { // durable: everything is stored
		t.Fatal(err)
	}
	d := delta()
	d.want(t, sample{
		`bs3_device_bytes_total{op="write"}`:                    n,
		`bs3_device_requests_total{op="write"}`:                 n / req,
		`bs3_device_request_duration_seconds_count{op="write"}`: n / req,
		`bs3_device_requests_total{op="flush"}`:                 1,
		`bs3_device_request_errors_total{op="write"}`:           0,
	})
	chunks := d["bs3_volume_watermark"]
	if chunks < 4 { // 3 full chunks and the rest
		t.Errorf("watermark moved by %v, want at least 4 chunks", chunks)
	}
	if puts := d[`bs3_store_requests_total{op="put",outcome="ok"}`]; puts < chunks {
		t.Errorf("%v successful PUTs for %v chunks", puts, chunks)
	}
	if up := d[`bs3_store_bytes_total{op="put"}`]; up < n {
		t.Errorf("uploaded %v bytes for %d written", up, n)
	}
	if d[`bs3_store_request_duration_seconds_count{op="put"}`] < chunks {
		t.Errorf("PUT latency histogram saw %v calls", d[`bs3_store_request_duration_seconds_count{op="put"}`])
	}
	last.want(t, sample{"bs3_chunk_buffers_in_use": 0, "bs3_chunk_buffers": 18, "bs3_volume_failed": 0})
	if last[`bs3_volume_objects{state="live"}`] < 4 || last["bs3_volume_live_bytes"] != n || last["bs3_map_blocks"] != n/bs {
		t.Errorf("after writing %d bytes: live objects %v, live bytes %v, map blocks %v", n,
			last[`bs3_volume_objects{state="live"}`], last["bs3_volume_live_bytes"], last["bs3_map_blocks"])
	}

	// A read of what was just committed: served by the cache, no GET.
	got := make([]byte, n)
	if err := dev.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs from what was written")
	}
	d = delta()
	d.want(t, sample{
		`bs3_device_bytes_total{op="read"}`:               n,
		`bs3_device_requests_total{op="read"}`:            1,
		`bs3_store_requests_total{op="get",outcome="ok"}`: 0,
		"bs3_cache_misses_total":                          0,
		"bs3_cache_returned_bytes_total":                  n,
	})
	if d["bs3_cache_hits_total"] == 0 {
		t.Error("reading committed data counted no cache hit")
	}

	// The same read with the memory cache emptied: misses and GETs.
	e.Cache.Purge()
	clear(got)
	if err := dev.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back from the store differs from what was written")
	}
	d = delta()
	d.want(t, sample{`bs3_device_bytes_total{op="read"}`: n, "bs3_cache_returned_bytes_total": n})
	if d["bs3_cache_misses_total"] == 0 || d[`bs3_store_requests_total{op="get",outcome="ok"}`] == 0 ||
		d[`bs3_store_bytes_total{op="get"}`] < n || d["bs3_cache_fetched_bytes_total"] < n {
		t.Errorf("a read from the store: misses %v, GETs %v, downloaded %v, fetched %v bytes; want misses, GETs and at least %d bytes",
			d["bs3_cache_misses_total"], d[`bs3_store_requests_total{op="get",outcome="ok"}`], d[`bs3_store_bytes_total{op="get"}`], d["bs3_cache_fetched_bytes_total"], n)
	}

	// GC: overwrite the first chunk whole (its object dies) and most of
	// the second (its live fraction falls below 0.5), then write
	// elsewhere so neither is the newest object.
	for off := 0; off < chunk+chunk*3/4; off += req {
		if err := dev.WriteAt(ctx, data[off:off+req], int64(off), false); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.WriteAt(ctx, data[:req], 32<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := dev.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	delta()
	if _, err := col.CollectDead(ctx); err != nil {
		t.Fatal(err)
	}
	d = delta()
	d.want(t, sample{`bs3_gc_runs_total{kind="dead"}`: 1, `bs3_gc_failed_runs_total{kind="dead"}`: 0})
	if d["bs3_gc_reclaimed_objects_total"]+d["bs3_gc_placeholders_written_total"] == 0 || d["bs3_gc_reclaimed_bytes_total"] < chunk {
		t.Errorf("dead GC of an overwritten chunk: reclaimed %v, placeholders %v, %v bytes",
			d["bs3_gc_reclaimed_objects_total"], d["bs3_gc_placeholders_written_total"], d["bs3_gc_reclaimed_bytes_total"])
	}
	if _, err := col.Threshold(ctx); err != nil {
		t.Fatal(err)
	}
	d = delta()
	d.want(t, sample{`bs3_gc_runs_total{kind="threshold"}`: 1, `bs3_gc_runs_total{kind="dead"}`: 1})
	if d["bs3_gc_compacted_objects_total"] == 0 || d["bs3_gc_copied_bytes_total"] == 0 || d["bs3_gc_read_bytes_total"] == 0 {
		t.Errorf("threshold GC: compacted %v objects, read %v, copied %v bytes; want all > 0",
			d["bs3_gc_compacted_objects_total"], d["bs3_gc_read_bytes_total"], d["bs3_gc_copied_bytes_total"])
	}
	if d[`bs3_store_requests_total{op="put",outcome="ok"}`] == 0 {
		t.Error("threshold GC stored its copies without a counted PUT")
	}

	// A checkpoint.
	if err := e.Volume.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	d = delta()
	d.want(t, sample{"bs3_checkpoint_written_total": 1})
	if last["bs3_checkpoint_size_bytes"] <= 0 || last["bs3_checkpoint_pending_objects"] != 0 {
		t.Errorf("after a checkpoint: size %v, pending objects %v", last["bs3_checkpoint_size_bytes"], last["bs3_checkpoint_pending_objects"])
	}
}
