package config

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

const bs3Fixture = "testdata/bs3-original.toml"

// The original BS3's configuration file loads unchanged, every key with
// its meaning, and the retired key is reported, not dropped silently.
func TestBS3ConfigLoads(t *testing.T) {
	clearEnv(t)
	c, err := Load(bs3Fixture)
	if err != nil {
		t.Fatalf("Load(%s): %v", bs3Fixture, err)
	}
	checks := []struct {
		key       string
		got, want any
	}{
		{"major", c.Major, 1},
		{"threads", c.Threads, 2},
		{"size", c.Size, int64(16)},
		{"block_size", c.BlockSize, 4096},
		{"io_min", c.IOMin, 8192},
		{"io_opt", c.IOOpt, 65536},
		{"scheduler", c.Scheduler, true},
		{"queue_depth", c.QueueDepth, 256},
		{"null", c.Null, false},
		{"profiler", c.Profiler, false},
		{"profiler_port", c.ProfilerPort, 6061},
		{"skip_checkpoint", c.SkipCheckpoint, false},
		{"s3.access_key", c.S3.AccessKey, "fixture-access"},
		{"s3.secret_key", c.S3.SecretKey, "fixture-secret"},
		{"s3.bucket", c.S3.Bucket, "bs3-volume"},
		{"s3.remote", c.S3.Remote, "http://127.0.0.1:9000"},
		{"s3.region", c.S3.Region, "eu-central-1"},
		{"s3.uploaders", c.S3.Uploaders, 384},
		{"s3.downloaders", c.S3.Downloaders, 256},
		{"write.durable", c.Write.Durable, true},
		{"write.shared_buffer_size", c.Write.SharedBufferSize, 64},
		{"write.chunk_size", c.Write.ChunkSize, 8},
		{"write.collision_chunk_size", c.Write.CollisionChunkSize, 2},
		{"read.shared_buffer_size", c.Read.SharedBufferSize, 16},
		{"gc.step", c.GC.Step, int64(1024)},
		{"gc.live_data", c.GC.LiveData, 0.25},
		{"gc.idle_timeout", c.GC.IdleTimeout, 150},
		{"gc.wait", c.GC.Wait, 900},
		{"log.level", c.Log.Level, Level("trace")},
		{"log.pretty", c.Log.Pretty, true},
	}
	for _, ck := range checks {
		if ck.got != ck.want {
			t.Errorf("%s = %#v, want %#v", ck.key, ck.got, ck.want)
		}
	}
	// Same meaning: sizes in GiB and MiB, durations in ms and s.
	if c.SizeBytes() != 16<<30 || c.ChunkBytes() != 8<<20 || c.WriteBufferBytes() != 64<<20 ||
		c.ReadBufferBytes() != 16<<20 || c.CollisionBytes() != 2<<20 {
		t.Errorf("sizes: %d %d %d %d %d", c.SizeBytes(), c.ChunkBytes(), c.WriteBufferBytes(), c.ReadBufferBytes(), c.CollisionBytes())
	}
	if c.GCIdleTimeout().Milliseconds() != 150 || c.GCWait().Seconds() != 900 {
		t.Errorf("durations: %v %v", c.GCIdleTimeout(), c.GCWait())
	}
	if c.LogLevel() != zerolog.TraceLevel {
		t.Errorf("LogLevel = %v, want trace", c.LogLevel())
	}
	// The retired key is a notice, which the daemon logs with its name.
	n := c.Notices()
	if len(n) != 1 || n[0].Key != "cpus_per_node" || !strings.Contains(n[0].Text, "no effect") {
		t.Fatalf("Notices = %+v, want one for cpus_per_node", n)
	}
	var buf bytes.Buffer
	c.LogNotices(zerolog.New(&buf))
	var line map[string]any
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatalf("LogNotices wrote %q: %v", buf.String(), err)
	}
	if line["level"] != "warn" || line["key"] != "cpus_per_node" || !strings.Contains(fmt.Sprint(line["message"]), "cpus_per_node") {
		t.Errorf("LogNotices wrote %s", buf.String())
	}
}

// A typo is still refused next to BS3's keys: accepting BS3's file does
// not make bs3 lax.
func TestBS3ConfigWithTypoRefused(t *testing.T) {
	clearEnv(t)
	raw, err := os.ReadFile(bs3Fixture)
	if err != nil {
		t.Fatal(err)
	}
	body := strings.Replace(string(raw), "cpus_per_node = 4", "cpus_per_nod = 4", 1)
	body = strings.Replace(body, "durable = true", "durable = true\nchunksize = 4", 1)
	p := writeFile(t, body)
	_, err = Load(p)
	if err == nil {
		t.Fatal("accepted cpus_per_nod and write.chunksize")
	}
	for _, want := range []string{p, "unknown key", "cpus_per_nod,", "write.chunksize", "bs3 -h"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not contain %q: %v", want, err)
		}
	}
}

