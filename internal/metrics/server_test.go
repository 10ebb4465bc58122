package metrics

import (
	"context"
	"errors"
	"net/http"
	"syscall"
	"testing"

	"github.com/rs/zerolog"
)

func TestServer(t *testing.T) {
	m := New(zerolog.Nop())
	s, err := Listen("127.0.0.1:0", m)
	if err != nil {
		t.Fatal(err)
	}
	got := scrape(t, "http://"+s.Addr()+Path)
	if got["go_goroutines"] <= 0 {
		t.Error("no go_goroutines: the Go collector is missing")
	}
	if _, ok := got["process_open_fds"]; !ok {
		t.Error("no process_open_fds: the process collector is missing")
	}
	got.want(t, sample{`bs3_device_requests_total{op="write"}`: 0, `bs3_store_bytes_total{op="put"}`: 0})

	for _, p := range []string{"/", "/debug/pprof/"} {
		resp, err := http.Get("http://" + s.Addr() + p)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: %s, want 404 (only %s is served)", p, resp.Status, Path)
		}
	}

	// The address is taken: a second server fails at once.
	if _, err := Listen(s.Addr(), m); !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("second Listen on %s: %v, want EADDRINUSE", s.Addr(), err)
	}

	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.Get("http://" + s.Addr() + Path); err == nil {
		resp.Body.Close()
		t.Error("still serving after Close")
	}
}
