// Package config owns bs3's configuration: the TOML file (`bs3 -c`), the
// BS3_* environment overrides, the defaults, the validation of every value
// and the `bs3 -h` text that documents them.
//
// Precedence is defaults < file < environment. The file is decoded with
// BurntSushi/toml so that unknown keys can be refused (a typo must not
// silently fall back to a default); the environment is applied with
// cleanenv. Defaults live only in Default(), never in env-default tags:
// cleanenv applies such tags to any field that holds its zero value, which
// would turn an explicit `conditional_writes = false` in the file back into
// true.
//
// Sizes are stored in the units the file uses (GiB, MiB, ms, s); callers use
// the accessors (SizeBytes, ChunkBytes, GCWait, ...) instead of converting
// by hand.
//
// This package must never print or return the S3 credentials: errors,
// String, Redacted and MarshalZerologObject all mask them.
package config

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/bits"
	"net"
	"net/url"
	"os"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/ilyakaznacheev/cleanenv"
	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/objproxy"
)

// Allowed values of frontend and store.
const (
	FrontendBUSE = "buse"
	FrontendNBD  = "nbd"
	FrontendFUSE = "fuse"
	FrontendUBLK = "ublk"

	StoreS3  = "s3"
	StoreDir = "dir"
)

const (
	mib = 1 << 20
	gib = 1 << 30

	// maxChunkBlocks bounds the blocks per chunk: the extent map stores a
	// block's offset inside its object in 16 bits.
	maxChunkBlocks = 1 << 16
)

var (
	frontends = []string{FrontendBUSE, FrontendNBD, FrontendFUSE, FrontendUBLK}
	stores    = []string{StoreS3, StoreDir}
	logLevels = []string{"trace", "debug", "info", "warn", "error", "fatal", "panic", "disabled"}
)

// redactedMark replaces a non-empty credential wherever it is rendered.
const redactedMark = "<redacted>"

// Config is the complete bs3 configuration. The toml tag is the key in the
// file, env (with the section's env-prefix) the overriding variable, and
// env-description the meaning printed by Usage.
type Config struct {
	Major          int    `toml:"major" env:"BS3_MAJOR" env-description:"device number: the device is /dev/buse<major> (BUSE) or /dev/ublkb<major> (ublk)"`
	Threads        int    `toml:"threads" env:"BS3_THREADS" env-description:"worker threads (BUSE and ublk hardware queues); 0 = number of CPUs"`
	Size           int64  `toml:"size" env:"BS3_SIZE" env-description:"device size in GiB"`
	BlockSize      int    `toml:"block_size" env:"BS3_BLOCK_SIZE,BS3_BLOCKSIZE" env-description:"logical block size in bytes: 512 or 4096"`
	IOMin          int    `toml:"io_min" env:"BS3_IO_MIN" env-description:"minimum I/O size advertised to the kernel, bytes; 0 = block_size"`
	IOOpt          int    `toml:"io_opt" env:"BS3_IO_OPT" env-description:"optimal I/O size advertised to the kernel, bytes; 0 = block_size"`
	Scheduler      bool   `toml:"scheduler" env:"BS3_SCHEDULER" env-description:"let the kernel I/O scheduler merge and reorder requests (BUSE)"`
	QueueDepth     int    `toml:"queue_depth" env:"BS3_QUEUE_DEPTH,BS3_QUEUEDEPTH" env-description:"requests in flight per queue"`
	Null           bool   `toml:"null" env:"BS3_NULL" env-description:"null backend: discard writes, read zeros, no object store (for benchmarks)"`
	Profiler       bool   `toml:"profiler" env:"BS3_PROFILER" env-description:"serve Go pprof on localhost:profiler_port"`
	ProfilerPort   int    `toml:"profiler_port" env:"BS3_PROFILER_PORT" env-description:"TCP port of the profiler, 1..65535"`
	SkipCheckpoint bool   `toml:"skip_checkpoint" env:"BS3_SKIP_CHECKPOINT,BS3_SKIP" env-description:"neither load nor write checkpoints: every start replays all objects (refused once garbage collection may have deleted keys a checkpoint covers)"`
	Frontend       string `toml:"frontend" env:"BS3_FRONTEND" env-description:"how the device is exposed: buse, nbd, fuse (file + loop device) or ublk (Linux 6.0+)"`
	Store          string `toml:"store" env:"BS3_STORE" env-description:"where objects live: s3, or dir (a local directory, for tests)"`

	// ShutdownTimeout must stay below the unit's TimeoutStopSec (see
	// contrib/systemd/bs3.service), or systemd kills the daemon first.
	ShutdownTimeout int `toml:"shutdown_timeout" env:"BS3_SHUTDOWN_TIMEOUT" env-description:"seconds a stop (SIGINT/SIGTERM, or a frontend that ended) may take before bs3 gives up, logs what it could not store and exits non-zero"`

	S3          S3Config          `toml:"s3" env-prefix:"BS3_S3_"`
	Write       WriteConfig       `toml:"write" env-prefix:"BS3_WRITE_"`
	Read        ReadConfig        `toml:"read" env-prefix:"BS3_READ_"`
	GC          GCConfig          `toml:"gc" env-prefix:"BS3_GC_"`
	Log         LogConfig         `toml:"log" env-prefix:"BS3_LOG_"`
	Checkpoint  CheckpointConfig  `toml:"checkpoint" env-prefix:"BS3_CHECKPOINT_"`
	NBD         NBDConfig         `toml:"nbd" env-prefix:"BS3_NBD_"`
	FUSE        FUSEConfig        `toml:"fuse" env-prefix:"BS3_FUSE_"`
	Dir         DirConfig         `toml:"dir" env-prefix:"BS3_DIR_"`
	Cache       CacheConfig       `toml:"cache" env-prefix:"BS3_CACHE_"`
	Metrics     MetricsConfig     `toml:"metrics" env-prefix:"BS3_METRICS_"`
	Encryption  EncryptionConfig  `toml:"encryption" env-prefix:"BS3_ENCRYPTION_"`
	Compression CompressionConfig `toml:"compression" env-prefix:"BS3_COMPRESSION_"`
	Integrity   IntegrityConfig   `toml:"integrity" env-prefix:"BS3_INTEGRITY_"`

	// notices name the retired BS3 keys and variables the configuration
	// was read with (see Notices); unexported, so it is no key.
	notices []Notice
}

