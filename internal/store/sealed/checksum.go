package sealed

import (
	"crypto/cipher"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"

	"github.com/bs3/bs3/internal/crc32c"
	"github.com/bs3/bs3/internal/store"
)

// CipherChecksum is the record of a plaintext volume whose objects are
// framed like sealed ones but not encrypted: every 4 KiB segment carries a
// CRC32C over its bytes, the object's salt, its index, the final flag, the
// seal id and the object name (docs/ARCHITECTURE.md §16.6). A damaged,
// truncated, misplaced or mixed-up segment then reads as store.ErrCorrupt
// instead of wrong bytes. CRC32C guards against accidents (disks, networks,
// software), not against an attacker who rewrites objects: that needs
// [encryption]. A bs3 that predates this record refuses such a volume as
// "encrypted with an unknown cipher" rather than misreading its framing.
const CipherChecksum = "none-crc32c"

// kdfNone is the KDF of a checksum record: there is no key.
const kdfNone = "none"

// Encrypted reports whether the record is an encryption record (a key is
// needed), as opposed to a checksum-only one.
func (r *Record) Encrypted() bool { return r != nil && r.Cipher != CipherChecksum }

// newChecksumRecord is the record of a new checksummed plaintext volume.
func newChecksumRecord() (*Record, error) {
	rec := &Record{Cipher: CipherChecksum, KDF: kdfNone, SealID: make([]byte, 16)}
	if _, err := rand.Read(rec.SealID); err != nil {
		return nil, fmt.Errorf("seal id: %w", err)
	}
	return rec, nil
}

// NewChecksummed returns a store that frames the objects of inner with
// per-segment CRC32C checksums bound to volumeSeal (the record's seal id).
func NewChecksummed(inner store.Store, volumeSeal []byte) (*Store, error) {
	return newWithSuite(inner, crcSuite{}, volumeSeal)
}

// crcSuite is the checksum-only suite: the same segment format as AES-GCM
// (salt, body, 16-byte tag) with the body in the clear.
type crcSuite struct{}

func (crcSuite) aead(salt []byte) (cipher.AEAD, error) {
	if len(salt) != saltSize {
		return nil, fmt.Errorf("checksum frame: salt is %d bytes, want %d", len(salt), saltSize)
	}
	return &crcFrame{salt: [saltSize]byte(salt)}, nil
}

func (crcSuite) nonce(n []byte, salt []byte, i uint64) []byte { return aesSuite{}.nonce(n, salt, i) }

// crcTagMark fills the tag's unused bytes, so that a tag of zeros (a
// zeroed-out region) never verifies.
const crcTagMark = "bs3crc32"

// crcFrame implements cipher.AEAD without secrecy: Seal appends the
// plaintext and a tag of CRC32C | length | mark; Open checks all of it.
type crcFrame struct{ salt [saltSize]byte }

func (*crcFrame) NonceSize() int { return 12 }
func (*crcFrame) Overhead() int  { return tagSize }

func (f *crcFrame) tag(t []byte, nonce, body, ad []byte) {
	c := crc32c.Update(0, f.salt[:])
	c = crc32c.Update(c, nonce)
	c = crc32c.Update(c, ad)
	c = crc32c.Update(c, body)
	putCRCTag(t, c, len(body))
}

func (f *crcFrame) Seal(dst, nonce, plaintext, ad []byte) []byte {
	dst = append(dst, plaintext...)
	var t [tagSize]byte
	f.tag(t[:], nonce, plaintext, ad)
	return append(dst, t[:]...)
}

var errChecksum = errors.New("checksum mismatch")

func (f *crcFrame) Open(dst, nonce, ciphertext, ad []byte) ([]byte, error) {
	if len(ciphertext) < tagSize {
		return nil, errChecksum
	}
	body := ciphertext[:len(ciphertext)-tagSize]
	var t [tagSize]byte
	f.tag(t[:], nonce, body, ad)
	if subtle.ConstantTimeCompare(t[:], ciphertext[len(body):]) != 1 {
		return nil, errChecksum
	}
	return append(dst, body...), nil
}
