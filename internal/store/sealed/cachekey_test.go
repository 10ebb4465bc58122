package sealed

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"testing"

	"github.com/bs3/bs3/internal/store/mem"
)

// TestCacheSealer: a sealed cache file opens with the same volume's
// sealer and AD only; two seals of one plaintext differ (fresh salt); the
// cache key is neither the data key nor an object subkey.
func TestCacheSealer(t *testing.T) {
	s := newSealed(t, mem.New(), testSeal)
	cs, err := s.CacheSealer()
	if err != nil {
		t.Fatal(err)
	}
	plain := bytes.Repeat([]byte("window "), 9000)
	ad := []byte("header of key 5 window 1")
	a, err := cs.Seal([]byte("prefix"), plain, ad)
	if err != nil {
		t.Fatal(err)
	}
	b, err := cs.Seal(nil, plain, ad)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(a, []byte("prefix")) || len(a) != len("prefix")+len(plain)+cs.Overhead() {
		t.Fatalf("Seal appended %d bytes, want %d after the prefix", len(a)-len("prefix"), len(plain)+cs.Overhead())
	}
	if bytes.Equal(a[len("prefix"):], b) || bytes.Contains(a, plain[:64]) {
		t.Fatal("two seals are equal, or a seal holds plaintext")
	}
	open := func(sealer *CacheSealer, sealedBytes, ad []byte) ([]byte, error) {
		return sealer.Open([]byte("dst"), sealedBytes, ad)
	}
	if got, err := open(cs, b, ad); err != nil || !bytes.Equal(got, append([]byte("dst"), plain...)) {
		t.Fatalf("open: err %v, equal %v", err, bytes.Equal(got, plain))
	}
	if _, err := open(cs, b, []byte("header of key 5 window 2")); err == nil {
		t.Error("opened with another window's AD")
	}
	other := newSealed(t, mem.New(), bytes.Repeat([]byte{8}, 16))
	ocs, err := other.CacheSealer()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := open(ocs, b, ad); err == nil {
		t.Error("opened by the sealer of a volume with another seal id and the same data key")
	}
	// The salt, the start and end of the ciphertext, the tag.
	for _, i := range []int{0, 15, 16, 17, 1000, len(b) - 17, len(b) - 16, len(b) - 1} {
		c := append([]byte(nil), b...)
		c[i] ^= 0x80
		if _, err := open(cs, c, ad); err == nil {
			t.Fatalf("opened with byte %d flipped", i)
		}
	}
	if _, err := open(cs, b[:10], ad); err == nil {
		t.Error("opened a truncated file")
	}
	salt := b[:cacheSaltSize]
	obj, err := hkdf.Key(sha256.New, testKey, salt, subkeyInfo, 32)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(cs.key, testKey) || bytes.Equal(cs.key, obj) {
		t.Error("cache key equals the data key or an object subkey")
	}
	if _, err := (&Store{}).CacheSealer(); err == nil {
		t.Error("a store without a data key gave a cache sealer")
	}
}
