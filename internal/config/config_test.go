package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/rs/zerolog"
)

// tomlKey is one leaf key of Config as the test sees it: derived from the
// toml tags alone, independently of the package's own walker.
type tomlKey struct {
	key   string // "write.chunk_size"
	index []int  // reflect field index path
	kind  reflect.Kind
}

func tomlKeys(t *testing.T) []tomlKey {
	t.Helper()
	var out []tomlKey
	ct := reflect.TypeOf(Config{})
	for i := 0; i < ct.NumField(); i++ {
		f := ct.Field(i)
		if !f.IsExported() {
			continue // not a key
		}
		name := f.Tag.Get("toml")
		if name == "" {
			t.Fatalf("field %s has no toml tag", f.Name)
		}
		if f.Type.Kind() != reflect.Struct {
			out = append(out, tomlKey{name, []int{i}, f.Type.Kind()})
			continue
		}
		for j := 0; j < f.Type.NumField(); j++ {
			g := f.Type.Field(j)
			if g.Tag.Get("toml") == "" {
				t.Fatalf("field %s.%s has no toml tag", f.Name, g.Name)
			}
			out = append(out, tomlKey{name + "." + g.Tag.Get("toml"), []int{i, j}, g.Type.Kind()})
		}
	}
	if len(out) < 40 {
		t.Fatalf("found only %d keys; reflection is broken", len(out))
	}
	return out
}

// envName is the documented naming rule: BS3_ + upper-case key, section
// included, dots as underscores.
func envName(key string) string {
	return "BS3_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "bs3.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// clearEnv unsets every BS3_* variable for the test, so the machine's
// environment cannot leak into the results.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "BS3_") {
			t.Setenv(name, "") // registers restoration
			os.Unsetenv(name)
		}
	}
}

