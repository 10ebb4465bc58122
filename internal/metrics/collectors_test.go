package metrics

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/volume"
)

func TestStoreObserver(t *testing.T) {
	m := New(zerolog.Nop())
	o := m.StoreObserver()
	o.StoreCall(objproxy.OpPut, objproxy.OutcomeOK, 4<<20, 30*time.Millisecond)
	o.StoreCall(objproxy.OpPut, objproxy.OutcomeError, 0, time.Second)
	o.StoreCall(objproxy.OpPut, objproxy.OutcomeOK, 100, time.Millisecond)
	o.StoreCall(objproxy.OpGet, objproxy.OutcomeOK, 4096, time.Millisecond)
	o.StoreCall(objproxy.OpGet, objproxy.OutcomeNotFound, 0, time.Millisecond)
	o.StoreCall(objproxy.OpDelete, objproxy.OutcomeCanceled, 0, time.Millisecond)
	o.StoreCall(objproxy.OpList, objproxy.OutcomeExists, 0, time.Millisecond)
	s := gather(t, m.Registry())
	s.want(t, sample{
		`bs3_store_requests_total{op="put",outcome="ok"}`:          2,
		`bs3_store_requests_total{op="put",outcome="error"}`:       1,
		`bs3_store_requests_total{op="get",outcome="ok"}`:          1,
		`bs3_store_requests_total{op="get",outcome="not_found"}`:   1,
		`bs3_store_requests_total{op="delete",outcome="canceled"}`: 1,
		`bs3_store_requests_total{op="list",outcome="exists"}`:     1,
		`bs3_store_requests_total{op="size",outcome="ok"}`:         0,
		`bs3_store_bytes_total{op="put"}`:                          4<<20 + 100,
		`bs3_store_bytes_total{op="get"}`:                          4096,
		`bs3_store_request_duration_seconds_count{op="put"}`:       3,
		`bs3_store_request_duration_seconds_sum{op="put"}`:         1.031,
	})
	if _, ok := s[`bs3_store_bytes_total{op="delete"}`]; ok {
		t.Error("delete has a bytes series")
	}
}

type fakeProxy struct {
	stats    objproxy.Stats
	up, down objproxy.PoolStats
}

func (f fakeProxy) Stats() objproxy.Stats                        { return f.stats }
func (f fakeProxy) Pools() (upload, download objproxy.PoolStats) { return f.up, f.down }

func TestPoolCollector(t *testing.T) {
	p := fakeProxy{
		stats: objproxy.Stats{Put: objproxy.OpStats{Attempts: 9, Retries: 3, Failures: 1}, List: objproxy.OpStats{Retries: 2}},
		up:    objproxy.PoolStats{Workers: 16, Running: 5, QueuedHigh: 7, QueuedLow: 2, RetryWaiting: 1},
		down:  objproxy.PoolStats{Workers: 8, Running: 8, QueuedLow: 40},
	}
	collect(t, newPoolCollector(p)).want(t, sample{
		`bs3_store_retries_total{op="put"}`:                      3,
		`bs3_store_failures_total{op="put"}`:                     1,
		`bs3_store_retries_total{op="list"}`:                     2,
		`bs3_store_retries_total{op="get"}`:                      0,
		`bs3_store_requests_in_flight{pool="upload"}`:            5,
		`bs3_store_requests_in_flight{pool="download"}`:          8,
		`bs3_store_queue_depth{pool="upload",priority="high"}`:   7,
		`bs3_store_queue_depth{pool="upload",priority="low"}`:    2,
		`bs3_store_queue_depth{pool="download",priority="high"}`: 0,
		`bs3_store_queue_depth{pool="download",priority="low"}`:  40,
		`bs3_store_retry_waiting{pool="upload"}`:                 1,
		`bs3_store_workers{pool="upload"}`:                       16,
		`bs3_store_workers{pool="download"}`:                     8,
	})
}

type fakeVolume struct {
	s   volume.Stats
	err error
}

func (f fakeVolume) Stats(context.Context) (volume.Stats, error) { return f.s, f.err }
func (f fakeVolume) Size() int64                                 { return 8 << 30 }

