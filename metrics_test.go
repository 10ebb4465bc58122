package main

import (
	"bytes"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/config"
)

func TestStartMetricsOffByDefault(t *testing.T) {
	m, stop, err := startMetrics(config.Default(), zerolog.Nop())
	if err != nil || m != nil || stop == nil {
		t.Fatalf("default configuration: metrics %v, stop set %v, err %v; want off (nil), a stop, no error", m, stop != nil, err)
	}
	stop()
}

func TestStartMetricsAddressInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cfg := config.Default()
	cfg.Metrics.Listen = l.Addr().String()
	_, _, err = startMetrics(cfg, zerolog.Nop())
	if err == nil {
		t.Fatal("metrics started on an address in use")
	}
	for _, want := range []string{"[metrics] listen", l.Addr().String(), "address in use"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("error %v does not wrap EADDRINUSE", err)
	}
}

// scrapeValue returns the value of one series (name and labels as in
// the exposition, e.g. bs3_device_bytes_total{op="write"}) at url.
func scrapeValue(t *testing.T, url, name string, labels map[string]string) float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse %s: %v", url, err)
	}
	f, ok := fams[name]
	if !ok {
		t.Fatalf("scrape of %s has no %s", url, name)
	}
next:
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			if v, ok := labels[l.GetName()]; ok && v != l.GetValue() {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("scrape of %s has no %s%v", url, name, labels)
	return 0
}

// TestMetricsDaemon runs the bs3 binary: with [metrics] listen on a taken
// address it refuses to start before it touches the volume; with a free
// one, writes through NBD show on /metrics.
func TestMetricsDaemon(t *testing.T) {
	bin := buildDaemon(t)
	dir := t.TempDir()
	objects := filepath.Join(dir, "objects")
	base := []string{"BS3_STORE=dir", "BS3_DIR_PATH=" + objects, "BS3_FRONTEND=nbd", "BS3_SIZE=1", "BS3_LOG_LEVEL=info"}

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cmd := exec.Command(bin, "-c", "")
	cmd.Env = append(os.Environ(), append(base, "BS3_NBD_LISTEN="+freeAddr(t), "BS3_METRICS_LISTEN="+taken.Addr().String())...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitFailure {
		t.Fatalf("bs3 with [metrics] listen in use: %v, want exit status %d\n%s", err, exitFailure, out)
	}
	if !bytes.Contains(out, []byte("[metrics] listen")) || !bytes.Contains(out, []byte("address in use")) {
		t.Errorf("the error does not name [metrics] listen and the cause:\n%s", out)
	}
	if entries, err := os.ReadDir(objects); err == nil && len(entries) > 0 {
		t.Errorf("bs3 touched the volume before failing on the metrics address: %d entries in %s", len(entries), objects)
	}

	nbdAddr, metricsAddr := freeAddr(t), freeAddr(t)
	d := shutdownStart(t, bin, "NBD export", append(base, "BS3_NBD_LISTEN="+nbdAddr, "BS3_METRICS_LISTEN="+metricsAddr)...)
	url := "http://" + metricsAddr + "/metrics"
	write := map[string]string{"op": "write"}
	put := map[string]string{"op": "put"}
	before := scrapeValue(t, url, "bs3_device_bytes_total", write)
	putBefore := scrapeValue(t, url, "bs3_store_bytes_total", put)
	n := shutdownDialNBD(t, nbdAddr, "bs3")
	const size = 64 << 10
	for i := range 3 {
		n.write(t, uint64(i)*size, bytes.Repeat([]byte{byte(i + 1)}, size), i == 2)
	}
	n.flush(t)
	if got := scrapeValue(t, url, "bs3_device_bytes_total", write) - before; got != 3*size {
		t.Errorf("device write bytes grew by %v, want %d", got, 3*size)
	}
	if got := scrapeValue(t, url, "bs3_store_bytes_total", put) - putBefore; got < 3*size {
		t.Errorf("uploaded bytes grew by %v after a FUA write of %d bytes", got, 3*size)
	}
	if g := scrapeValue(t, url, "bs3_volume_generation", nil); g != 1 {
		t.Errorf("generation %v, want 1", g)
	}
	n.disconnect(t)
	d.signal(t, syscall.SIGTERM)
	if st := d.waitExit(t, 60*time.Second); st != exitOK {
		t.Fatalf("exit status %d after SIGTERM", st)
	}
	if resp, err := http.Get(url); err == nil {
		resp.Body.Close()
		t.Error("metrics still served after bs3 exited")
	}
}
