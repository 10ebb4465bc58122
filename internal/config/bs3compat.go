package config

// Drop-in for users of the original BS3: its config.toml loads unchanged.
// Its keys that bs3 kept mean the same here; what differs is handled in
// this file:
//
//   - log.level may be BS3's zerolog number (-1 trace … 5 panic) as well
//     as a name (Level);
//   - BS3's environment names without the word separators
//     (BS3_QUEUEDEPTH, BS3_WRITE_CHUNKSIZE, BS3_SKIP, ...) are listed as
//     second names in the env tags of Config, after bs3's own, which wins
//     when both are set;
//   - keys and variables that no longer apply (retired) are accepted, in
//     their original type, and reported as notices for the daemon to log.
//
// Anything else unknown is still refused: a typo must not fall back to a
// default silently.

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
	"github.com/rs/zerolog"
)

// Level is log.level: a zerolog level name. The original BS3 wrote it as
// zerolog's number (-1 trace, 0 debug, 1 info, 2 warn, 3 error, 4 fatal,
// 5 panic); such a number, in the file (a TOML integer) or in
// BS3_LOG_LEVEL, is stored as its name. Anything else is kept as written,
// for Validate to refuse with the other problems.
type Level string

// UnmarshalText implements encoding.TextUnmarshaler, which both the TOML
// decoder (for a string or an integer) and cleanenv use.
func (l *Level) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	if n, err := strconv.Atoi(s); err == nil && n >= int(zerolog.TraceLevel) && n <= int(zerolog.PanicLevel) {
		s = zerolog.Level(n).String()
	}
	*l = Level(s)
	return nil
}

// Notice reports a setting of the original BS3 that bs3 accepted but that
// has no effect here.
type Notice struct {
	// Key is the key as written in the file ("cpus_per_node") or the
	// environment variable ("BS3_CPUS_PER_NODE").
	Key string
	// Text says why it has no effect and what to do instead.
	Text string
}

// Notices lists the retired BS3 keys and variables the configuration was
// read with, in the order found. The daemon logs each once it has its
// logger (LogNotices); they are no error.
func (c Config) Notices() []Notice { return c.notices }

// LogNotices logs each notice as a warning naming the key.
func (c Config) LogNotices(log zerolog.Logger) {
	for _, n := range c.notices {
		log.Warn().Str("key", n.Key).Msg("configuration: " + n.Text)
	}
}

// retired is a key of the original BS3 that bs3 has no use for.
type retired struct {
	key  string // as in the file: "cpus_per_node", "s3.profile"
	env  string // BS3's environment variable
	typ  string // the TOML type BS3 decoded it as (toml.MetaData.Type)
	what string // Go type name for messages
	why  string
}

// retiredBS3 are BS3's keys that bs3 accepts without effect.
var retiredBS3 = []retired{
	{
		key: "cpus_per_node", env: "BS3_CPUS_PER_NODE", typ: "Integer", what: "an integer",
		why: "BS3 pinned its BUSE queues to NUMA nodes; bs3 leaves thread placement to the Go scheduler. Remove the key",
	},
	{
		// Only in early BS3 releases.
		key: "s3.profile", env: "BS3_S3_PROFILE", typ: "String", what: "a string",
		why: "bs3 has no profile key: with empty s3.access_key and s3.secret_key it uses the AWS default credential chain, which honours AWS_PROFILE. Remove the key and set AWS_PROFILE instead",
	},
}

// retiredKeys splits the undecoded keys of a file into the retired BS3
// keys, returned as notices, and the rest, returned as unknown. A retired
// key of the wrong type is an error: BS3 would have refused it too.
func retiredKeys(md toml.MetaData, undecoded []string) (unknown []string, notices []Notice, err error) {
	for _, k := range undecoded {
		r, ok := findRetired(k)
		if !ok {
			unknown = append(unknown, k)
			continue
		}
		if t := md.Type(strings.Split(k, ".")...); t != r.typ {
			return nil, nil, fmt.Errorf("%s: BS3's key must be %s, not a TOML %s (bs3 ignores it; best remove it)", k, r.what, strings.ToLower(t))
		}
		notices = append(notices, Notice{Key: k, Text: k + " (a BS3 key) is accepted but has no effect: " + r.why + "."})
	}
	return unknown, notices, nil
}

func findRetired(key string) (retired, bool) {
	for _, r := range retiredBS3 {
		if r.key == key {
			return r, true
		}
	}
	return retired{}, false
}

// retiredEnvNotices reports BS3's variables of retired keys that are set.
func retiredEnvNotices() []Notice {
	var out []Notice
	for _, r := range retiredBS3 {
		if _, ok := os.LookupEnv(r.env); ok {
			out = append(out, Notice{Key: r.env, Text: r.env + " (BS3's variable for " + r.key + ") is accepted but has no effect: " + r.why + "."})
		}
	}
	return out
}

// envAliasHint adds to a cleanenv error, which names a field's first
// variable, the BS3 name the bad value was actually read from, if any.
func envAliasHint(msg string) string {
	for _, f := range fields(Default()) {
		if len(f.aliases) == 0 || !strings.Contains(msg, " "+f.env+":") {
			continue
		}
		if _, ok := os.LookupEnv(f.env); ok {
			break
		}
		for _, a := range f.aliases {
			if _, ok := os.LookupEnv(a); ok {
				return msg + " (the value was read from " + a + ", BS3's name for " + f.env + ")"
			}
		}
	}
	return msg
}