func TestVolumeCollector(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	v := fakeVolume{s: volume.Stats{
		Generation: 7, Watermark: 120, NextKey: 123, DeleteFloor: 64, Map: true,
		LiveObjects: 50, DeadObjects: 4, Placeholders: 30, StoredBytes: 200 << 20, LiveBytes: 150 << 20,
		MapBlocks: 9000, MapBytes: 1 << 20, Checkpoints: 3, CheckpointBytes: 4096,
		CheckpointAt: now.Add(-90 * time.Second), PendingObjects: 17, LeaseRenewals: 40, LeaseFailures: 2,
	}}
	c := newVolumeCollector(v)
	c.now = func() time.Time { return now }
	collect(t, c).want(t, sample{
		"bs3_volume_generation":                   7,
		"bs3_volume_size_bytes":                   8 << 30,
		"bs3_volume_watermark":                    120,
		"bs3_volume_next_key":                     123,
		"bs3_volume_delete_floor":                 64,
		"bs3_volume_failed":                       0,
		`bs3_volume_objects{state="live"}`:        50,
		`bs3_volume_objects{state="dead"}`:        4,
		`bs3_volume_objects{state="placeholder"}`: 30,
		"bs3_volume_stored_bytes":                 200 << 20,
		"bs3_volume_live_bytes":                   150 << 20,
		"bs3_map_blocks":                          9000,
		"bs3_map_bytes":                           1 << 20,
		"bs3_checkpoint_written_total":            3,
		"bs3_checkpoint_size_bytes":               4096,
		"bs3_checkpoint_age_seconds":              90,
		"bs3_checkpoint_pending_objects":          17,
		"bs3_lease_renewals_total":                40,
		"bs3_lease_renewal_failures_total":        2,
	})
}

// TestVolumeCollectorMapUnavailable: when the map cannot be read the
// scrape reports the error for the map figures and keeps the rest.
func TestVolumeCollectorMapUnavailable(t *testing.T) {
	boom := errors.New("map proxy closed")
	reg := prometheus.NewRegistry()
	reg.MustRegister(newVolumeCollector(fakeVolume{s: volume.Stats{Generation: 2, Failed: true}, err: boom}))
	fams, err := reg.Gather()
	if err == nil || !strings.Contains(err.Error(), boom.Error()) {
		t.Fatalf("gather error %v, want one naming %q", err, boom)
	}
	names := map[string]bool{}
	for _, f := range fams {
		names[f.GetName()] = true
	}
	if !names["bs3_volume_generation"] || !names["bs3_volume_failed"] || names["bs3_volume_objects"] {
		t.Errorf("families served without the map: %v; want generation and failed, not objects", names)
	}
}

type fakeBuffers struct{ in, total int }

func (f fakeBuffers) Buffers() (int, int) { return f.in, f.total }

func TestChunkerCollector(t *testing.T) {
	collect(t, newChunkerCollector(fakeBuffers{3, 8})).want(t, sample{
		"bs3_chunk_buffers_in_use": 3,
		"bs3_chunk_buffers":        8,
	})
}

type fakeCache struct{ s cache.Stats }

func (f fakeCache) Stats() cache.Stats { return f.s }

