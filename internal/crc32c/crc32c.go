// Package crc32c owns the CRC32C (Castagnoli) checksums bs3 uses
// everywhere (chunk uploads, checkpoints, the read cache's records, the
// compressed and sealed formats), with the one table they share, and what
// hash/crc32 lacks: combining the checksums of two pieces into the
// checksum of their concatenation. The chunk builder checksums each write's data as
// it copies it into the chunk, while the bytes are in the CPU's cache, and
// the upload's payload checksum is then combined from that and the small
// metadata area instead of reading the whole object from memory again
// (docs/ARCHITECTURE.md §18).
package crc32c

import "hash/crc32"

// poly is the Castagnoli polynomial, bit-reversed as hash/crc32 uses it.
const poly = 0x82f63b78

var table = crc32.MakeTable(crc32.Castagnoli)

// Checksum is the CRC32C of b.
func Checksum(b []byte) uint32 { return crc32.Checksum(b, table) }

// Update is the CRC32C of the bytes crc covers followed by b.
func Update(crc uint32, b []byte) uint32 { return crc32.Update(crc, table, b) }

// Combine returns the CRC32C of a||b from crcA = Checksum(a), crcB =
// Checksum(b) and n = len(b).
//
// A CRC is the remainder of the message polynomial (with the fixed
// pre- and post-conditioning of CRC32C) modulo the generator. Appending n
// bytes multiplies a's remainder by x^(8n), and the conditioning terms of
// the two pieces cancel out, so crc(a||b) = crcA·x^(8n) mod P ⊕ crcB.
func Combine(crcA, crcB uint32, n int64) uint32 {
	if n <= 0 {
		return crcA
	}
	return mulMod(xPow8n(n), crcA) ^ crcB
}

// Polynomials are held bit-reversed, as the CRC is: the top bit is the
// coefficient of x^0, the lowest that of x^31.

const one = uint32(1) << 31 // the polynomial 1

// mulMod returns a·b mod P.
func mulMod(a, b uint32) uint32 {
	var p uint32
	for m := one; m != 0 && a != 0; m >>= 1 {
		if a&m != 0 {
			p ^= b
			a ^= m
		}
		// b·x: every term moves up one power; x^32 folds back as P's
		// lower terms.
		if b&1 != 0 {
			b = b>>1 ^ poly
		} else {
			b >>= 1
		}
	}
	return p
}

// xPow8n returns x^(8n) mod P, by squaring.
func xPow8n(n int64) uint32 {
	r := one
	sq := one >> 8 // x^8
	for ; n > 0; n >>= 1 {
		if n&1 != 0 {
			r = mulMod(r, sq)
		}
		sq = mulMod(sq, sq)
	}
	return r
}

// Shifter is Combine for one fixed length of b, by table: a·x^(8n) mod P
// is linear in a, so it is the XOR of four byte lookups. The sealed
// store combines one per 4 KiB segment, where Combine's bit-serial
// multiplications would cost about as much as checksumming the segment.
type Shifter struct {
	n int64
	t [4][256]uint32
}

// NewShifter returns the Shifter for pieces b of n bytes.
func NewShifter(n int64) *Shifter {
	s := &Shifter{n: n}
	p := xPow8n(n)
	for k := range s.t {
		for b := range s.t[k] {
			s.t[k][b] = mulMod(p, uint32(b)<<(8*k))
		}
	}
	return s
}

// Len is the length of b the Shifter combines.
func (s *Shifter) Len() int64 { return s.n }

// Combine returns the CRC32C of a||b from crcA = Checksum(a) and crcB =
// Checksum(b), where len(b) is s.Len().
func (s *Shifter) Combine(crcA, crcB uint32) uint32 {
	if s.n <= 0 {
		return crcA
	}
	return s.t[0][crcA&0xff] ^ s.t[1][crcA>>8&0xff] ^ s.t[2][crcA>>16&0xff] ^ s.t[3][crcA>>24] ^ crcB
}
