package minio_test

import (
	"context"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/testutil/minio"
)

// S3 bucket naming rules (the subset that matters: length, characters,
// alphanumeric ends).
var validBucket = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$`)

func TestBucketNames(t *testing.T) {
	srv := &minio.Server{} // Bucket needs no running server
	seen := map[string]bool{}
	for _, name := range []string{"Simple", "With Spaces_and/Slashes", "--", strings.Repeat("VeryLong", 20)} {
		t.Run(name, func(t *testing.T) {
			for range 3 {
				b := srv.Bucket(t)
				if !validBucket.MatchString(b) || strings.Contains(b, "--") {
					t.Errorf("invalid bucket name %q", b)
				}
				if seen[b] {
					t.Errorf("bucket name %q returned twice", b)
				}
				seen[b] = true
			}
		})
	}
}

func TestStartKillRestart(t *testing.T) {
	srv := minio.Start(t)
	live := func() error {
		c := &http.Client{Timeout: 5 * time.Second}
		resp, err := c.Get(srv.Endpoint + "/minio/health/live")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("health: %s", resp.Status)
		}
		return nil
	}
	if err := live(); err != nil {
		t.Fatalf("server not live after Start: %v", err)
	}
	st := srv.Store(t, srv.Bucket(t))
	ctx := context.Background()
	if err := st.Put(ctx, "k", []byte("kept"), false); err != nil {
		t.Fatal(err)
	}
	// Starting and serving took the server some CPU, and it reports it.
	if cpu, err := srv.CPUSeconds(); err != nil || cpu <= 0 {
		t.Fatalf("CPUSeconds of a running server: %v, %v; want > 0", cpu, err)
	}
	srv.Kill()
	if err := live(); err == nil {
		t.Fatal("server still answers after Kill")
	}
	srv.Kill() // idempotent
	srv.Restart(t)
	buf := make([]byte, 4)
	if n, err := st.GetRange(ctx, "k", 0, buf); err != nil || string(buf[:n]) != "kept" {
		t.Fatalf("after Restart read %q, %v; want the object written before", buf[:n], err)
	}
}