// S3Config is the [s3] section.
type S3Config struct {
	AccessKey         string `toml:"access_key" env:"ACCESS_KEY,ACCESSKEY" env-description:"access key; empty (with secret_key) = AWS default credential chain"`
	SecretKey         string `toml:"secret_key" env:"SECRET_KEY,SECRETKEY" env-description:"secret key; empty (with access_key) = AWS default credential chain"`
	Bucket            string `toml:"bucket" env:"BUCKET" env-description:"bucket holding the volume; required when store = \"s3\""`
	Remote            string `toml:"remote" env:"REMOTE" env-description:"endpoint URL (http:// or https://); empty = AWS"`
	Region            string `toml:"region" env:"REGION" env-description:"region"`
	Uploaders         int    `toml:"uploaders" env:"UPLOADERS" env-description:"concurrent uploads"`
	Downloaders       int    `toml:"downloaders" env:"DOWNLOADERS" env-description:"concurrent downloads"`
	Prefix            string `toml:"prefix" env:"PREFIX" env-description:"prefix of the volume's objects inside the bucket (several volumes may share a bucket)"`
	ConditionalWrites bool   `toml:"conditional_writes" env:"CONDITIONAL_WRITES" env-description:"create objects with If-None-Match: * so a second writer is detected; disable for stores without conditional writes"`
	PayloadChecksum   string `toml:"payload_checksum" env:"PAYLOAD_CHECKSUM" env-description:"how uploads are protected: auto (CRC32C with UNSIGNED-PAYLOAD if the store verifies it, probed at start-up), crc32c, md5, signed (SigV4 SHA-256 of every body) or unsigned (TLS only)"`
}

// PayloadChecksums are the accepted s3.payload_checksum values (the s3
// store's payload modes).
var PayloadChecksums = []string{"auto", "crc32c", "md5", "signed", "unsigned"}

// WriteConfig is the [write] section.
type WriteConfig struct {
	Durable            bool `toml:"durable" env:"DURABLE" env-description:"a flush returns only once every earlier chunk is in the store (false: flush is an ordering barrier)"`
	SharedBufferSize   int  `toml:"shared_buffer_size" env:"SHARED_BUFFER_SIZE,BUFSIZE" env-description:"write buffer in MiB (BUSE: per queue); a multiple of chunk_size"`
	ChunkSize          int  `toml:"chunk_size" env:"CHUNK_SIZE,CHUNKSIZE" env-description:"chunk (= object) size in MiB; fewer than 65536 blocks"`
	CollisionChunkSize int  `toml:"collision_chunk_size" env:"COLLISION_CHUNK_SIZE,COLSIZE" env-description:"width of a write-ordering (seqno) area in MiB"`
}

// ReadConfig is the [read] section.
type ReadConfig struct {
	SharedBufferSize int `toml:"shared_buffer_size" env:"SHARED_BUFFER_SIZE,BUFSIZE" env-description:"read buffer in MiB (BUSE: per queue)"`
}

// GCConfig is the [gc] section.
type GCConfig struct {
	Step        int64   `toml:"step" env:"STEP" env-description:"blocks scanned per threshold-GC step"`
	LiveData    float64 `toml:"live_data" env:"LIVE_DATA,LIVEDATA" env-description:"threshold GC compacts objects whose live fraction is below this, in (0,1)"`
	IdleTimeout int     `toml:"idle_timeout" env:"IDLE_TIMEOUT,IDLETIMEOUT" env-description:"ms low-priority work waits for an idle moment before it runs anyway"`
	Wait        int     `toml:"wait" env:"WAIT" env-description:"seconds between dead-GC passes"`
	DefragRange string  `toml:"defrag_range" env:"DEFRAG_RANGE" env-description:"byte range START-END (end excluded; K, M, G, T suffixes: KiB…TiB) that SIGUSR2 defragments; empty = the whole device"`
}

// LogConfig is the [log] section.
type LogConfig struct {
	Level  Level `toml:"level" env:"LEVEL" env-description:"trace, debug, info, warn, error, fatal, panic or disabled; or BS3's numbers -1 (trace) to 5 (panic)"`
	Pretty bool  `toml:"pretty" env:"PRETTY" env-description:"human-readable console logs instead of JSON"`
}