func TestCacheCollector(t *testing.T) {
	s := cache.Stats{
		Hits: 1, Misses: 2, HitBytes: 3, Inserted: 4, InsertedBytes: 5, Fetches: 6, FetchedBytes: 7,
		RAFetches: 8, RAFetchedBytes: 9, RAHits: 18, RAHitBytes: 19, ReturnedBytes: 10, MemoryBytes: 11, MemoryLimit: 12,
		DiskHits: 13, DiskDropped: 14, DiskWritten: 15, DiskEvicted: 16, DiskBytes: 17, DiskWriteErrors: 20,
		BuffersReused: 21, BuffersFreed: 22, RefErrors: 23, RAStarts: 24, RAPlannedBytes: 25,
	}
	got := collect(t, newCacheCollector(fakeCache{s}))
	got.want(t, sample{
		"bs3_cache_hits_total": 1, "bs3_cache_misses_total": 2, "bs3_cache_hit_bytes_total": 3,
		"bs3_cache_inserted_total": 4, "bs3_cache_inserted_bytes_total": 5,
		"bs3_cache_fetches_total": 6, "bs3_cache_fetched_bytes_total": 7,
		"bs3_cache_readahead_fetches_total": 8, "bs3_cache_readahead_bytes_total": 9,
		"bs3_cache_readahead_hits_total": 18, "bs3_cache_readahead_hit_bytes_total": 19,
		"bs3_cache_readahead_starts_total": 24, "bs3_cache_readahead_planned_bytes_total": 25,
		"bs3_cache_returned_bytes_total": 10, "bs3_cache_memory_bytes": 11, "bs3_cache_memory_limit_bytes": 12,
		"bs3_cache_disk_hits_total": 13, "bs3_cache_disk_dropped_total": 14, "bs3_cache_disk_written_total": 15,
		"bs3_cache_disk_evicted_total": 16, "bs3_cache_disk_bytes": 17, "bs3_cache_disk_write_errors_total": 20,
		"bs3_cache_buffers_reused_total": 21, "bs3_cache_buffers_freed_total": 22, "bs3_cache_buffer_ref_errors_total": 23,
	})
	if n := reflect.TypeOf(cache.Stats{}).NumField(); len(got) != n {
		t.Errorf("%d cache series, want one per field of cache.Stats (%d): export the new ones", len(got), n)
	}
}

type fakeGC struct{ t gc.Totals }

func (f fakeGC) Totals() gc.Totals { return f.t }

func TestGCCollector(t *testing.T) {
	var tot gc.Totals
	tot.Runs[gc.KindDead] = gc.RunTotals{Runs: 10, Failed: 1, Seconds: 2.5}
	tot.Runs[gc.KindThreshold] = gc.RunTotals{Runs: 2, Seconds: 30}
	tot.Reclaimed, tot.Placeholders, tot.BytesFreed = 5, 6, 7
	tot.Compacted, tot.BytesRead, tot.BytesCopied = 8, 9, 10
	tot.Running = true
	collect(t, newGCCollector(fakeGC{tot})).want(t, sample{
		`bs3_gc_runs_total{kind="dead"}`:             10,
		`bs3_gc_failed_runs_total{kind="dead"}`:      1,
		`bs3_gc_run_seconds_total{kind="dead"}`:      2.5,
		`bs3_gc_runs_total{kind="threshold"}`:        2,
		`bs3_gc_run_seconds_total{kind="threshold"}`: 30,
		`bs3_gc_runs_total{kind="defrag"}`:           0,
		"bs3_gc_reclaimed_objects_total":             5,
		"bs3_gc_placeholders_written_total":          6,
		"bs3_gc_reclaimed_bytes_total":               7,
		"bs3_gc_compacted_objects_total":             8,
		"bs3_gc_read_bytes_total":                    9,
		"bs3_gc_copied_bytes_total":                  10,
		"bs3_gc_running":                             1,
	})
}

// TestAddEngineTwiceRefused: a second engine's series would collide; it
// is refused whole (its proxy collector, registered before the clash, is
// taken back) and the first engine's stay.
func TestAddEngineTwiceRefused(t *testing.T) {
	m := New(zerolog.Nop())
	newCache := func() *cache.Cache {
		c, err := cache.New(cache.Options{MemoryBytes: 1 << 20, Window: 64 << 10, Logger: zerolog.Nop()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
	first := newCache()
	first.CountReturned(5)
	if err := m.AddEngine(Engine{Cache: first}); err != nil {
		t.Fatalf("first engine: %v", err)
	}
	p := objproxy.New(mem.New(), objproxy.Options{Logger: zerolog.Nop()})
	defer p.Close()
	if err := m.AddEngine(Engine{Proxy: p, Cache: newCache()}); err == nil {
		t.Fatal("a second engine was registered")
	}
	s := gather(t, m.Registry())
	s.want(t, sample{"bs3_cache_returned_bytes_total": 5})
	if _, ok := s[`bs3_store_workers{pool="upload"}`]; ok {
		t.Error("the refused engine's proxy collector stayed registered")
	}
}
