package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bs3/bs3/internal/gc"
)

// gcSource is what gcCollector reads of the collector.
type gcSource interface {
	Totals() gc.Totals
}

// gcCollector exports the garbage collector's totals at scrape time.
type gcCollector struct {
	g                                gcSource
	runs, failed, seconds            *prometheus.Desc
	reclaimed, placeholders, freed   *prometheus.Desc
	compacted, read, copied, running *prometheus.Desc
}

func newGCCollector(g gcSource) *gcCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "gc", name), help, labels, nil)
	}
	return &gcCollector{
		g:            g,
		runs:         d("runs_total", "GC runs finished, by kind: dead (a dead pass, also the one ending each threshold or defrag run), threshold, defrag.", "kind"),
		failed:       d("failed_runs_total", "GC runs that ended in an error, by kind.", "kind"),
		seconds:      d("run_seconds_total", "Time spent in GC runs, by kind (a threshold or defrag run includes its dead pass).", "kind"),
		reclaimed:    d("reclaimed_objects_total", "Objects deleted from the bucket by dead GC."),
		placeholders: d("placeholders_written_total", "Dead objects at or above the delete floor replaced by an empty placeholder."),
		freed:        d("reclaimed_bytes_total", "Bytes of the objects deleted or emptied by dead GC."),
		compacted:    d("compacted_objects_total", "Objects whose live data threshold GC or defragmentation copied."),
		read:         d("read_bytes_total", "Bytes threshold GC and defragmentation read to copy live data."),
		copied:       d("copied_bytes_total", "Bytes threshold GC and defragmentation wrote into new objects."),
		running:      d("running", "1 while a threshold GC or defragmentation run is going."),
	}
}

func (c *gcCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.runs, c.failed, c.seconds, c.reclaimed, c.placeholders, c.freed, c.compacted, c.read, c.copied, c.running} {
		ch <- d
	}
}

func (c *gcCollector) Collect(ch chan<- prometheus.Metric) {
	t := c.g.Totals()
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	for k := range gc.NumKinds {
		kind := gc.Kind(k).String()
		r := t.Runs[k]
		counter(c.runs, float64(r.Runs), kind)
		counter(c.failed, float64(r.Failed), kind)
		counter(c.seconds, r.Seconds, kind)
	}
	counter(c.reclaimed, float64(t.Reclaimed))
	counter(c.placeholders, float64(t.Placeholders))
	counter(c.freed, float64(t.BytesFreed))
	counter(c.compacted, float64(t.Compacted))
	counter(c.read, float64(t.BytesRead))
	counter(c.copied, float64(t.BytesCopied))
	running := 0.0
	if t.Running {
		running = 1
	}
	ch <- prometheus.MustNewConstMetric(c.running, prometheus.GaugeValue, running)
}