// CheckpointConfig is the [checkpoint] section: a checkpoint is written when
// either bound is reached, so recovery never replays more than that.
type CheckpointConfig struct {
	Interval int `toml:"interval" env:"INTERVAL" env-description:"seconds between periodic checkpoints"`
	Objects  int `toml:"objects" env:"OBJECTS" env-description:"objects written since the last checkpoint that trigger a new one"`
}

// NBDConfig is the [nbd] section.
type NBDConfig struct {
	Listen           string `toml:"listen" env:"LISTEN" env-description:"NBD server address: host:port, or unix:/path for a Unix socket"`
	Export           string `toml:"export" env:"EXPORT" env-description:"NBD export name"`
	HandshakeTimeout int    `toml:"handshake_timeout" env:"HANDSHAKE_TIMEOUT" env-description:"seconds a new NBD connection has to choose the export before it is closed"`
	MaxConnections   int    `toml:"max_connections" env:"MAX_CONNECTIONS" env-description:"NBD connections served at once, handshakes included; more are refused"`
	MaxBuffered      int    `toml:"max_buffered" env:"MAX_BUFFERED" env-description:"MiB of NBD request payloads held in memory across all connections; requests beyond wait"`
	TLS              string `toml:"tls" env:"TLS" env-description:"NBD over TLS (NBD_OPT_STARTTLS): off, on (clients may upgrade) or require (plain clients are refused)"`
	TLSCert          string `toml:"tls_cert" env:"TLS_CERT" env-description:"PEM certificate chain of the NBD server (tls = on or require)"`
	TLSKey           string `toml:"tls_key" env:"TLS_KEY" env-description:"PEM private key of tls_cert; must not be readable by others"`
	TLSCA            string `toml:"tls_ca" env:"TLS_CA" env-description:"PEM CA that NBD clients' certificates must chain to; empty = no client certificates"`
	SocketGroup      string `toml:"socket_group" env:"SOCKET_GROUP" env-description:"group allowed to connect to a unix:/path NBD socket (mode 0660); empty = root only (0600)"`
}

// NBD TLS modes (nbd.tls).
const (
	NBDTLSOff     = "off"
	NBDTLSOn      = "on"
	NBDTLSRequire = "require"
)

// HandshakeTimeoutDuration is nbd.handshake_timeout as a duration.
func (n NBDConfig) HandshakeTimeoutDuration() time.Duration {
	return time.Duration(n.HandshakeTimeout) * time.Second
}

// MaxBufferedBytes is nbd.max_buffered in bytes.
func (n NBDConfig) MaxBufferedBytes() int64 { return int64(n.MaxBuffered) * mib }

// FUSEConfig is the [fuse] section.
type FUSEConfig struct {
	Mountpoint string `toml:"mountpoint" env:"MOUNTPOINT" env-description:"directory where the device file is mounted"`
	Loop       bool   `toml:"loop" env:"LOOP" env-description:"attach a loop device to the file"`
}

// DirConfig is the [dir] section.
type DirConfig struct {
	Path string `toml:"path" env:"PATH" env-description:"directory holding the objects when store = \"dir\""`
}

// CacheConfig is the [cache] section: the read cache.
type CacheConfig struct {
	MemorySize int    `toml:"memory_size" env:"MEMORY_SIZE" env-description:"read cache in memory, MiB (recently written and read data); 0 = off"`
	FetchSize  int    `toml:"fetch_size" env:"FETCH_SIZE" env-description:"KiB a streaming or large read fetches and caches around a miss (aligned inside the object; cached as 64 KiB windows); a power of two from 4 to 4096"`
	Dir        string `toml:"dir" env:"DIR" env-description:"directory of the read cache on local disk (survives restarts; every 4 KiB block checked with CRC32C, or each file sealed with AES-256-GCM for an encrypted volume); empty = memory only"`
	DiskSize   int    `toml:"disk_size" env:"DISK_SIZE" env-description:"GiB the read cache may use under dir"`
}

// MetricsConfig is the [metrics] section: the Prometheus endpoint.
type MetricsConfig struct {
	Listen string `toml:"listen" env:"LISTEN" env-description:"host:port serving Prometheus metrics on /metrics (e.g. 127.0.0.1:9101); empty = off"`
}

// EncryptionConfig is the [encryption] section: where the key of an
// encrypted volume comes from (docs/ARCHITECTURE.md §16). Both empty =
// the volume is not encrypted.
type EncryptionConfig struct {
	KeyFile        string `toml:"key_file" env:"KEY_FILE" env-description:"file with the volume's 256-bit key (32 raw bytes or 64 hex digits, mode 0600); empty = no key file"`
	PassphraseFile string `toml:"passphrase_file" env:"PASSPHRASE_FILE" env-description:"file with a passphrase (mode 0600) stretched with Argon2id into the key that opens the volume's data key; empty = no passphrase"`
}

// IntegrityConfig is the [integrity] section (docs/ARCHITECTURE.md §16.6).
type IntegrityConfig struct {
	Checksums bool `toml:"checksums" env:"CHECKSUMS" env-description:"a new plaintext volume stores a CRC32C per 4 KiB of every object, so damage reads as an I/O error, never wrong bytes; existing volumes keep their format"`
}

