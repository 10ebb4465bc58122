package metrics

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// exportedFamilies returns the name of every family bs3 registers, from
// the collectors' own descriptions (each source faked).
func exportedFamilies(t *testing.T) map[string]bool {
	t.Helper()
	m := New(zerolog.Nop())
	ch := make(chan *prometheus.Desc, 256)
	go func() {
		for _, c := range []prometheus.Collector{m.dev, m.store, newPoolCollector(fakeProxy{}), newVolumeCollector(fakeVolume{}),
			newChunkerCollector(fakeBuffers{}), newCacheCollector(fakeCache{}), newGCCollector(fakeGC{})} {
			c.Describe(ch)
		}
		close(ch)
	}()
	names := map[string]bool{}
	fq := regexp.MustCompile(`fqName: "([^"]+)"`)
	for d := range ch {
		sm := fq.FindStringSubmatch(d.String())
		if sm == nil {
			t.Fatalf("cannot read the name of %v", d)
		}
		names[sm[1]] = true
	}
	return names
}

// TestDashboardUsesExportedMetrics: every bs3 metric the Grafana dashboard
// queries exists, and every family is documented in the architecture doc.
func TestDashboardUsesExportedMetrics(t *testing.T) {
	names := exportedFamilies(t)
	raw, err := os.ReadFile("../../contrib/grafana/bs3.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string
			Type    string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("contrib/grafana/bs3.json: %v", err)
	}
	ident := regexp.MustCompile(`bs3_[a-z_]+`)
	used := 0
	for _, p := range dash.Panels {
		if p.Type != "row" && len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			for _, n := range ident.FindAllString(tg.Expr, -1) {
				used++
				base := n
				for _, suf := range []string{"_bucket", "_sum", "_count"} {
					if b, ok := strings.CutSuffix(n, suf); ok && names[b] {
						base = b
					}
				}
				if !names[base] {
					t.Errorf("panel %q queries %s, which bs3 does not export", p.Title, n)
				}
			}
		}
	}
	if used == 0 {
		t.Fatal("the dashboard queries no bs3 metric")
	}

	doc, err := os.ReadFile("../../docs/ARCHITECTURE.md")
	if err != nil {
		t.Fatal(err)
	}
	for n := range names {
		if !strings.Contains(string(doc), "`"+n+"`") && !strings.Contains(string(doc), "`"+n+"{") {
			t.Errorf("%s is not in the metrics table of docs/ARCHITECTURE.md", n)
		}
	}
}
