package nbd

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/testutil/logcheck"
)

// The server logs through the component logger it is given (main adds
// "component": "nbd") without adding the field again.
func TestLogComponentOnce(t *testing.T) {
	var buf bytes.Buffer
	log := zerolog.New(&buf).With().Str("component", "nbd").Logger()
	srv, err := New(newTestDevice(t, 1<<20, 4096), Options{Listen: "127.0.0.1:0", Export: "bs3", Logger: log})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := srv.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	var line []byte
	for _, l := range bytes.Split(buf.Bytes(), []byte("\n")) {
		if bytes.Contains(l, []byte("nbd server listening")) {
			line = l
		}
	}
	if line == nil {
		t.Fatalf("no \"nbd server listening\" line in:\n%s", buf.String())
	}
	if n := strings.Count(string(line), `"component"`); n != 1 {
		t.Errorf("component appears %d times in %s", n, line)
	}
	if dups, err := logcheck.DuplicateKeys(line); err != nil || len(dups) > 0 {
		t.Errorf("repeated keys %q (%v) in %s", dups, err, line)
	}
	var fields map[string]any
	if err := json.Unmarshal(line, &fields); err != nil {
		t.Fatal(err)
	}
	if fields["component"] != "nbd" {
		t.Errorf("component = %v in %s", fields["component"], line)
	}
	// Durations carry their unit in the name.
	if _, ok := fields["handshake_timeout_ms"]; !ok {
		t.Errorf("no handshake_timeout_ms in %s", line)
	}
}