func TestDefaultsForMinimalFile(t *testing.T) {
	clearEnv(t)
	c, err := Load(writeFile(t, "[s3]\nbucket = \"b\"\n"))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	checks := []struct {
		key       string
		got, want any
	}{
		{"major", c.Major, 0},
		{"threads", c.Threads, 0},
		{"size", c.Size, int64(8)},
		{"block_size", c.BlockSize, 4096},
		{"io_min", c.IOMin, 0},
		{"io_opt", c.IOOpt, 0},
		{"scheduler", c.Scheduler, false},
		{"queue_depth", c.QueueDepth, 128},
		{"null", c.Null, false},
		{"profiler", c.Profiler, false},
		{"profiler_port", c.ProfilerPort, 6060},
		{"skip_checkpoint", c.SkipCheckpoint, false},
		{"shutdown_timeout", c.ShutdownTimeout, 60},
		{"frontend", c.Frontend, "buse"},
		{"store", c.Store, "s3"},
		{"s3.access_key", c.S3.AccessKey, ""},
		{"s3.secret_key", c.S3.SecretKey, ""},
		{"s3.bucket", c.S3.Bucket, "b"},
		{"s3.remote", c.S3.Remote, ""},
		{"s3.region", c.S3.Region, "us-east-1"},
		{"s3.uploaders", c.S3.Uploaders, 16},
		{"s3.downloaders", c.S3.Downloaders, 16},
		{"s3.prefix", c.S3.Prefix, ""},
		{"s3.conditional_writes", c.S3.ConditionalWrites, true},
		{"s3.payload_checksum", c.S3.PayloadChecksum, "auto"},
		{"write.durable", c.Write.Durable, false},
		{"write.shared_buffer_size", c.Write.SharedBufferSize, 32},
		{"write.chunk_size", c.Write.ChunkSize, 4},
		{"write.collision_chunk_size", c.Write.CollisionChunkSize, 1},
		{"read.shared_buffer_size", c.Read.SharedBufferSize, 32},
		{"gc.step", c.GC.Step, int64(1048576)},
		{"gc.live_data", c.GC.LiveData, 0.3},
		{"gc.idle_timeout", c.GC.IdleTimeout, 200},
		{"gc.wait", c.GC.Wait, 600},
		{"gc.defrag_range", c.GC.DefragRange, ""},
		{"log.level", c.Log.Level, Level("info")},
		{"log.pretty", c.Log.Pretty, false},
		{"checkpoint.interval", c.Checkpoint.Interval, 300},
		{"checkpoint.objects", c.Checkpoint.Objects, 1024},
		{"nbd.listen", c.NBD.Listen, "127.0.0.1:10809"},
		{"nbd.export", c.NBD.Export, "bs3"},
		{"nbd.handshake_timeout", c.NBD.HandshakeTimeout, 10},
		{"nbd.max_connections", c.NBD.MaxConnections, 16},
		{"nbd.max_buffered", c.NBD.MaxBuffered, 256},
		{"nbd.tls", c.NBD.TLS, "off"},
		{"nbd.tls_cert", c.NBD.TLSCert, ""},
		{"nbd.tls_key", c.NBD.TLSKey, ""},
		{"nbd.tls_ca", c.NBD.TLSCA, ""},
		{"nbd.socket_group", c.NBD.SocketGroup, ""},
		{"fuse.mountpoint", c.FUSE.Mountpoint, "/run/bs3/fuse"},
		{"fuse.loop", c.FUSE.Loop, true},
		{"dir.path", c.Dir.Path, "/var/lib/bs3/objects"},
		{"cache.memory_size", c.Cache.MemorySize, 256},
		{"cache.fetch_size", c.Cache.FetchSize, 256},
		{"cache.dir", c.Cache.Dir, ""},
		{"cache.disk_size", c.Cache.DiskSize, 10},
		{"metrics.listen", c.Metrics.Listen, ""},
		{"encryption.key_file", c.Encryption.KeyFile, ""},
		{"encryption.passphrase_file", c.Encryption.PassphraseFile, ""},
		{"integrity.checksums", c.Integrity.Checksums, true},
		{"compression.codec", c.Compression.Codec, "none"},
		{"compression.level", c.Compression.Level, "fastest"},
	}
	for _, ck := range checks {
		if ck.got != ck.want {
			t.Errorf("%s = %#v, want %#v", ck.key, ck.got, ck.want)
		}
	}
	if len(checks) != len(tomlKeys(t)) {
		t.Errorf("checked %d keys, Config has %d: add the new key's default here", len(checks), len(tomlKeys(t)))
	}

	// The accessors convert units.
	if got := c.SizeBytes(); got != 8<<30 {
		t.Errorf("SizeBytes = %d", got)
	}
	if got := c.Blocks(); got != (8<<30)/4096 {
		t.Errorf("Blocks = %d", got)
	}
	if got := c.ChunkBytes(); got != 4<<20 {
		t.Errorf("ChunkBytes = %d", got)
	}
	if got := c.ChunkBlocks(); got != 1024 {
		t.Errorf("ChunkBlocks = %d", got)
	}
	if got := c.WriteBufferBytes(); got != 32<<20 {
		t.Errorf("WriteBufferBytes = %d", got)
	}
	if got := c.ReadBufferBytes(); got != 32<<20 {
		t.Errorf("ReadBufferBytes = %d", got)
	}
	if got := c.CollisionBytes(); got != 1<<20 {
		t.Errorf("CollisionBytes = %d", got)
	}
	if c.IOMinBytes() != 4096 || c.IOOptBytes() != 4096 {
		t.Errorf("IOMinBytes, IOOptBytes = %d, %d, want block size", c.IOMinBytes(), c.IOOptBytes())
	}
	if c.ThreadCount() < 1 {
		t.Errorf("ThreadCount = %d", c.ThreadCount())
	}
	if c.GCIdleTimeout() != 200*time.Millisecond || c.GCWait() != 10*time.Minute || c.CheckpointInterval() != 5*time.Minute {
		t.Errorf("durations: %v %v %v", c.GCIdleTimeout(), c.GCWait(), c.CheckpointInterval())
	}
	if c.LogLevel() != zerolog.InfoLevel {
		t.Errorf("LogLevel = %v", c.LogLevel())
	}
}