// CompressionConfig is the [compression] section: how new data objects
// and checkpoints are compressed (docs/ARCHITECTURE.md §19). Every object
// records its codec, so it may change at any time.
type CompressionConfig struct {
	Codec string `toml:"codec" env:"CODEC" env-description:"codec of newly written objects: none, zstd, lz4 or s2; objects already stored stay readable whatever it says"`
	Level string `toml:"level" env:"LEVEL" env-description:"compression effort: fastest, default, better or best (more CPU per write for a smaller bucket)"`
}

// Compression codecs and levels (internal/store/compressed owns them).
var (
	compressionCodecs = []string{"none", "zstd", "lz4", "s2"}
	compressionLevels = []string{"fastest", "default", "better", "best"}
)

// CacheMemoryBytes is cache.memory_size in bytes.
func (c Config) CacheMemoryBytes() int64 { return int64(c.Cache.MemorySize) * mib }

// CacheFetchBytes is cache.fetch_size in bytes.
func (c Config) CacheFetchBytes() int64 { return int64(c.Cache.FetchSize) << 10 }

// CacheDiskBytes is cache.disk_size in bytes.
func (c Config) CacheDiskBytes() int64 { return int64(c.Cache.DiskSize) * gib }

// Default returns the configuration with every key at its default. The
// bucket is empty, so with store = "s3" it does not validate by itself.
func Default() Config {
	return Config{
		Size:         8,
		BlockSize:    4096,
		QueueDepth:   128,
		ProfilerPort: 6060,
		Frontend:     FrontendBUSE,
		Store:        StoreS3,

		ShutdownTimeout: 60,
		S3: S3Config{
			Region:            "us-east-1",
			Uploaders:         objproxy.DefaultUploaders,
			Downloaders:       objproxy.DefaultDownloaders,
			ConditionalWrites: true,
			PayloadChecksum:   "auto",
		},
		Write: WriteConfig{
			SharedBufferSize:   32,
			ChunkSize:          4,
			CollisionChunkSize: 1,
		},
		Read:       ReadConfig{SharedBufferSize: 32},
		GC:         GCConfig{Step: 1 << 20, LiveData: 0.3, IdleTimeout: 200, Wait: 600},
		Log:        LogConfig{Level: "info"},
		Checkpoint: CheckpointConfig{Interval: 300, Objects: 1024},
		NBD:        NBDConfig{Listen: "127.0.0.1:10809", Export: "bs3", HandshakeTimeout: 10, MaxConnections: 16, MaxBuffered: 256, TLS: NBDTLSOff},
		FUSE:       FUSEConfig{Mountpoint: "/run/bs3/fuse", Loop: true},
		Dir:        DirConfig{Path: "/var/lib/bs3/objects"},
		Cache:      CacheConfig{MemorySize: 512, FetchSize: 256, DiskSize: 10},
		// zstd's fastest level costs half the CPU of its default for
		// 1.5 points of ratio (docs/ARCHITECTURE.md §19.3).
		Compression: CompressionConfig{Codec: "none", Level: "fastest"},
		Integrity:   IntegrityConfig{Checksums: true},
	}
}

// Load returns the defaults, overridden by the file at path (skipped when
// path is ""), overridden by the BS3_* environment, and validated.
func Load(path string) (Config, error) {
	c, err := read(path)
	if err != nil {
		return Config{}, err
	}
	if err := c.Validate(); err != nil {
		where := "the defaults and environment"
		if path != "" {
			where = path + " and the environment"
		}
		// Belt and braces: no rule prints a credential, but a user may have
		// pasted one into the wrong key.
		return Config{}, errors.New(c.scrub(fmt.Sprintf("invalid configuration (from %s):\n%v", where, err)))
	}
	return c, nil
}

// read is Load without validation.
func read(path string) (Config, error) {
	c := Default()
	if path != "" {
		if err := decodeFile(path, &c); err != nil {
			return Config{}, err
		}
	}
	if err := cleanenv.ReadEnv(&c); err != nil {
		return Config{}, fmt.Errorf("environment override: %v", c.scrub(envAliasHint(err.Error())))
	}
	c.notices = append(c.notices, retiredEnvNotices()...)
	return c, nil
}

// decodeFile decodes the TOML file at path over c, refusing unknown keys.
func decodeFile(path string, c *Config) error {
	data, err := os.ReadFile(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err // the path is said once, below
		}
		return fmt.Errorf("config file %s: %w", path, err)
	}
	md, err := toml.Decode(string(data), c)
	if err != nil {
		return fmt.Errorf("config file %s: %v", path, parseErrorText(err, string(data)))
	}
	unknown, notices, err := retiredKeys(md, unknownKeys(md))
	if err != nil {
		return fmt.Errorf("config file %s: %w", path, err)
	}
	c.notices = append(c.notices, notices...)
	if len(unknown) > 0 {
		return fmt.Errorf("config file %s: unknown key(s) %s (see bs3 -h for the valid keys)",
			path, strings.Join(unknown, ", "))
	}
	return nil
}

