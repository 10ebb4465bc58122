package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bs3/bs3/internal/objproxy"
)

// storeBuckets span a small GET on loopback (1 ms) to the proxy's 60 s
// attempt timeout.
var storeBuckets = prometheus.ExponentialBuckets(0.001, 2.5, 13) // 1ms … 60s

// storeMetrics counts every store call the object proxy makes; it is the
// proxy's objproxy.Observer. Children are resolved up front and indexed
// by operation and outcome.
type storeMetrics struct {
	reqs  *prometheus.CounterVec
	dur   *prometheus.HistogramVec
	bytes *prometheus.CounterVec

	calls  [objproxy.NumOps][objproxy.NumOutcomes]prometheus.Counter
	timing [objproxy.NumOps]prometheus.Observer
	moved  [objproxy.NumOps]prometheus.Counter // nil but for put and get
}

func newStoreMetrics() *storeMetrics {
	s := &storeMetrics{
		reqs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "store", Name: "requests_total",
			Help: "Object store calls (every attempt, retries included), by operation and outcome (ok, not_found, exists, error, canceled).",
		}, []string{"op", "outcome"}),
		dur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "store", Name: "request_duration_seconds",
			Help:    "Duration of one object store call, by operation (any outcome).",
			Buckets: storeBuckets,
		}, []string{"op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "store", Name: "bytes_total",
			Help: "Bytes moved by successful object store calls: uploaded (op put) and downloaded (op get).",
		}, []string{"op"}),
	}
	for op := range objproxy.NumOps {
		name := objproxy.Op(op).String()
		s.timing[op] = s.dur.WithLabelValues(name)
		for o := range objproxy.NumOutcomes {
			s.calls[op][o] = s.reqs.WithLabelValues(name, objproxy.Outcome(o).String())
		}
	}
	s.moved[objproxy.OpPut] = s.bytes.WithLabelValues(objproxy.OpPut.String())
	s.moved[objproxy.OpGet] = s.bytes.WithLabelValues(objproxy.OpGet.String())
	return s
}

// StoreCall implements objproxy.Observer.
func (s *storeMetrics) StoreCall(op objproxy.Op, outcome objproxy.Outcome, bytes int, took time.Duration) {
	if int(op) >= objproxy.NumOps || int(outcome) >= objproxy.NumOutcomes {
		return
	}
	s.calls[op][outcome].Inc()
	s.timing[op].Observe(took.Seconds())
	if c := s.moved[op]; c != nil && bytes > 0 {
		c.Add(float64(bytes))
	}
}

func (s *storeMetrics) Describe(ch chan<- *prometheus.Desc) {
	s.reqs.Describe(ch)
	s.dur.Describe(ch)
	s.bytes.Describe(ch)
}

func (s *storeMetrics) Collect(ch chan<- prometheus.Metric) {
	s.reqs.Collect(ch)
	s.dur.Collect(ch)
	s.bytes.Collect(ch)
}

// proxySource is what poolCollector reads of the object proxy.
type proxySource interface {
	Stats() objproxy.Stats
	Pools() (upload, download objproxy.PoolStats)
}

// poolCollector reads the object proxy's retry counters and pool state
// at scrape time.
type poolCollector struct {
	p                                  proxySource
	retries, failures                  *prometheus.Desc
	inFlight, queued, waiting, workers *prometheus.Desc
}

func newPoolCollector(p proxySource) *poolCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "store", name), help, labels, nil)
	}
	return &poolCollector{
		p:        p,
		retries:  d("retries_total", "Object store calls that failed and were retried after a backoff, by operation.", "op"),
		failures: d("failures_total", "Object store requests given up after failed attempts (caller's context ended, attempts ran out, proxy closed), by operation.", "op"),
		inFlight: d("requests_in_flight", "Object store calls in progress, by pool (upload: put and delete; download: get, size and list).", "pool"),
		queued:   d("queue_depth", "Object store requests waiting for a worker, by pool and priority (high: user I/O; low: checkpoints, GC, readahead).", "pool", "priority"),
		waiting:  d("retry_waiting", "Object store requests waiting out a backoff before their next attempt, by pool.", "pool"),
		workers:  d("workers", "Workers of each object proxy pool (s3.uploaders, s3.downloaders).", "pool"),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.retries, c.failures, c.inFlight, c.queued, c.waiting, c.workers} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.p.Stats()
	for _, o := range []struct {
		op objproxy.Op
		s  objproxy.OpStats
	}{{objproxy.OpPut, st.Put}, {objproxy.OpGet, st.Get}, {objproxy.OpDelete, st.Delete}, {objproxy.OpSize, st.Size}, {objproxy.OpList, st.List}} {
		ch <- prometheus.MustNewConstMetric(c.retries, prometheus.CounterValue, float64(o.s.Retries), o.op.String())
		ch <- prometheus.MustNewConstMetric(c.failures, prometheus.CounterValue, float64(o.s.Failures), o.op.String())
	}
	up, down := c.p.Pools()
	for _, p := range []struct {
		name string
		s    objproxy.PoolStats
	}{{"upload", up}, {"download", down}} {
		ch <- prometheus.MustNewConstMetric(c.inFlight, prometheus.GaugeValue, float64(p.s.Running), p.name)
		ch <- prometheus.MustNewConstMetric(c.queued, prometheus.GaugeValue, float64(p.s.QueuedHigh), p.name, "high")
		ch <- prometheus.MustNewConstMetric(c.queued, prometheus.GaugeValue, float64(p.s.QueuedLow), p.name, "low")
		ch <- prometheus.MustNewConstMetric(c.waiting, prometheus.GaugeValue, float64(p.s.RetryWaiting), p.name)
		ch <- prometheus.MustNewConstMetric(c.workers, prometheus.GaugeValue, float64(p.s.Workers), p.name)
	}
}