// log.level takes zerolog's numbers -1…5 as BS3 wrote them, and names.
func TestLogLevelNumbersAndNames(t *testing.T) {
	clearEnv(t)
	numbers := map[string]zerolog.Level{
		"-1": zerolog.TraceLevel, "0": zerolog.DebugLevel, "1": zerolog.InfoLevel, "2": zerolog.WarnLevel,
		"3": zerolog.ErrorLevel, "4": zerolog.FatalLevel, "5": zerolog.PanicLevel,
	}
	names := map[string]zerolog.Level{
		`"trace"`: zerolog.TraceLevel, `"debug"`: zerolog.DebugLevel, `"warn"`: zerolog.WarnLevel,
		`"panic"`: zerolog.PanicLevel, `"disabled"`: zerolog.Disabled,
	}
	for _, set := range []map[string]zerolog.Level{numbers, names} {
		for raw, want := range set {
			c, err := Load(writeFile(t, "[s3]\nbucket = \"b\"\n[log]\nlevel = "+raw+"\n"))
			if err != nil {
				t.Errorf("level = %s: %v", raw, err)
				continue
			}
			if c.LogLevel() != want {
				t.Errorf("level = %s: LogLevel = %v, want %v", raw, c.LogLevel(), want)
			}
		}
	}
	// The environment takes numbers too.
	t.Setenv("BS3_LOG_LEVEL", "3")
	c, err := Load(writeFile(t, "[s3]\nbucket = \"b\"\n"))
	if err != nil || c.LogLevel() != zerolog.ErrorLevel || c.Log.Level != "error" {
		t.Errorf("BS3_LOG_LEVEL=3: %v, level %q", err, c.Log.Level)
	}
	t.Setenv("BS3_LOG_LEVEL", "")
	// Out of range, or not a level at all: refused, naming the key and
	// what is allowed.
	for _, raw := range []string{"6", "-2", "7", `"verbose"`, "1.5"} {
		_, err := Load(writeFile(t, "[s3]\nbucket = \"b\"\n[log]\nlevel = "+raw+"\n"))
		if err == nil {
			t.Errorf("accepted level = %s", raw)
			continue
		}
		if !strings.Contains(err.Error(), "log.level") {
			t.Errorf("level = %s: error does not name log.level: %v", raw, err)
		}
		if raw != "1.5" && (!strings.Contains(err.Error(), "-1 (trace) to 5 (panic)") || !strings.Contains(err.Error(), "debug")) {
			t.Errorf("level = %s: error does not say what is allowed: %v", raw, err)
		}
	}
}

// Each of BS3's environment names sets its bs3 key; bs3's own name wins
// when both are set.
func TestBS3EnvironmentNames(t *testing.T) {
	cases := []struct {
		alias, bs3 string
		raw        string
		get        func(Config) any
		want       any
	}{
		{"BS3_BLOCKSIZE", "BS3_BLOCK_SIZE", "512", func(c Config) any { return c.BlockSize }, 512},
		{"BS3_QUEUEDEPTH", "BS3_QUEUE_DEPTH", "64", func(c Config) any { return c.QueueDepth }, 64},
		{"BS3_S3_ACCESSKEY", "BS3_S3_ACCESS_KEY", "ak-from-bs3-env", func(c Config) any { return c.S3.AccessKey }, "ak-from-bs3-env"},
		{"BS3_S3_SECRETKEY", "BS3_S3_SECRET_KEY", "sk-from-bs3-env", func(c Config) any { return c.S3.SecretKey }, "sk-from-bs3-env"},
		{"BS3_WRITE_BUFSIZE", "BS3_WRITE_SHARED_BUFFER_SIZE", "128", func(c Config) any { return c.Write.SharedBufferSize }, 128},
		{"BS3_WRITE_CHUNKSIZE", "BS3_WRITE_CHUNK_SIZE", "16", func(c Config) any { return c.Write.ChunkSize }, 16},
		{"BS3_WRITE_COLSIZE", "BS3_WRITE_COLLISION_CHUNK_SIZE", "2", func(c Config) any { return c.Write.CollisionChunkSize }, 2},
		{"BS3_READ_BUFSIZE", "BS3_READ_SHARED_BUFFER_SIZE", "8", func(c Config) any { return c.Read.SharedBufferSize }, 8},
		{"BS3_GC_LIVEDATA", "BS3_GC_LIVE_DATA", "0.6", func(c Config) any { return c.GC.LiveData }, 0.6},
		{"BS3_GC_IDLETIMEOUT", "BS3_GC_IDLE_TIMEOUT", "75", func(c Config) any { return c.GC.IdleTimeout }, 75},
		{"BS3_SKIP", "BS3_SKIP_CHECKPOINT", "true", func(c Config) any { return c.SkipCheckpoint }, true},
	}
	if len(cases) != 11 {
		t.Fatalf("the issue lists 11 names")
	}
	for _, tc := range cases {
		t.Run(tc.alias, func(t *testing.T) {
			clearEnv(t)
			base, err := read("")
			if err != nil {
				t.Fatal(err)
			}
			if tc.get(base) == tc.want {
				t.Fatalf("test value %v is the default", tc.want)
			}
			t.Setenv(tc.alias, tc.raw)
			c, err := read("")
			if err != nil {
				t.Fatalf("%s=%s: %v", tc.alias, tc.raw, err)
			}
			if got := tc.get(c); got != tc.want {
				t.Errorf("%s=%s: got %v, want %v", tc.alias, tc.raw, got, tc.want)
			}
			// bs3's name wins over BS3's.
			t.Setenv(tc.bs3, fmt.Sprint(tc.get(base)))
			c, err = read("")
			if err != nil {
				t.Fatalf("%s and %s: %v", tc.alias, tc.bs3, err)
			}
			if got := tc.get(c); got != tc.get(base) {
				t.Errorf("%s=%s and %s=%v: got %v, want %s's value", tc.alias, tc.raw, tc.bs3, tc.get(base), got, tc.bs3)
			}
		})
	}
}