// parseErrorText renders a TOML error without credential text: the parser
// quotes the offending token, which on a credential line is the secret.
func parseErrorText(err error, input string) string {
	var pe toml.ParseError
	if !errors.As(err, &pe) {
		return err.Error() // decode type errors name types, not values
	}
	line := ""
	if lines := strings.Split(input, "\n"); pe.Position.Line >= 1 && pe.Position.Line <= len(lines) {
		line = lines[pe.Position.Line-1]
	}
	if isCredential(pe.LastKey) || isCredential(line) {
		return fmt.Sprintf("line %d: malformed TOML near a credential (details not shown)", pe.Position.Line)
	}
	return err.Error()
}

func isCredential(s string) bool {
	return strings.Contains(s, "access_key") || strings.Contains(s, "secret_key")
}

// unknownKeys lists the keys the file has but Config does not, leaving out
// the children of a key already listed (an unknown table is named once).
func unknownKeys(md toml.MetaData) []string {
	var out []string
	reported := map[string]bool{}
	for _, k := range md.Undecoded() {
		if len(k) > 1 && reported[k[:len(k)-1].String()] {
			reported[k.String()] = true
			continue
		}
		reported[k.String()] = true
		out = append(out, k.String())
	}
	return out
}

// Validate checks every rule and returns all problems at once, one per
// line, each naming the key as written in the file, its value and what is
// allowed.
func (c Config) Validate() error {
	var errs []error
	bad := func(key string, value any, format string, args ...any) {
		if s, ok := value.(string); ok {
			value = fmt.Sprintf("%q", s)
		}
		errs = append(errs, fmt.Errorf("%s = %v: %s", key, value, fmt.Sprintf(format, args...)))
	}
	atLeast := func(key string, v int64, min int64, unit string) {
		if v < min {
			bad(key, v, "must be at least %d%s", min, unit)
		}
	}
	oneOf := func(key, v string, allowed []string) {
		for _, a := range allowed {
			if v == a {
				return
			}
		}
		bad(key, v, "must be one of %s", strings.Join(allowed, ", "))
	}

	// Device geometry.
	blockOK := c.BlockSize == 512 || c.BlockSize == 4096
	if !blockOK {
		bad("block_size", c.BlockSize, "must be 512 or 4096")
	}
	atLeast("size", c.Size, 1, " (GiB)")
	atLeast("major", int64(c.Major), 0, "")
	atLeast("threads", int64(c.Threads), 0, " (0 = number of CPUs)")
	for _, f := range []struct {
		key string
		v   int
	}{{"io_min", c.IOMin}, {"io_opt", c.IOOpt}} {
		if f.v != 0 && (f.v < c.BlockSize || bits.OnesCount(uint(f.v)) != 1) {
			bad(f.key, f.v, "must be 0 (= block_size) or a power of two >= block_size (%d)", c.BlockSize)
		}
	}
	atLeast("queue_depth", int64(c.QueueDepth), 1, "")
	atLeast("shutdown_timeout", int64(c.ShutdownTimeout), 1, " (s)")
	if c.ProfilerPort < 1 || c.ProfilerPort > 65535 {
		bad("profiler_port", c.ProfilerPort, "must be in 1..65535")
	}
	oneOf("frontend", c.Frontend, frontends)
	oneOf("store", c.Store, stores)

	// Write path: chunks tile the shared buffer, and a chunk's blocks must
	// be addressable by the extent map's 16-bit block offset.
	w := c.Write
	atLeast("write.shared_buffer_size", int64(w.SharedBufferSize), 1, " (MiB)")
	if w.ChunkSize < 1 {
		bad("write.chunk_size", w.ChunkSize, "must be at least 1 (MiB)")
	} else {
		if blockOK && c.ChunkBytes()%int64(c.BlockSize) != 0 {
			bad("write.chunk_size", w.ChunkSize, "must be a multiple of block_size (%d bytes)", c.BlockSize)
		}
		if blockOK && c.ChunkBytes()/int64(c.BlockSize) >= maxChunkBlocks {
			bad("write.chunk_size", w.ChunkSize,
				"holds %d blocks of %d bytes; must hold fewer than %d (the extent map stores the block offset in an object in 16 bits), so at most %d MiB",
				c.ChunkBytes()/int64(c.BlockSize), c.BlockSize, maxChunkBlocks, (maxChunkBlocks-1)*int64(c.BlockSize)/mib)
		}
		if w.SharedBufferSize >= 1 {
			if w.ChunkSize > w.SharedBufferSize {
				bad("write.chunk_size", w.ChunkSize, "must not exceed write.shared_buffer_size (%d MiB)", w.SharedBufferSize)
			} else if w.SharedBufferSize%w.ChunkSize != 0 {
				bad("write.shared_buffer_size", w.SharedBufferSize,
					"must be a multiple of write.chunk_size (%d MiB): the buffer is split into whole chunks", w.ChunkSize)
			}
		}
	}
	if w.CollisionChunkSize < 1 {
		bad("write.collision_chunk_size", w.CollisionChunkSize, "must be at least 1 (MiB)")
	} else if blockOK && c.CollisionBytes()%int64(c.BlockSize) != 0 {
		bad("write.collision_chunk_size", w.CollisionChunkSize, "must be a multiple of block_size (%d bytes)", c.BlockSize)
	}
	atLeast("read.shared_buffer_size", int64(c.Read.SharedBufferSize), 1, " (MiB)")

	// Object store.
	atLeast("s3.uploaders", int64(c.S3.Uploaders), 1, "")
	atLeast("s3.downloaders", int64(c.S3.Downloaders), 1, "")
	if c.Store == StoreS3 && !c.Null && c.S3.Bucket == "" {
		bad("s3.bucket", c.S3.Bucket, "required when store = %q", StoreS3)
	}
	if r := c.S3.Remote; r != "" {
		if u, err := url.Parse(r); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad("s3.remote", r, "must be empty (AWS) or an http:// or https:// URL")
		}
	}
	oneOf("s3.payload_checksum", c.S3.PayloadChecksum, PayloadChecksums)
	if c.Store == StoreDir && !c.Null && c.Dir.Path == "" {
		bad("dir.path", c.Dir.Path, "required when store = %q", StoreDir)
	}

	// Garbage collection and checkpoints.
	if lv := c.GC.LiveData; !(lv > 0 && lv < 1) {
		bad("gc.live_data", lv, "must be a fraction strictly between 0 and 1")
	}
	atLeast("gc.step", c.GC.Step, 1, " (blocks)")
	atLeast("gc.wait", int64(c.GC.Wait), 1, " (s)")
	atLeast("gc.idle_timeout", int64(c.GC.IdleTimeout), 0, " (ms)")
	if off, n, err := c.GCDefragRange(); err != nil {
		bad("gc.defrag_range", c.GC.DefragRange, "%v", err)
	} else if n > 0 && off >= c.SizeBytes() {
		bad("gc.defrag_range", c.GC.DefragRange, "starts at or past the end of the %d-byte device", c.SizeBytes())
	}
	atLeast("checkpoint.interval", int64(c.Checkpoint.Interval), 1, " (s)")
	atLeast("checkpoint.objects", int64(c.Checkpoint.Objects), 1, "")

	if !slices.Contains(logLevels, string(c.Log.Level)) {
		bad("log.level", string(c.Log.Level), "must be one of %s, or a BS3 level number from -1 (trace) to 5 (panic)", strings.Join(logLevels, ", "))
	}

	atLeast("cache.memory_size", int64(c.Cache.MemorySize), 0, " (MiB; 0 = off)")
	if f := c.Cache.FetchSize; f < 4 || f > 4096 || bits.OnesCount(uint(f)) != 1 {
		bad("cache.fetch_size", f, "must be a power of two from 4 to 4096 (KiB)")
	}
	if c.Cache.Dir != "" {
		if c.Cache.MemorySize == 0 {
			bad("cache.dir", c.Cache.Dir, "needs cache.memory_size > 0 (the disk cache sits behind the memory cache)")
		}
		atLeast("cache.disk_size", int64(c.Cache.DiskSize), 1, " (GiB)")
	}
	if c.Encryption.KeyFile != "" && c.Encryption.PassphraseFile != "" {
		bad("encryption.passphrase_file", c.Encryption.PassphraseFile, "cannot be set together with encryption.key_file: set only one")
	}

	oneOf("compression.codec", c.Compression.Codec, compressionCodecs)
	oneOf("compression.level", c.Compression.Level, compressionLevels)

	if l := c.Metrics.Listen; l != "" {
		if _, port, err := net.SplitHostPort(l); err != nil {
			bad("metrics.listen", l, "must be host:port (e.g. 127.0.0.1:9101), or empty to turn metrics off")
		} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			bad("metrics.listen", l, "port must be a number in 0..65535")
		}
	}

	// Frontends.
	if c.Frontend == FrontendNBD {
		l := c.NBD.Listen
		switch {
		case l == "":
			bad("nbd.listen", l, "required when frontend = %q (host:port or unix:/path)", FrontendNBD)
		case strings.HasPrefix(l, "unix:"):
			if strings.TrimPrefix(l, "unix:") == "" {
				bad("nbd.listen", l, "unix: needs a socket path, e.g. unix:/run/bs3/nbd.sock")
			}
		default:
			if _, _, err := net.SplitHostPort(l); err != nil {
				bad("nbd.listen", l, "must be host:port or unix:/path")
			}
		}
	}
	atLeast("nbd.handshake_timeout", int64(c.NBD.HandshakeTimeout), 1, " (s)")
	atLeast("nbd.max_connections", int64(c.NBD.MaxConnections), 1, "")
	if b := c.NBD.MaxBuffered; b < 1 || b > 1<<20 {
		bad("nbd.max_buffered", b, "must be in 1..1048576 (MiB); requests larger than it are served one at a time")
	}
	oneOf("nbd.tls", c.NBD.TLS, []string{NBDTLSOff, NBDTLSOn, NBDTLSRequire})
	if c.NBD.TLS == NBDTLSOn || c.NBD.TLS == NBDTLSRequire {
		if c.NBD.TLSCert == "" {
			bad("nbd.tls_cert", c.NBD.TLSCert, "required when nbd.tls = %q (a PEM certificate chain)", c.NBD.TLS)
		}
		if c.NBD.TLSKey == "" {
			bad("nbd.tls_key", c.NBD.TLSKey, "required when nbd.tls = %q (the PEM key of tls_cert)", c.NBD.TLS)
		} else if fi, err := os.Stat(c.NBD.TLSKey); err == nil && fi.Mode().Perm()&0o004 != 0 {
			bad("nbd.tls_key", c.NBD.TLSKey, "is readable by every user (mode %v): chmod o-r it", fi.Mode().Perm())
		}
	} else if c.NBD.TLSCA != "" {
		bad("nbd.tls_ca", c.NBD.TLSCA, "needs nbd.tls = on or require")
	}
	if c.Frontend == FrontendUBLK {
		if c.QueueDepth > 4096 {
			bad("queue_depth", c.QueueDepth, "must be at most 4096 with frontend = %q", FrontendUBLK)
		}
		if c.Threads > 4096 {
			bad("threads", c.Threads, "must be at most 4096 with frontend = %q (ublk queues)", FrontendUBLK)
		}
		if c.Major >= 1<<20 {
			bad("major", c.Major, "must be at most %d with frontend = %q (the ublk device number)", 1<<20-1, FrontendUBLK)
		}
	}
	if c.Frontend == FrontendFUSE && c.FUSE.Mountpoint == "" {
		bad("fuse.mountpoint", c.FUSE.Mountpoint, "required when frontend = %q", FrontendFUSE)
	}

	return errors.Join(errs...)
}

