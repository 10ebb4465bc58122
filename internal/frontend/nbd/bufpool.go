package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers are pooled by power-of-two size class: under load every
// request needs one, and allocating up to 32 MiB per request would keep
// the garbage collector busy.

const minBufClass = 12 // 4 KiB

var bufPools [33]sync.Pool

// bufClass is the smallest class whose capacity (1<<class) holds n bytes.
func bufClass(n int) int {
	if n <= 1<<minBufClass {
		return minBufClass
	}
	return bits.Len(uint(n - 1))
}

// getBuf returns a buffer of length n. Its contents are stale: callers
// overwrite all n bytes before using them.
func getBuf(n int) *[]byte {
	c := bufClass(n)
	if v := bufPools[c].Get(); v != nil {
		p := v.(*[]byte)
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<c)
	return &b
}

// putBuf returns a buffer from getBuf to its pool.
func putBuf(p *[]byte) {
	c := bufClass(cap(*p))
	if cap(*p) != 1<<c {
		return // not one of ours; let the collector have it
	}
	bufPools[c].Put(p)
}