func TestEnvironmentOverridesFile(t *testing.T) {
	clearEnv(t)
	p := writeFile(t, `
size = 10
[s3]
bucket = "from-file"
conditional_writes = true
[gc]
live_data = 0.2
[write]
chunk_size = 8
[fuse]
loop = false
`)
	t.Setenv("BS3_SIZE", "20")
	t.Setenv("BS3_S3_BUCKET", "from-env")
	t.Setenv("BS3_S3_CONDITIONAL_WRITES", "false")
	t.Setenv("BS3_GC_LIVE_DATA", "0.5")
	t.Setenv("BS3_WRITE_CHUNK_SIZE", "2")
	c, err := Load(p)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if c.Size != 20 || c.S3.Bucket != "from-env" || c.S3.ConditionalWrites || c.GC.LiveData != 0.5 || c.Write.ChunkSize != 2 {
		t.Errorf("environment did not override the file: %+v", c.Redacted())
	}
	// A false in the file must survive although its default is true (the
	// cleanenv env-default trap).
	if c.FUSE.Loop {
		t.Errorf("fuse.loop = false in the file came back as true")
	}
	// Without a file, the environment still applies.
	c, err = Load("")
	if err != nil {
		t.Fatalf("Load(\"\"): %v", err)
	}
	if c.Size != 20 || c.S3.Bucket != "from-env" || c.GC.Wait != 600 {
		t.Errorf("Load(\"\") = size %d bucket %q gc.wait %d", c.Size, c.S3.Bucket, c.GC.Wait)
	}
}

// TestEveryKeyHasItsEnvironmentVariable sets BS3_<KEY> for each key in
// turn and checks that exactly that key changes.
func TestEveryKeyHasItsEnvironmentVariable(t *testing.T) {
	clearEnv(t)
	base, err := read("")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range tomlKeys(t) {
		t.Run(k.key, func(t *testing.T) {
			old := reflect.ValueOf(base).FieldByIndex(k.index)
			var raw string
			var want any
			switch k.kind {
			case reflect.Bool:
				want = !old.Bool()
				raw = fmt.Sprint(want)
			case reflect.Int, reflect.Int64:
				want = old.Int() + 7
				raw = fmt.Sprint(want)
			case reflect.Float64:
				want = old.Float() + 0.25
				raw = fmt.Sprint(want)
			case reflect.String:
				want = old.String() + "-env"
				raw = want.(string)
			default:
				t.Fatalf("kind %v not handled by the test", k.kind)
			}
			t.Setenv(envName(k.key), raw)
			c, err := read("")
			if err != nil {
				t.Fatalf("read with %s=%s: %v", envName(k.key), raw, err)
			}
			got := reflect.ValueOf(c).FieldByIndex(k.index)
			var g any
			switch k.kind {
			case reflect.Bool:
				g = got.Bool()
			case reflect.Int, reflect.Int64:
				g = got.Int()
			case reflect.Float64:
				g = got.Float()
			default:
				g = got.String()
			}
			if g != want {
				t.Fatalf("%s=%s: %s = %v, want %v", envName(k.key), raw, k.key, g, want)
			}
			// No other key moved.
			reflect.ValueOf(&c).Elem().FieldByIndex(k.index).Set(old)
			if !reflect.DeepEqual(c, base) {
				t.Fatalf("%s changed other keys too", envName(k.key))
			}
		})
	}
}

func TestBadEnvironmentValue(t *testing.T) {
	clearEnv(t)
	t.Setenv("BS3_S3_BUCKET", "b")
	t.Setenv("BS3_QUEUE_DEPTH", "lots")
	_, err := Load("")
	if err == nil || !strings.Contains(err.Error(), "BS3_QUEUE_DEPTH") {
		t.Fatalf("Load with BS3_QUEUE_DEPTH=lots: %v, want an error naming the variable", err)
	}
}

// valid is a configuration that passes Validate.
func valid() Config {
	c := Default()
	c.S3.Bucket = "b"
	return c
}

// worldReadable is a key file every user can read.
func worldReadable(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "tls.key")
	if err := os.WriteFile(p, []byte("key"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o644); err != nil { // whatever the umask
		t.Fatal(err)
	}
	return p
}