// SizeBytes is the device size in bytes.
func (c Config) SizeBytes() int64 { return c.Size * gib }

// Blocks is the device size in blocks.
func (c Config) Blocks() int64 { return c.SizeBytes() / int64(c.BlockSize) }

// ChunkBytes is the chunk (object) size in bytes.
func (c Config) ChunkBytes() int64 { return int64(c.Write.ChunkSize) * mib }

// ChunkBlocks is the number of blocks a chunk holds (< 65536 when valid).
func (c Config) ChunkBlocks() int { return int(c.ChunkBytes() / int64(c.BlockSize)) }

// WriteBufferBytes is the size of the shared write buffer in bytes.
func (c Config) WriteBufferBytes() int64 { return int64(c.Write.SharedBufferSize) * mib }

// ChunkBuffers is the number of chunk buffers of the userspace chunker
// (NBD, FUSE, ublk): write.shared_buffer_size per thread, as BUSE sizes
// its queues, but never fewer than uploadBuffers(s3.uploaders). With fewer,
// uploaders sit idle while writers wait for a buffer: on a 2-CPU machine
// the old rule gave 16 buffers for 16 uploaders.
func (c Config) ChunkBuffers() int {
	n := int(c.WriteBufferBytes() / c.ChunkBytes() * int64(c.ThreadCount()))
	return max(n, uploadBuffers(c.S3.Uploaders))
}

