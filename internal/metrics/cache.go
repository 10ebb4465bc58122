package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bs3/bs3/internal/cache"
)

// cacheSource is what cacheCollector reads of the read cache.
type cacheSource interface {
	Stats() cache.Stats
}

// cacheMetric is one figure of cache.Stats.
type cacheMetric struct {
	desc  *prometheus.Desc
	kind  prometheus.ValueType
	value func(cache.Stats) int64
}

// cacheCollector exports the read cache's counters at scrape time. The
// read amplification is bs3_cache_fetched_bytes_total over
// bs3_cache_returned_bytes_total.
type cacheCollector struct {
	c       cacheSource
	metrics []cacheMetric
}

func newCacheCollector(c cacheSource) *cacheCollector {
	m := func(name string, kind prometheus.ValueType, help string, value func(cache.Stats) int64) cacheMetric {
		return cacheMetric{prometheus.NewDesc(prometheus.BuildFQName(namespace, "cache", name), help, nil, nil), kind, value}
	}
	const cnt, gauge = prometheus.CounterValue, prometheus.GaugeValue
	return &cacheCollector{c: c, metrics: []cacheMetric{
		m("hits_total", cnt, "Read cache lookups of a window that found it (memory, or a verified disk file).", func(s cache.Stats) int64 { return s.Hits }),
		m("misses_total", cnt, "Read cache lookups of a window that did not find it.", func(s cache.Stats) int64 { return s.Misses }),
		m("hit_bytes_total", cnt, "Bytes of the windows the read cache found.", func(s cache.Stats) int64 { return s.HitBytes }),
		m("inserted_total", cnt, "Windows stored in the read cache (by commits and by fetches).", func(s cache.Stats) int64 { return s.Inserted }),
		m("inserted_bytes_total", cnt, "Bytes of the windows stored in the read cache.", func(s cache.Stats) int64 { return s.InsertedBytes }),
		m("fetches_total", cnt, "GETs issued by the read path, readahead included.", func(s cache.Stats) int64 { return s.Fetches }),
		m("fetched_bytes_total", cnt, "Bytes the read path's GETs returned, readahead included; over returned bytes, the read amplification.", func(s cache.Stats) int64 { return s.FetchedBytes }),
		m("readahead_hits_total", cnt, "Prefetched windows that a read then used.", func(s cache.Stats) int64 { return s.RAHits }),
		m("readahead_hit_bytes_total", cnt, "Bytes of the prefetched windows a read then used.", func(s cache.Stats) int64 { return s.RAHitBytes }),
		m("returned_bytes_total", cnt, "Bytes of mapped data returned to readers.", func(s cache.Stats) int64 { return s.ReturnedBytes }),
		m("readahead_fetches_total", cnt, "GETs issued by readahead.", func(s cache.Stats) int64 { return s.RAFetches }),
		m("readahead_starts_total", cnt, "Prefetches started by sequential streams.", func(s cache.Stats) int64 { return s.RAStarts }),
		m("readahead_planned_bytes_total", cnt, "Device bytes the started prefetches covered, cached or not.", func(s cache.Stats) int64 { return s.RAPlannedBytes }),
		m("readahead_bytes_total", cnt, "Bytes fetched by readahead.", func(s cache.Stats) int64 { return s.RAFetchedBytes }),
		m("memory_bytes", gauge, "Bytes the memory tier holds (data plus a per-entry overhead).", func(s cache.Stats) int64 { return s.MemoryBytes }),
		m("memory_limit_bytes", gauge, "Bound of the memory tier (cache.memory_size).", func(s cache.Stats) int64 { return s.MemoryLimit }),
		m("disk_hits_total", cnt, "Windows served from the disk tier after their checks passed.", func(s cache.Stats) int64 { return s.DiskHits }),
		m("disk_dropped_total", cnt, "Disk tier records (or unreadable segment tails) dropped because a check failed (damaged, torn or foreign).", func(s cache.Stats) int64 { return s.DiskDropped }),
		m("disk_written_total", cnt, "Window records appended to the disk tier.", func(s cache.Stats) int64 { return s.DiskWritten }),
		m("disk_evicted_total", cnt, "Window records freed with their segment to keep the disk tier under its limit.", func(s cache.Stats) int64 { return s.DiskEvicted }),
		m("disk_write_errors_total", cnt, "Appends to the disk tier that failed (a full or broken disk); those windows are skipped.", func(s cache.Stats) int64 { return s.DiskWriteErrors }),
		m("buffers_reused_total", cnt, "Window buffers a fetch or commit took from the free list instead of allocating.", func(s cache.Stats) int64 { return s.BuffersReused }),
		m("buffers_freed_total", cnt, "Window buffers that no tier, disk write or reader held any more.", func(s cache.Stats) int64 { return s.BuffersFreed }),
		m("buffer_ref_errors_total", cnt, "Window releases past zero: a bug, never expected (the buffer is then not reused).", func(s cache.Stats) int64 { return s.RefErrors }),
		m("disk_bytes", gauge, "Bytes the disk tier counts against cache.disk_size.", func(s cache.Stats) int64 { return s.DiskBytes }),
	}}
}

func (c *cacheCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
}

func (c *cacheCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.c.Stats()
	for _, m := range c.metrics {
		ch <- prometheus.MustNewConstMetric(m.desc, m.kind, float64(m.value(s)))
	}
}
