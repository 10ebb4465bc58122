package metrics

import (
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// sample is every series of a scrape, keyed `name{k="v",...}` with the
// labels sorted; a histogram gives name_count and name_sum.
type sample map[string]float64

func flatten(fams map[string]*dto.MetricFamily) sample {
	out := sample{}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			sort.Strings(ls)
			key := func(n string) string {
				if len(ls) == 0 {
					return n
				}
				return n + "{" + strings.Join(ls, ",") + "}"
			}
			switch {
			case m.Counter != nil:
				out[key(name)] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				out[key(name)] = m.GetGauge().GetValue()
			case m.Untyped != nil:
				out[key(name)] = m.GetUntyped().GetValue()
			case m.Histogram != nil:
				out[key(name+"_count")] = float64(m.GetHistogram().GetSampleCount())
				out[key(name+"_sum")] = m.GetHistogram().GetSampleSum()
			}
		}
	}
	return out
}

// gather collects reg, failing the test on a collection error.
func gather(t *testing.T, reg prometheus.Gatherer) sample {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	m := make(map[string]*dto.MetricFamily, len(fams))
	for _, f := range fams {
		m[f.GetName()] = f
	}
	return flatten(m)
}

// collect gathers the single collector c in a registry of its own.
func collect(t *testing.T, c prometheus.Collector) sample {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		t.Fatalf("register: %v", err)
	}
	return gather(t, reg)
}

// scrape fetches url over HTTP and parses the text exposition format.
func scrape(t *testing.T, url string) sample {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("scrape %s: %s: %s", url, resp.Status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse the scrape of %s: %v", url, err)
	}
	return flatten(fams)
}

// want checks each series of w against s.
func (s sample) want(t *testing.T, w sample) {
	t.Helper()
	for k, v := range w {
		got, ok := s[k]
		switch {
		case !ok:
			t.Errorf("no series %s", k)
		case got != v:
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
}