// uploadBuffers is the fewest chunk buffers that keep u uploaders busy and
// absorb the spread of PUT times: one open chunk, u in upload and u more
// that filled while the slowest PUT of the batch ran (measured in
// BenchmarkThroughput with BS3_BENCH_BUFFERS; see README "Write buffers
// and uploads").
func uploadBuffers(u int) int { return 2*u + 2 }

// ReadBufferBytes is the size of the shared read buffer in bytes.
func (c Config) ReadBufferBytes() int64 { return int64(c.Read.SharedBufferSize) * mib }

// CollisionBytes is the width of a seqno collision area in bytes.
func (c Config) CollisionBytes() int64 { return int64(c.Write.CollisionChunkSize) * mib }

// IOMinBytes is the advertised minimum I/O size (io_min, or the block size).
func (c Config) IOMinBytes() int {
	if c.IOMin == 0 {
		return c.BlockSize
	}
	return c.IOMin
}

// IOOptBytes is the advertised optimal I/O size (io_opt, or the block size).
func (c Config) IOOptBytes() int {
	if c.IOOpt == 0 {
		return c.BlockSize
	}
	return c.IOOpt
}

// ThreadCount is the number of worker threads (threads, or the CPU count).
func (c Config) ThreadCount() int {
	if c.Threads == 0 {
		return runtime.NumCPU()
	}
	return c.Threads
}

// GCIdleTimeout is how long low-priority work waits for an idle moment.
func (c Config) GCIdleTimeout() time.Duration {
	return time.Duration(c.GC.IdleTimeout) * time.Millisecond
}

// GCWait is the period of dead GC.
func (c Config) GCWait() time.Duration { return time.Duration(c.GC.Wait) * time.Second }

// GCDefragRange is gc.defrag_range as an offset and a length in bytes;
// length 0 (an empty range) means the whole device.
func (c Config) GCDefragRange() (offset, length int64, err error) {
	s := strings.TrimSpace(c.GC.DefragRange)
	if s == "" {
		return 0, 0, nil
	}
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return 0, 0, errors.New("must be START-END in bytes (e.g. 0-1G), or empty for the whole device")
	}
	start, err := parseBytes(a)
	if err != nil {
		return 0, 0, fmt.Errorf("start: %w", err)
	}
	end, err := parseBytes(b)
	if err != nil {
		return 0, 0, fmt.Errorf("end: %w", err)
	}
	if end <= start {
		return 0, 0, fmt.Errorf("end %d is not after start %d", end, start)
	}
	return start, end - start, nil
}