func TestValidateRefusals(t *testing.T) {
	if err := valid().Validate(); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	cases := []struct {
		name  string
		mut   func(*Config)
		key   string // as in the file
		value string // as it must appear in the message
		also  string // another word the message must contain, if any
	}{
		{"block size", func(c *Config) { c.BlockSize = 1024 }, "block_size", "1024", "4096"},
		{"size zero", func(c *Config) { c.Size = 0 }, "size", "0", ""},
		{"size negative", func(c *Config) { c.Size = -3 }, "size", "-3", ""},
		{"chunk zero", func(c *Config) { c.Write.ChunkSize = 0 }, "write.chunk_size", "0", ""},
		{"chunk above buffer", func(c *Config) { c.Write.ChunkSize = 64 }, "write.chunk_size", "64", "write.shared_buffer_size"},
		{"buffer not multiple", func(c *Config) { c.Write.SharedBufferSize = 30 }, "write.shared_buffer_size", "30", "write.chunk_size"},
		{"buffer zero", func(c *Config) { c.Write.SharedBufferSize = 0 }, "write.shared_buffer_size", "0", ""},
		{"chunk 16 bits at 4096", func(c *Config) { c.Write.ChunkSize = 256; c.Write.SharedBufferSize = 256 }, "write.chunk_size", "256", "16 bits"},
		{"chunk 16 bits at 512", func(c *Config) { c.BlockSize = 512 }, "", "", ""}, // valid: 4 MiB = 8192 blocks
		{"chunk 16 bits at 512 big", func(c *Config) { c.BlockSize = 512; c.Write.ChunkSize = 32 }, "write.chunk_size", "32", "16 bits"},
		{"collision zero", func(c *Config) { c.Write.CollisionChunkSize = 0 }, "write.collision_chunk_size", "0", ""},
		{"read buffer zero", func(c *Config) { c.Read.SharedBufferSize = 0 }, "read.shared_buffer_size", "0", ""},
		{"io_min not power of two", func(c *Config) { c.IOMin = 12288 }, "io_min", "12288", "power of two"},
		{"io_min below block", func(c *Config) { c.IOMin = 2048 }, "io_min", "2048", "block_size"},
		{"io_opt not power of two", func(c *Config) { c.IOOpt = 5000 }, "io_opt", "5000", "power of two"},
		{"io_opt negative", func(c *Config) { c.IOOpt = -4096 }, "io_opt", "-4096", ""},
		{"queue depth", func(c *Config) { c.QueueDepth = 0 }, "queue_depth", "0", ""},
		{"shutdown timeout", func(c *Config) { c.ShutdownTimeout = 0 }, "shutdown_timeout", "0", ""},
		{"uploaders", func(c *Config) { c.S3.Uploaders = 0 }, "s3.uploaders", "0", ""},
		{"downloaders", func(c *Config) { c.S3.Downloaders = -1 }, "s3.downloaders", "-1", ""},
		{"live data one", func(c *Config) { c.GC.LiveData = 1 }, "gc.live_data", "1", ""},
		{"live data zero", func(c *Config) { c.GC.LiveData = 0 }, "gc.live_data", "0", ""},
		{"live data above", func(c *Config) { c.GC.LiveData = 1.5 }, "gc.live_data", "1.5", ""},
		{"gc step", func(c *Config) { c.GC.Step = 0 }, "gc.step", "0", ""},
		{"gc wait", func(c *Config) { c.GC.Wait = 0 }, "gc.wait", "0", ""},
		{"cache fetch not a power of two", func(c *Config) { c.Cache.FetchSize = 12 }, "cache.fetch_size", "12", ""},
		{"cache fetch too large", func(c *Config) { c.Cache.FetchSize = 8192 }, "cache.fetch_size", "8192", ""},
		{"cache memory negative", func(c *Config) { c.Cache.MemorySize = -1 }, "cache.memory_size", "-1", ""},
		{"cache dir without memory", func(c *Config) { c.Cache.Dir = "/x"; c.Cache.MemorySize = 0 }, "cache.dir", `"/x"`, ""},
		{"cache disk size zero", func(c *Config) { c.Cache.Dir = "/x"; c.Cache.DiskSize = 0 }, "cache.disk_size", "0", ""},
		{"gc idle timeout", func(c *Config) { c.GC.IdleTimeout = -5 }, "gc.idle_timeout", "-5", ""},
		{"checkpoint interval", func(c *Config) { c.Checkpoint.Interval = 0 }, "checkpoint.interval", "0", ""},
		{"checkpoint objects", func(c *Config) { c.Checkpoint.Objects = -2 }, "checkpoint.objects", "-2", ""},
		{"frontend", func(c *Config) { c.Frontend = "iscsi" }, "frontend", `"iscsi"`, "nbd"},
		{"store", func(c *Config) { c.Store = "gcs" }, "store", `"gcs"`, "dir"},
		{"log level", func(c *Config) { c.Log.Level = "verbose" }, "log.level", `"verbose"`, "debug"},
		{"payload checksum", func(c *Config) { c.S3.PayloadChecksum = "sha1" }, "s3.payload_checksum", `"sha1"`, "crc32c"},
		{"bucket empty", func(c *Config) { c.S3.Bucket = "" }, "s3.bucket", `""`, "required"},
		{"bucket empty but null", func(c *Config) { c.S3.Bucket = ""; c.Null = true }, "", "", ""},
		{"bucket empty but dir", func(c *Config) { c.S3.Bucket = ""; c.Store = "dir" }, "", "", ""},
		{"remote not a URL", func(c *Config) { c.S3.Remote = "127.0.0.1:9000" }, "s3.remote", `"127.0.0.1:9000"`, "http"},
		{"dir path empty", func(c *Config) { c.Store = "dir"; c.Dir.Path = "" }, "dir.path", `""`, "required"},
		{"nbd listen empty", func(c *Config) { c.Frontend = "nbd"; c.NBD.Listen = "" }, "nbd.listen", `""`, "required"},
		{"nbd listen bad", func(c *Config) { c.Frontend = "nbd"; c.NBD.Listen = "localhost" }, "nbd.listen", `"localhost"`, "host:port"},
		{"nbd listen unix", func(c *Config) { c.Frontend = "nbd"; c.NBD.Listen = "unix:/run/bs3.sock" }, "", "", ""},
		{"nbd listen ignored for buse", func(c *Config) { c.NBD.Listen = "" }, "", "", ""},
		{"metrics listen no port", func(c *Config) { c.Metrics.Listen = "127.0.0.1" }, "metrics.listen", `"127.0.0.1"`, "host:port"},
		{"metrics listen bad port", func(c *Config) { c.Metrics.Listen = "127.0.0.1:http" }, "metrics.listen", `"127.0.0.1:http"`, "0..65535"},
		{"metrics listen port too big", func(c *Config) { c.Metrics.Listen = ":70000" }, "metrics.listen", `":70000"`, "0..65535"},
		{"metrics listen", func(c *Config) { c.Metrics.Listen = "127.0.0.1:9101" }, "", "", ""},
		{"metrics listen all interfaces", func(c *Config) { c.Metrics.Listen = ":9101" }, "", "", ""},
		{"nbd max connections zero", func(c *Config) { c.NBD.MaxConnections = 0 }, "nbd.max_connections", "0", ""},
		{"nbd handshake timeout zero", func(c *Config) { c.NBD.HandshakeTimeout = 0 }, "nbd.handshake_timeout", "0", ""},
		{"fuse mountpoint empty", func(c *Config) { c.Frontend = "fuse"; c.FUSE.Mountpoint = "" }, "fuse.mountpoint", `""`, "required"},
		{"nbd tls unknown", func(c *Config) { c.NBD.TLS = "maybe" }, "nbd.tls", `"maybe"`, "require"},
		{"nbd tls without cert", func(c *Config) { c.NBD.TLS = "require"; c.NBD.TLSKey = "/k" }, "nbd.tls_cert", `""`, "required"},
		{"nbd tls without key", func(c *Config) { c.NBD.TLS = "on"; c.NBD.TLSCert = "/c" }, "nbd.tls_key", `""`, "required"},
		{"nbd tls ca without tls", func(c *Config) { c.NBD.TLSCA = "/ca" }, "nbd.tls_ca", `"/ca"`, "require"},
		{"nbd tls fine", func(c *Config) { c.NBD.TLS = "require"; c.NBD.TLSCert = "/c"; c.NBD.TLSKey = "/k"; c.NBD.TLSCA = "/ca" }, "", "", ""},
		{"nbd tls key world-readable", func(c *Config) {
			c.NBD.TLS, c.NBD.TLSCert, c.NBD.TLSKey = "on", "/c", worldReadable(t)
		}, "nbd.tls_key", "tls.key", "chmod"},
		{"ublk", func(c *Config) { c.Frontend = "ublk"; c.Major = 3; c.Threads = 2; c.QueueDepth = 4096 }, "", "", ""},
		{"ublk queue depth", func(c *Config) { c.Frontend = "ublk"; c.QueueDepth = 4097 }, "queue_depth", "4097", "4096"},
		{"ublk threads", func(c *Config) { c.Frontend = "ublk"; c.Threads = 5000 }, "threads", "5000", "ublk queues"},
		{"ublk major", func(c *Config) { c.Frontend = "ublk"; c.Major = 1 << 20 }, "major", "1048576", "1048575"},
		{"profiler port zero", func(c *Config) { c.ProfilerPort = 0 }, "profiler_port", "0", "65535"},
		{"profiler port high", func(c *Config) { c.ProfilerPort = 70000 }, "profiler_port", "70000", "65535"},
		{"threads negative", func(c *Config) { c.Threads = -1 }, "threads", "-1", ""},
		{"largest chunk", func(c *Config) { c.Write.ChunkSize = 255; c.Write.SharedBufferSize = 255 }, "", "", ""},
		{"io sizes fine", func(c *Config) { c.IOMin = 4096; c.IOOpt = 1 << 20 }, "", "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := valid()
			tc.mut(&c)
			err := c.Validate()
			if tc.key == "" {
				if err != nil {
					t.Fatalf("refused a valid configuration: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted %s = %s", tc.key, tc.value)
			}
			// One line names the key (as a whole word at the start) and the
			// value, and says what is allowed.
			var line string
			for _, l := range strings.Split(err.Error(), "\n") {
				if strings.HasPrefix(l, tc.key+" ") && strings.Contains(l, tc.value) {
					line = l
				}
			}
			if line == "" {
				t.Fatalf("no line names %s and %s in:\n%v", tc.key, tc.value, err)
			}
			if tc.also != "" && !strings.Contains(line, tc.also) {
				t.Errorf("line %q does not mention %q", line, tc.also)
			}
		})
	}
}

