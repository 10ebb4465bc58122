package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bs3/bs3/internal/volume"
)

// statsTimeout bounds how long a scrape waits for the volume's map
// figures: they are read at low priority, which under constant user I/O
// waits up to gc.idle_timeout.
const statsTimeout = 5 * time.Second

// volumeSource is what volumeCollector reads of the volume.
type volumeSource interface {
	Stats(ctx context.Context) (volume.Stats, error)
	Size() int64
}

// volumeCollector reads the volume's state at scrape time.
type volumeCollector struct {
	v   volumeSource
	now func() time.Time

	generation, size, watermark, nextKey, floor, failed *prometheus.Desc
	objects, stored, live, mapBlocks, mapBytes          *prometheus.Desc
	ckpts, ckptBytes, ckptAge, pending                  *prometheus.Desc
	renewals, renewFailures                             *prometheus.Desc
}

func newVolumeCollector(v volumeSource) *volumeCollector {
	d := func(sub, name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, sub, name), help, labels, nil)
	}
	return &volumeCollector{
		v:             v,
		now:           time.Now,
		generation:    d("volume", "generation", "Generation of this attach (docs/ARCHITECTURE.md §6.2): one more per attach."),
		size:          d("volume", "size_bytes", "Device size in bytes."),
		watermark:     d("volume", "watermark", "Next key to apply to the map: every key below it is applied."),
		nextKey:       d("volume", "next_key", "Next key to hand out; minus the watermark, the chunks being stored."),
		floor:         d("volume", "delete_floor", "Key below which dead GC deletes objects outright (watermark of the oldest checkpoint kept)."),
		failed:        d("volume", "failed", "1 once the volume stopped taking writes (store failure, fenced, ...), else 0."),
		objects:       d("volume", "objects", "Objects tracked in the map, by state: live (some block maps to it), dead (data nothing maps to, waiting for dead GC), placeholder (empty).", "state"),
		stored:        d("volume", "stored_bytes", "Data bytes of the tracked objects (metadata areas not included)."),
		live:          d("volume", "live_bytes", "Part of the stored bytes that blocks still map to (discard tombstones count as live blocks of their object; an estimate)."),
		mapBlocks:     d("map", "blocks", "Device blocks with a map entry (data or discard tombstone)."),
		mapBytes:      d("map", "bytes", "Heap bytes the extent map holds."),
		ckpts:         d("checkpoint", "written_total", "Checkpoints written by this attach."),
		ckptBytes:     d("checkpoint", "size_bytes", "Size of the newest checkpoint this attach wrote (0 before the first)."),
		ckptAge:       d("checkpoint", "age_seconds", "Seconds since this attach last wrote a checkpoint, or since the attach finished when it wrote none."),
		pending:       d("checkpoint", "pending_objects", "Objects applied since the newest checkpoint: what recovery would replay after a crash now."),
		renewals:      d("lease", "renewals_total", "Lease renewals of this attach that succeeded."),
		renewFailures: d("lease", "renewal_failures_total", "Lease renewals of this attach that failed (retried at the next interval)."),
	}
}

func (c *volumeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.generation, c.size, c.watermark, c.nextKey, c.floor, c.failed,
		c.objects, c.stored, c.live, c.mapBlocks, c.mapBytes, c.ckpts, c.ckptBytes, c.ckptAge, c.pending,
		c.renewals, c.renewFailures} {
		ch <- d
	}
}

func (c *volumeCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), statsTimeout)
	defer cancel()
	s, err := c.v.Stats(ctx)
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v)
	}
	gauge(c.generation, float64(s.Generation))
	gauge(c.size, float64(c.v.Size()))
	gauge(c.watermark, float64(s.Watermark))
	gauge(c.nextKey, float64(s.NextKey))
	gauge(c.floor, float64(s.DeleteFloor))
	failed := 0.0
	if s.Failed {
		failed = 1
	}
	gauge(c.failed, failed)
	counter(c.ckpts, float64(s.Checkpoints))
	gauge(c.ckptBytes, float64(s.CheckpointBytes))
	if !s.CheckpointAt.IsZero() {
		gauge(c.ckptAge, c.now().Sub(s.CheckpointAt).Seconds())
	}
	gauge(c.pending, float64(s.PendingObjects))
	counter(c.renewals, float64(s.LeaseRenewals))
	counter(c.renewFailures, float64(s.LeaseFailures))
	if err != nil {
		// The map figures are missing from this scrape; the handler
		// logs why and serves the rest.
		ch <- prometheus.NewInvalidMetric(c.objects, err)
		return
	}
	gauge(c.objects, float64(s.LiveObjects), "live")
	gauge(c.objects, float64(s.DeadObjects), "dead")
	gauge(c.objects, float64(s.Placeholders), "placeholder")
	gauge(c.stored, float64(s.StoredBytes))
	gauge(c.live, float64(s.LiveBytes))
	gauge(c.mapBlocks, float64(s.MapBlocks))
	gauge(c.mapBytes, float64(s.MapBytes))
}

// buffersSource is what chunkerCollector reads of the chunker.
type buffersSource interface {
	Buffers() (inUse, total int)
}

// chunkerCollector reads the chunk buffers of the userspace chunker.
type chunkerCollector struct {
	c            buffersSource
	inUse, total *prometheus.Desc
}

func newChunkerCollector(c buffersSource) *chunkerCollector {
	return &chunkerCollector{
		c:     c,
		inUse: prometheus.NewDesc("bs3_chunk_buffers_in_use", "Chunk buffers holding writes not yet committed (the open chunk and chunks being stored); writers wait when all are in use.", nil, nil),
		total: prometheus.NewDesc("bs3_chunk_buffers", "Chunk buffers of the userspace chunker (write.shared_buffer_size / write.chunk_size × threads).", nil, nil),
	}
}

func (c *chunkerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.inUse
	ch <- c.total
}

func (c *chunkerCollector) Collect(ch chan<- prometheus.Metric) {
	in, total := c.c.Buffers()
	ch <- prometheus.MustNewConstMetric(c.inUse, prometheus.GaugeValue, float64(in))
	ch <- prometheus.MustNewConstMetric(c.total, prometheus.GaugeValue, float64(total))
}