// parseBytes parses a byte count with an optional K, M, G or T suffix
// (powers of 1024).
func parseBytes(s string) (int64, error) {
	s = strings.TrimSpace(s)
	shift := 0
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'K', 'k':
			shift = 10
		case 'M', 'm':
			shift = 20
		case 'G', 'g':
			shift = 30
		case 'T', 't':
			shift = 40
		}
		if shift > 0 {
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q is not a byte count", s)
	}
	if v > (1<<62)>>shift {
		return 0, fmt.Errorf("%q is too large", s)
	}
	return v << shift, nil
}

// ShutdownTimeoutDuration bounds the whole stop sequence.
func (c Config) ShutdownTimeoutDuration() time.Duration {
	return time.Duration(c.ShutdownTimeout) * time.Second
}

// CheckpointInterval is the period of periodic checkpoints.
func (c Config) CheckpointInterval() time.Duration {
	return time.Duration(c.Checkpoint.Interval) * time.Second
}

// LogLevel is log.level as a zerolog level (info if it does not parse;
// Validate refuses such values).
func (c Config) LogLevel() zerolog.Level {
	l, err := zerolog.ParseLevel(string(c.Log.Level))
	if err != nil {
		return zerolog.InfoLevel
	}
	return l
}

// Redacted returns a copy whose non-empty credentials are replaced by a
// mark, for display. Empty ones stay empty: that shows the AWS default
// credential chain is in use.
func (c Config) Redacted() Config {
	if c.S3.AccessKey != "" {
		c.S3.AccessKey = redactedMark
	}
	if c.S3.SecretKey != "" {
		c.S3.SecretKey = redactedMark
	}
	return c
}

// scrub removes the credentials from a text.
func (c Config) scrub(s string) string {
	for _, secret := range []string{c.S3.SecretKey, c.S3.AccessKey} {
		if secret != "" {
			s = strings.ReplaceAll(s, secret, redactedMark)
		}
	}
	return s
}

// String renders the configuration as TOML with the credentials redacted,
// so that printing a Config with %v never shows them.
func (c Config) String() string {
	var b strings.Builder
	if err := toml.NewEncoder(&b).Encode(c.Redacted()); err != nil {
		return "config: " + err.Error() // cannot happen for these field types
	}
	return b.String()
}

// MarshalZerologObject logs every key (e.g. "s3.bucket") with the
// credentials redacted: log.Info().Object("config", cfg).
func (c Config) MarshalZerologObject(e *zerolog.Event) {
	for _, f := range fields(c.Redacted()) {
		e.Interface(f.key, f.value.Interface())
	}
}

// field is one key of Config, found by reflection.
type field struct {
	key, env, desc string
	aliases        []string // BS3's names of env, honoured too
	value          reflect.Value
}

// fields lists the keys of c in declaration order (top level, then each
// section), with their environment variable as cleanenv builds it (the
// section's env-prefix followed by the field's env tag).
func fields(c Config) []field {
	var out []field
	var walk func(v reflect.Value, section, prefix string)
	walk = func(v reflect.Value, section, prefix string) {
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			sf := t.Field(i)
			if !sf.IsExported() {
				continue // not a key (notices)
			}
			key := sf.Tag.Get("toml")
			if section != "" {
				key = section + "." + key
			}
			if sf.Type.Kind() == reflect.Struct {
				walk(v.Field(i), key, prefix+sf.Tag.Get("env-prefix"))
				continue
			}
			// The first name is bs3's; the others are BS3's for the
			// same key (cleanenv reads the first one set).
			names := strings.Split(sf.Tag.Get("env"), ",")
			for j := range names {
				names[j] = prefix + names[j]
			}
			out = append(out, field{
				key:     key,
				env:     names[0],
				aliases: names[1:],
				desc:    sf.Tag.Get("env-description"),
				value:   v.Field(i),
			})
		}
	}
	walk(reflect.ValueOf(c), "", "")
	return out
}

// Usage writes the text of `bs3 -h`: every key with its environment
// variable, its default and its meaning.
func Usage(w io.Writer) {
	fmt.Fprintf(w, `Configuration: a TOML file (bs3 -c FILE, e.g. /etc/bs3/config.toml); every key
can be overridden by its environment variable. Sizes: GiB for size, MiB for
the buffer and chunk sizes. Unknown keys are refused.

`)
	section := ""
	for _, f := range fields(Default()) {
		if s, _, ok := strings.Cut(f.key, "."); ok && s != section {
			section = s
			fmt.Fprintf(w, "\n[%s]\n", section)
		}
		def := fmt.Sprint(f.value.Interface())
		if f.value.Kind() == reflect.String {
			def = fmt.Sprintf("%q", f.value.String())
		}
		desc := f.desc
		if len(f.aliases) > 0 {
			desc += " (BS3's " + strings.Join(f.aliases, ", ") + " is honoured too)"
		}
		fmt.Fprintf(w, "  %-26s  %-30s  default %s\n      %s\n", f.key, f.env, def, desc)
	}
}

// GoString keeps %#v from showing the credentials.
func (c Config) GoString() string {
	type plain Config // no methods, so no recursion
	return fmt.Sprintf("%#v", plain(c.Redacted()))
}
