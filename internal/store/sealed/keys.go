package sealed

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/crypto/argon2"
)

// Key hierarchy (docs/ARCHITECTURE.md §16.2): a key-encryption key (KEK),
// from a key file or an Argon2id-stretched passphrase, wraps the random
// data key that seals the objects. Only the wrapped data key is stored,
// in the superblock, so changing the passphrase rewrites one small object.

// Names recorded in the superblock.
const (
	// CipherV1 is the object format of this package: AES-256-GCM per 4 KiB
	// segment under an HKDF-SHA256 subkey per object write.
	CipherV1 = "aes-256-gcm-hkdf-sha256-seg4k"
	// KDFKeyFile: the KEK is the key file's 256-bit key.
	KDFKeyFile = "keyfile"
	// KDFArgon2id: the KEK is Argon2id(passphrase, salt, params).
	KDFArgon2id = "argon2id"
)

// ErrWrongKey: the configured key or passphrase does not unwrap the data
// key of the volume.
var ErrWrongKey = errors.New("the key does not open this volume's data key")

// KeyConfig is where the key comes from ([encryption] in the
// configuration). At most one is set; neither means no encryption.
type KeyConfig struct {
	KeyFile        string
	PassphraseFile string
	// Checksums: a new volume without a key gets checksummed objects
	// (CipherChecksum). Existing volumes keep the format they were
	// created with, so this never changes how an object is read.
	Checksums bool
}

// Enabled reports whether encryption is configured.
func (c KeyConfig) Enabled() bool { return c.KeyFile != "" || c.PassphraseFile != "" }

// Argon2Params are the Argon2id cost parameters a passphrase was stretched
// with; recorded so they can change without breaking old volumes.
type Argon2Params struct {
	Time      uint32 `json:"time"`
	MemoryKiB uint32 `json:"memory_kib"`
	Threads   uint8  `json:"threads"`
}

// DefaultArgon2 follows RFC 9106's second recommended option (64 MiB,
// 3 passes): a few hundred milliseconds once per attach. A variable so
// tests can make it cheap.
var DefaultArgon2 = Argon2Params{Time: 3, MemoryKiB: 64 << 10, Threads: 4}

// Limits on recorded parameters: the superblock is not authenticated, so
// a tampered one must not make the daemon allocate without bound.
const (
	maxArgon2MemoryKiB = 4 << 20 // 4 GiB
	maxArgon2Time      = 64
)

// Record is the superblock's "encryption" field: everything needed to
// turn the configured key into the data key, nothing secret.
type Record struct {
	Cipher     string        `json:"cipher"`
	KDF        string        `json:"kdf"`
	Salt       []byte        `json:"salt,omitempty"`
	Argon2     *Argon2Params `json:"argon2,omitempty"`
	WrappedKey []byte        `json:"wrapped_key"`
	// SealID is bound into every sealed segment, so objects cannot be
	// moved between volumes that share a data key.
	SealID []byte `json:"seal_id"`
}

// keySource is a loaded KeyConfig: the key file's key or the passphrase.
type keySource struct {
	key        []byte // key file
	passphrase []byte // passphrase file
	path       string
}

// loadKeySource reads and checks the configured file.
func loadKeySource(c KeyConfig) (*keySource, error) {
	switch {
	case c.KeyFile != "" && c.PassphraseFile != "":
		return nil, errors.New("[encryption] key_file and passphrase_file are both set: set only one")
	case c.KeyFile != "":
		raw, err := readSecretFile(c.KeyFile, "key_file")
		if err != nil {
			return nil, err
		}
		key, err := parseKey(raw)
		if err != nil {
			return nil, fmt.Errorf("[encryption] key_file %s: %w", c.KeyFile, err)
		}
		return &keySource{key: key, path: c.KeyFile}, nil
	case c.PassphraseFile != "":
		raw, err := readSecretFile(c.PassphraseFile, "passphrase_file")
		if err != nil {
			return nil, err
		}
		p := []byte(strings.TrimRight(string(raw), "\r\n"))
		if len(p) == 0 {
			return nil, fmt.Errorf("[encryption] passphrase_file %s is empty: write the passphrase in it", c.PassphraseFile)
		}
		return &keySource{passphrase: p, path: c.PassphraseFile}, nil
	}
	return nil, errors.New("no [encryption] key_file or passphrase_file is set")
}

