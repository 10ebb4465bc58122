// Package metrics owns bs3's Prometheus metrics (docs/ARCHITECTURE.md §14):
// the registry, the /metrics HTTP endpoint ([metrics] listen), and the
// collectors that export what the engine's packages count.
//
// Two kinds of source feed it. Events on the I/O paths are counted where
// they happen, through pre-resolved counter and histogram children, so a
// request costs a few atomic adds and no allocation: the device requests
// (a wrapper around the frontends' Device and around the BUSE callbacks)
// and the object store calls (an objproxy.Observer). Everything else is
// read when Prometheus scrapes, by custom collectors calling the getters
// the packages keep (objproxy pools and retries, volume state, chunk
// buffers, read cache counters, GC totals), so the hot paths carry no
// metrics code at all.
//
// The package decides nothing and changes nothing in the engine; it never
// blocks an I/O path (the volume's figures are read at low priority on
// the map goroutine, bounded by statsTimeout).
package metrics

import (
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/cache"
	"github.com/bs3/bs3/internal/chunker"
	"github.com/bs3/bs3/internal/gc"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/volume"
)

// namespace prefixes every bs3 metric.
const namespace = "bs3"

// Metrics is one registry with bs3's metrics. A nil *Metrics is valid and
// does nothing (metrics off): its methods return what they were given, so
// callers need no conditionals.
type Metrics struct {
	reg   *prometheus.Registry
	log   zerolog.Logger
	dev   *deviceMetrics
	store *storeMetrics
}

// New returns a registry holding the Go runtime and process collectors
// and bs3's device and object store families (at zero until I/O starts).
func New(log zerolog.Logger) *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewBuildInfoCollector(),
	)
	m := &Metrics{reg: reg, log: log, dev: newDeviceMetrics(), store: newStoreMetrics()}
	reg.MustRegister(m.dev, m.store)
	return m
}

// Registry is the registry, for tests and further collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus text format. A collector
// that fails (the volume closing during a scrape) is logged and left out;
// the rest is still served.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:      promLogger{m.log},
		ErrorHandling: promhttp.ContinueOnError,
	})
}

// promLogger passes promhttp's errors to zerolog.
type promLogger struct{ log zerolog.Logger }

func (l promLogger) Println(v ...any) {
	l.log.Warn().Msg(fmt.Sprint(v...)) // main named the component
}

// StoreObserver is the objproxy.Observer that counts store calls; nil
// when m is nil, so the proxy skips the call.
func (m *Metrics) StoreObserver() objproxy.Observer {
	if m == nil {
		return nil
	}
	return m.store
}

// Engine is what AddEngine exports; nil fields are left out (no cache,
// the BUSE frontend without a chunker).
type Engine struct {
	Proxy   *objproxy.Proxy
	Volume  *volume.Volume
	Chunker *chunker.Chunker
	Cache   *cache.Cache
	GC      *gc.Collector
}

// AddEngine registers the scrape-time collectors of an attached engine.
// bs3 attaches one volume per process; a second engine is refused (its
// series would collide) and nothing of it is registered.
func (m *Metrics) AddEngine(e Engine) error {
	if m == nil {
		return nil
	}
	var cs []prometheus.Collector
	if e.Proxy != nil {
		cs = append(cs, newPoolCollector(e.Proxy))
	}
	if e.Volume != nil {
		cs = append(cs, newVolumeCollector(e.Volume))
	}
	if e.Chunker != nil {
		cs = append(cs, newChunkerCollector(e.Chunker))
	}
	if e.Cache != nil {
		cs = append(cs, newCacheCollector(e.Cache))
	}
	if e.GC != nil {
		cs = append(cs, newGCCollector(e.GC))
	}
	for i, c := range cs {
		if err := m.reg.Register(c); err != nil {
			for _, r := range cs[:i] {
				m.reg.Unregister(r)
			}
			return fmt.Errorf("register metrics: %w", err)
		}
	}
	return nil
}