// A bad value under a BS3 name is reported with that name, although
// cleanenv names the field's first variable.
func TestBS3EnvironmentBadValueNamesIt(t *testing.T) {
	clearEnv(t)
	t.Setenv("BS3_QUEUEDEPTH", "deep")
	_, err := Load("")
	if err == nil || !strings.Contains(err.Error(), "BS3_QUEUEDEPTH") {
		t.Fatalf("BS3_QUEUEDEPTH=deep: %v, want an error naming BS3_QUEUEDEPTH", err)
	}
}

// Retired keys: accepted in their original type with a notice, refused in
// another type; their variables give a notice too.
func TestRetiredBS3Keys(t *testing.T) {
	clearEnv(t)
	_, err := Load(writeFile(t, "cpus_per_node = \"four\"\n[s3]\nbucket = \"b\"\n"))
	if err == nil || !strings.Contains(err.Error(), "cpus_per_node") || !strings.Contains(err.Error(), "integer") {
		t.Errorf("cpus_per_node = \"four\": %v, want an error naming the key and its type", err)
	}

	c, err := Load(writeFile(t, "[s3]\nbucket = \"b\"\nprofile = \"bs3\"\n"))
	if err != nil {
		t.Fatalf("s3.profile (early BS3): %v", err)
	}
	if n := c.Notices(); len(n) != 1 || n[0].Key != "s3.profile" || !strings.Contains(n[0].Text, "AWS_PROFILE") {
		t.Errorf("Notices = %+v, want one for s3.profile pointing at AWS_PROFILE", n)
	}

	t.Setenv("BS3_CPUS_PER_NODE", "8")
	c, err = Load(writeFile(t, "[s3]\nbucket = \"b\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if n := c.Notices(); len(n) != 1 || n[0].Key != "BS3_CPUS_PER_NODE" {
		t.Errorf("Notices = %+v, want one for BS3_CPUS_PER_NODE", n)
	}
	// Without BS3 settings there is nothing to report.
	t.Setenv("BS3_CPUS_PER_NODE", "")
	clearEnv(t)
	c, err = Load(writeFile(t, "[s3]\nbucket = \"b\"\n"))
	if err != nil || len(c.Notices()) != 0 {
		t.Errorf("plain file: %v, notices %+v", err, c.Notices())
	}
}

// bs3 -h shows BS3's names beside bs3's.
func TestUsageNamesBS3Aliases(t *testing.T) {
	var b bytes.Buffer
	Usage(&b)
	for _, name := range []string{"BS3_BLOCKSIZE", "BS3_QUEUEDEPTH", "BS3_S3_ACCESSKEY", "BS3_S3_SECRETKEY", "BS3_WRITE_BUFSIZE",
		"BS3_WRITE_CHUNKSIZE", "BS3_WRITE_COLSIZE", "BS3_READ_BUFSIZE", "BS3_GC_LIVEDATA", "BS3_GC_IDLETIMEOUT", "BS3_SKIP "} {
		if !strings.Contains(b.String(), name) {
			t.Errorf("Usage does not mention %s", strings.TrimSpace(name))
		}
	}
}