// readSecretFile reads a key or passphrase file, refusing one that others
// than its owner may read.
func readSecretFile(path, what string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("[encryption] %s: %w", what, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("[encryption] %s: %w", what, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("[encryption] %s %s is not a regular file", what, path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("[encryption] %s %s has mode %04o and may be read by group or others: run chmod 600 %s", what, path, perm, path)
	}
	raw := make([]byte, 4097)
	n, err := f.Read(raw)
	if err != nil && n == 0 {
		return nil, fmt.Errorf("[encryption] %s %s: %w", what, path, err)
	}
	if n > 4096 {
		return nil, fmt.Errorf("[encryption] %s %s is larger than 4 KiB: point it at the key or passphrase alone", what, path)
	}
	return raw[:n], nil
}

// parseKey accepts 32 raw bytes or 64 hex digits (surrounding white space
// allowed).
func parseKey(raw []byte) ([]byte, error) {
	if len(raw) == 32 {
		return raw, nil
	}
	t := strings.TrimSpace(string(raw))
	if len(t) == 64 {
		k, err := hex.DecodeString(t)
		if err == nil {
			return k, nil
		}
	}
	return nil, fmt.Errorf("holds %d bytes: want exactly 32 raw bytes or 64 hex digits (make one with: head -c 32 /dev/urandom > FILE; chmod 600 FILE)", len(raw))
}

// kdfName is the KDF a source produces its KEK with.
func (k *keySource) kdfName() string {
	if k.key != nil {
		return KDFKeyFile
	}
	return KDFArgon2id
}

// kek derives the key-encryption key for rec's parameters.
func (k *keySource) kek(rec *Record) ([]byte, error) {
	if rec.KDF != k.kdfName() {
		have := "[encryption] key_file"
		if k.key == nil {
			have = "[encryption] passphrase_file"
		}
		want := map[string]string{KDFKeyFile: "a key file (key_file)", KDFArgon2id: "a passphrase (passphrase_file)"}[rec.KDF]
		if want == "" {
			return nil, fmt.Errorf("volume's data key is wrapped with KDF %q, which this bs3 does not know", rec.KDF)
		}
		return nil, fmt.Errorf("volume's data key is wrapped by %s but the configuration sets %s: %w", want, have, ErrWrongKey)
	}
	if k.key != nil {
		return k.key, nil
	}
	p := rec.Argon2
	if p == nil || p.Time == 0 || p.Threads == 0 || p.MemoryKiB < 8*uint32(p.Threads) || len(rec.Salt) < 16 {
		return nil, errors.New("superblock's encryption record has no valid argon2 parameters or salt: the superblock is damaged")
	}
	if p.MemoryKiB > maxArgon2MemoryKiB || p.Time > maxArgon2Time {
		return nil, fmt.Errorf("superblock's argon2 parameters (time %d, memory %d KiB) exceed this bs3's limits: the superblock is damaged or was not written by bs3", p.Time, p.MemoryKiB)
	}
	return argon2.IDKey(k.passphrase, rec.Salt, p.Time, p.MemoryKiB, p.Threads, 32), nil
}

// wrapAD binds a wrapped key to its volume and KDF, so a wrapped key
// copied into another superblock does not open.
func wrapAD(rec *Record) []byte {
	return []byte("bs3 key wrap v1|" + rec.KDF + "|" + hex.EncodeToString(rec.SealID))
}

func gcmFor(kek []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(kek)
	if err != nil {
		return nil, fmt.Errorf("key wrap cipher: %w", err)
	}
	return cipher.NewGCM(b)
}

// wrap sets rec.WrappedKey to the data key sealed under the source's KEK
// (AES-256-GCM, random nonce first). A passphrase gets a new salt.
func (k *keySource) wrap(rec *Record, dataKey []byte) error {
	rec.KDF = k.kdfName()
	rec.Salt, rec.Argon2 = nil, nil
	if k.key == nil {
		p := DefaultArgon2
		rec.Argon2 = &p
		rec.Salt = make([]byte, 16)
		if _, err := rand.Read(rec.Salt); err != nil {
			return fmt.Errorf("passphrase salt: %w", err)
		}
	}
	kek, err := k.kek(rec)
	if err != nil {
		return err
	}
	g, err := gcmFor(kek)
	if err != nil {
		return err
	}
	nonce := make([]byte, g.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return fmt.Errorf("key wrap nonce: %w", err)
	}
	rec.WrappedKey = g.Seal(nonce, nonce, dataKey, wrapAD(rec))
	return nil
}

// unwrap returns the data key of rec, or an error wrapping ErrWrongKey.
func (k *keySource) unwrap(rec *Record) ([]byte, error) {
	if rec.Cipher != CipherV1 {
		return nil, fmt.Errorf("volume is sealed with cipher %q, which this bs3 does not know (it knows %q)", rec.Cipher, CipherV1)
	}
	if len(rec.SealID) != 16 {
		return nil, errors.New("superblock's encryption record has no valid seal_id: the superblock is damaged")
	}
	kek, err := k.kek(rec)
	if err != nil {
		return nil, err
	}
	g, err := gcmFor(kek)
	if err != nil {
		return nil, err
	}
	if len(rec.WrappedKey) < g.NonceSize()+g.Overhead() {
		return nil, errors.New("superblock's wrapped_key is too short: the superblock is damaged")
	}
	ns := g.NonceSize()
	dk, err := g.Open(nil, rec.WrappedKey[:ns], rec.WrappedKey[ns:], wrapAD(rec))
	if err != nil || len(dk) != 32 {
		return nil, fmt.Errorf("%w (%s %s)", ErrWrongKey, map[bool]string{true: "key_file", false: "passphrase_file"}[k.key != nil], k.path)
	}
	return dk, nil
}

// newRecord makes the encryption record of a new volume: a random data
// key and seal id, the data key wrapped by the source.
func (k *keySource) newRecord() (*Record, []byte, error) {
	dk := make([]byte, 32)
	rec := &Record{Cipher: CipherV1, SealID: make([]byte, 16)}
	if _, err := rand.Read(dk); err != nil {
		return nil, nil, fmt.Errorf("data key: %w", err)
	}
	if _, err := rand.Read(rec.SealID); err != nil {
		return nil, nil, fmt.Errorf("seal id: %w", err)
	}
	if err := k.wrap(rec, dk); err != nil {
		return nil, nil, err
	}
	return rec, dk, nil
}

// Rewrap returns a copy of rec whose data key is wrapped by newCfg
// instead of oldCfg (a passphrase change, or a move between a passphrase
// and a key file). The data key, the seal id and so every object stay as
// they are.
func Rewrap(rec *Record, oldCfg, newCfg KeyConfig) (*Record, error) {
	oldSrc, err := loadKeySource(oldCfg)
	if err != nil {
		return nil, fmt.Errorf("old key: %w", err)
	}
	newSrc, err := loadKeySource(newCfg)
	if err != nil {
		return nil, fmt.Errorf("new key: %w", err)
	}
	dk, err := oldSrc.unwrap(rec)
	if err != nil {
		return nil, err
	}
	out := *rec
	out.SealID = append([]byte(nil), rec.SealID...)
	if err := newSrc.wrap(&out, dk); err != nil {
		return nil, err
	}
	return &out, nil
}