func TestValidateCollectsAllProblems(t *testing.T) {
	c := valid()
	c.BlockSize = 1000
	c.GC.LiveData = 2
	c.Log.Level = "loud"
	err := c.Validate()
	if err == nil {
		t.Fatal("accepted three bad values")
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != 3 {
		t.Fatalf("want 3 lines, one per problem, got %d:\n%v", len(lines), err)
	}
	for i, key := range []string{"block_size", "gc.live_data", "log.level"} {
		found := false
		for _, l := range lines {
			found = found || strings.HasPrefix(l, key+" ")
		}
		if !found {
			t.Errorf("problem %d (%s) missing from:\n%v", i, key, err)
		}
	}
}

func TestLoadRefusesValuesFromFile(t *testing.T) {
	clearEnv(t)
	_, err := Load(writeFile(t, "size = 0\n[s3]\nbucket = \"b\"\n[write]\nchunk_size = 3\n"))
	if err == nil {
		t.Fatal("accepted size = 0 and chunk_size = 3")
	}
	for _, want := range []string{"size = 0", "write.shared_buffer_size = 32", "write.chunk_size (3 MiB)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not contain %q:\n%v", want, err)
		}
	}
}

func TestUnknownKeysRefused(t *testing.T) {
	clearEnv(t)
	p := writeFile(t, `
sise = 8
[s3]
bucket = "b"
bukcet = "c"
[cachex]
size = 1
[cachex.disk]
path = "/x"
`)
	_, err := Load(p)
	if err == nil {
		t.Fatal("accepted unknown keys")
	}
	msg := err.Error()
	for _, want := range []string{p, "sise", "s3.bukcet", "cachex", "bs3 -h"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error does not contain %q: %v", want, msg)
		}
	}
	// The unknown table is named once, not with each of its keys.
	if strings.Contains(msg, "cachex.size") || strings.Contains(msg, "cachex.disk") {
		t.Errorf("children of an unknown table listed: %v", msg)
	}
}

