package main

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/testutil/minio"
)

// TestPayloadModeAtStartup: on MinIO over http the daemon probes the store,
// finds that it verifies x-amz-checksum-crc32c, says so in its log and
// leaves no probe object behind; a forced mode is used without probing.
func TestPayloadModeAtStartup(t *testing.T) {
	bin := buildDaemon(t)
	srv := minio.Start(t)
	cases := []struct {
		setting string
		want    []string
	}{
		{"auto", []string{`"payload_mode":"crc32c"`, "the store verifies x-amz-checksum-crc32c"}},
		{"signed", []string{`"payload_mode":"signed"`, "set by configuration, not probed"}},
	}
	for _, c := range cases {
		t.Run(c.setting, func(t *testing.T) {
			bucket := srv.Bucket(t)
			d := shutdownStart(t, bin, "NBD export",
				"BS3_STORE=s3", "BS3_S3_REMOTE="+srv.Endpoint, "BS3_S3_BUCKET="+bucket,
				"BS3_S3_ACCESS_KEY="+srv.AccessKey, "BS3_S3_SECRET_KEY="+srv.SecretKey, "BS3_S3_REGION="+srv.Region,
				"BS3_S3_PREFIX=vol1", "BS3_S3_PAYLOAD_CHECKSUM="+c.setting,
				"BS3_FRONTEND=nbd", "BS3_NBD_LISTEN="+freeAddr(t), "BS3_SIZE=1", "BS3_LOG_LEVEL=info")
			for _, w := range c.want {
				d.logs.waitFor(t, w, 10*time.Second)
			}
			d.signal(t, syscall.SIGTERM)
			if status := d.waitExit(t, 60*time.Second); status != exitOK {
				t.Errorf("exit status %d after SIGTERM, want %d", status, exitOK)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			err := srv.Store(t, bucket).List(ctx, "", func(name string, _ int64) error {
				if strings.Contains(name, "probe") {
					t.Errorf("probe object %q left in the bucket", name)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}
