package sealed

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
)

// Disk-cache sealing (docs/ARCHITECTURE.md §16.5). The read cache's disk
// tier must not hold plaintext of an encrypted volume, so its files are
// sealed too, under keys that can never equal an object subkey:
//
//	cache key = HKDF-SHA256(data key, salt seal_id, info "bs3 read cache v1")
//	file key  = HKDF-SHA256(cache key, salt file salt (16 random bytes), info "bs3 read cache file v1")
//	sealed    = file salt | AES-256-GCM(file key, nonce 0, plaintext, AD) | tag
//
// A file key seals exactly one file, so the zero nonce never repeats under
// a key (short of a 128-bit salt collision), however many files a
// long-lived volume's cache writes; a random 96-bit nonce under one key
// would reach GCM's 2^32-message bound after 256 TiB of 64 KiB windows.
// The caller's associated data names the window (volume id, object key,
// window index); the seal id is in the key, so a file from another volume
// or another data key does not open.
const (
	cacheKeyInfo  = "bs3 read cache v1"
	cacheFileInfo = "bs3 read cache file v1"
	cacheSaltSize = 16
)

// CacheSealer seals and opens the read cache's disk files of one
// encrypted volume. It holds only the derived cache key, never the data
// key. It implements cache.Sealer and is safe for concurrent use.
type CacheSealer struct {
	key []byte
}

// CacheSealer returns the sealer of this volume's disk cache files, or an
// error when the store was built without a data key (benchmark suites).
func (s *Store) CacheSealer() (*CacheSealer, error) {
	if s.cacheKey == nil {
		return nil, errors.New("sealed store has no data key to derive a cache key from")
	}
	return &CacheSealer{key: s.cacheKey}, nil
}

// deriveCacheKey is the volume's cache key (see above).
func deriveCacheKey(dataKey, seal []byte) ([]byte, error) {
	k, err := hkdf.Key(sha256.New, dataKey, seal, cacheKeyInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("derive read cache key: %w", err)
	}
	return k, nil
}

func (c *CacheSealer) fileAEAD(salt []byte) (cipher.AEAD, error) {
	k, err := hkdf.Key(sha256.New, c.key, salt, cacheFileInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("derive read cache file key: %w", err)
	}
	b, err := aes.NewCipher(k)
	if err != nil {
		return nil, fmt.Errorf("read cache file cipher: %w", err)
	}
	return cipher.NewGCM(b)
}

// Overhead is the bytes Seal adds to a plaintext.
func (c *CacheSealer) Overhead() int { return cacheSaltSize + tagSize }

// Seal appends to dst the sealed form of plain, bound to ad. dst must not
// overlap plain.
func (c *CacheSealer) Seal(dst, plain, ad []byte) ([]byte, error) {
	var salt [cacheSaltSize]byte
	if _, err := rand.Read(salt[:]); err != nil {
		return nil, fmt.Errorf("read cache file salt: %w", err)
	}
	g, err := c.fileAEAD(salt[:])
	if err != nil {
		return nil, err
	}
	var nonce [12]byte
	dst = append(dst, salt[:]...)
	return g.Seal(dst, nonce[:], plain, ad), nil
}

// Open verifies sealed (as Seal made it) against ad and appends its
// plaintext to dst, which must not overlap sealed (the cache opens a
// record into a window buffer of its pool). A file that fails is an error,
// and dst's spare capacity is then undefined.
func (c *CacheSealer) Open(dst, sealed, ad []byte) ([]byte, error) {
	if len(sealed) < c.Overhead() {
		return nil, fmt.Errorf("sealed cache data is %d bytes, shorter than its %d-byte overhead", len(sealed), c.Overhead())
	}
	g, err := c.fileAEAD(sealed[:cacheSaltSize])
	if err != nil {
		return nil, err
	}
	var nonce [12]byte
	ct := sealed[cacheSaltSize:]
	p, err := g.Open(dst, nonce[:], ct, ad)
	if err != nil {
		return nil, errors.New("authentication failed (another volume's or key's file, or damaged)")
	}
	return p, nil
}