func TestMalformedAndMissingFile(t *testing.T) {
	clearEnv(t)
	p := writeFile(t, "size = = 8\n")
	_, err := Load(p)
	if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("malformed TOML: %v, want the parse error with %s and its line", err, p)
	}

	p = writeFile(t, "size = \"eight\"\n")
	_, err = Load(p)
	if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "size") {
		t.Errorf("wrong type: %v, want an error naming %s and size", err, p)
	}

	missing := filepath.Join(t.TempDir(), "nope.toml")
	_, err = Load(missing)
	if err == nil || !strings.Contains(err.Error(), missing) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v, want an fs.ErrNotExist error naming %s", err, missing)
	}
	if strings.Count(err.Error(), missing) != 1 {
		t.Errorf("path repeated in %q", err)
	}
}

func TestExampleConfigLoads(t *testing.T) {
	clearEnv(t)
	const path = "../../config.toml"
	c, err := Load(path)
	if err != nil {
		t.Fatalf("Load(%s): %v", path, err)
	}
	// Every key is present in the example...
	var raw map[string]any
	md, err := toml.DecodeFile(path, &raw)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range tomlKeys(t) {
		if !md.IsDefined(strings.Split(k.key, ".")...) {
			t.Errorf("config.toml lacks %s", k.key)
		}
	}
	// ...at its default, except the documented example choices.
	want := Default()
	want.Frontend = "nbd"
	want.Store = "s3"
	want.S3.Bucket = "bs3"
	want.S3.Remote = "http://127.0.0.1:9000"
	if !reflect.DeepEqual(c, want) {
		t.Errorf("config.toml differs from the defaults:\n got %+v\nwant %+v", c, want)
	}
}

func TestUsageListsEveryKey(t *testing.T) {
	var b bytes.Buffer
	Usage(&b)
	text := b.String()
	lines := strings.Split(text, "\n")
	for _, k := range tomlKeys(t) {
		// The key and its variable on one line, followed by a description.
		found := false
		for i, l := range lines {
			f := strings.Fields(l)
			if len(f) >= 4 && f[0] == k.key && f[1] == envName(k.key) && f[2] == "default" {
				found = true
				if i+1 >= len(lines) || strings.TrimSpace(lines[i+1]) == "" {
					t.Errorf("%s has no description", k.key)
				}
			}
		}
		if !found {
			t.Errorf("Usage lacks a line \"%s %s default ...\"", k.key, envName(k.key))
		}
	}
	for _, want := range []string{`default "us-east-1"`, "default 0.3", "default 1048576", `default "127.0.0.1:10809"`} {
		if !strings.Contains(text, want) {
			t.Errorf("Usage lacks %q", want)
		}
	}
}

func TestSecretsNeverShown(t *testing.T) {
	clearEnv(t)
	const access, secret = "AKIAEXAMPLEACCESS42", "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRET"
	p := writeFile(t, fmt.Sprintf("size = 0\n[s3]\nbucket = \"b\"\naccess_key = %q\nsecret_key = %q\n", access, secret))
	_, err := Load(p)
	if err == nil {
		t.Fatal("accepted size = 0")
	}
	assertNoSecret := func(what, s string) {
		t.Helper()
		for _, x := range []string{access, secret, secret[:10], access[:10]} {
			if strings.Contains(s, x) {
				t.Errorf("%s shows a credential: %s", what, s)
			}
		}
	}
	assertNoSecret("validation error", err.Error())

	// A credential pasted into the wrong key is scrubbed from errors too.
	t.Setenv("BS3_S3_SECRET_KEY", secret)
	t.Setenv("BS3_S3_BUCKET", "b")
	t.Setenv("BS3_LOG_LEVEL", secret)
	_, err = Load("")
	if err == nil {
		t.Fatal("accepted a bad log.level")
	}
	assertNoSecret("error for a misplaced secret", err.Error())

	// Malformed credential lines: the parser would quote the token.
	for _, body := range []string{
		"[s3]\nsecret_key = " + secret + "\n",
		"[s3]\nsecret_key = \"" + secret + "\\q\"\n",
		"[s3]\naccess_key = " + access + "\n",
		"s3.secret_key = " + secret + "\n",
	} {
		_, err := Load(writeFile(t, body))
		if err == nil {
			t.Fatalf("accepted malformed %q", body)
		}
		assertNoSecret("parse error", err.Error())
		if !strings.Contains(err.Error(), "line ") {
			t.Errorf("parse error lost its line: %v", err)
		}
	}

	c := valid()
	c.S3.AccessKey, c.S3.SecretKey = access, secret
	r := c.Redacted()
	if r.S3.SecretKey == "" || r.S3.AccessKey == "" {
		t.Errorf("Redacted emptied the credentials; it must show they are set")
	}
	assertNoSecret("Redacted", fmt.Sprintf("%#v", r.S3))
	if c.S3.SecretKey != secret {
		t.Errorf("Redacted modified the original")
	}
	assertNoSecret("String", c.String())
	assertNoSecret("%v", fmt.Sprintf("%v %+v %s %#v", c, c, c, c))
	if !strings.Contains(c.String(), `bucket = "b"`) {
		t.Errorf("String does not render the configuration: %s", c.String())
	}
	var log bytes.Buffer
	logger := zerolog.New(&log)
	logger.Info().Object("config", c).Msg("start")
	assertNoSecret("zerolog", log.String())
	if !strings.Contains(log.String(), `"s3.bucket":"b"`) {
		t.Errorf("zerolog rendering lacks s3.bucket: %s", log.String())
	}
}

// TestMetricsOffByDefault: no metrics endpoint unless one is configured.
func TestMetricsOffByDefault(t *testing.T) {
	clearEnv(t)
	t.Setenv("BS3_S3_BUCKET", "b")
	c, err := Load("")
	if err != nil {
		t.Fatal(err)
	}
	if c.Metrics.Listen != "" {
		t.Errorf("metrics.listen defaults to %q, want empty (off)", c.Metrics.Listen)
	}
	t.Setenv("BS3_METRICS_LISTEN", "127.0.0.1:9101")
	if c, err = Load(""); err != nil || c.Metrics.Listen != "127.0.0.1:9101" {
		t.Errorf("BS3_METRICS_LISTEN: listen %q, err %v", c.Metrics.Listen, err)
	}
}

func TestEncryptionKeys(t *testing.T) {
	c := Default()
	c.S3.Bucket = "b"
	c.Encryption.KeyFile = "/etc/bs3/key"
	if err := c.Validate(); err != nil {
		t.Fatalf("key_file alone: %v", err)
	}
	c.Encryption.PassphraseFile = "/etc/bs3/pass"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "set only one") {
		t.Errorf("key_file and passphrase_file: %v, want a refusal naming both", err)
	}
	c.Encryption.KeyFile = ""
	c.Cache.Dir = "/var/cache/bs3"
	// The disk tier seals its files for an encrypted volume
	// (docs/ARCHITECTURE.md §16.5), so the two go together.
	if err := c.Validate(); err != nil {
		t.Errorf("encryption with cache.dir: %v, want it accepted", err)
	}
}

// The userspace chunker gets enough buffers to keep every uploader busy,
// whatever the CPU count, and more when the write buffer asks for more.
func TestChunkBuffers(t *testing.T) {
	c := Default()
	c.Threads = 2
	c.S3.Uploaders = 16
	if got := c.ChunkBuffers(); got != 34 {
		t.Errorf("2 threads, 16 uploaders, 32 MiB buffer: %d buffers, want 34", got)
	}
	c.Threads = 16 // 32 MiB / 4 MiB * 16 = 128
	if got := c.ChunkBuffers(); got != 128 {
		t.Errorf("16 threads: %d buffers, want 128", got)
	}
	c.Threads, c.S3.Uploaders = 1, 2
	if got := c.ChunkBuffers(); got != 8 {
		t.Errorf("1 thread, 2 uploaders: %d buffers, want 8 (the write buffer's)", got)
	}
}

func TestCompressionKeys(t *testing.T) {
	c := Default()
	c.S3.Bucket = "b"
	for _, codec := range []string{"none", "zstd", "lz4", "s2"} {
		c.Compression.Codec = codec
		if err := c.Validate(); err != nil {
			t.Errorf("codec %q: %v", codec, err)
		}
	}
	c.Compression.Codec = "gzip"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "compression.codec") || !strings.Contains(err.Error(), "none, zstd, lz4, s2") {
		t.Errorf("codec gzip: %v, want a refusal naming the key and the allowed values", err)
	}
	c.Compression.Codec = "zstd"
	c.Compression.Level = "9"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "compression.level") || !strings.Contains(err.Error(), "fastest") {
		t.Errorf("level 9: %v, want a refusal naming the key and the allowed values", err)
	}
}
