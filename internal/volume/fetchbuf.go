package volume

import (
	"math/bits"
	"sync"
)

// Fetch buffers are pooled by power-of-two size class. A GET's bytes land
// in one, and from there they are copied into the read's buffers and into
// the cache windows; a fresh buffer per GET cost a zeroing and, on a
// growing heap, a page fault per 4 KiB on top of those copies (the cold
// fragmented read spent about a tenth of its CPU zeroing them). Nothing
// keeps a fetch buffer after fetch returns: the object proxy returns only
// once no attempt writes into it any more, and what is kept is copied out.

const (
	minFetchClass = 16 // 64 KiB
	maxFetchClass = 23 // 8 MiB; larger buffers are not pooled
)

var fetchBufs [maxFetchClass + 1]sync.Pool

// getFetchBuf returns a buffer of length n with stale contents: only the
// bytes a GET wrote are read from it.
func getFetchBuf(n int64) *[]byte {
	c := max(bits.Len64(uint64(n-1)), minFetchClass)
	if c <= maxFetchClass {
		if v := fetchBufs[c].Get(); v != nil {
			p := v.(*[]byte)
			*p = (*p)[:n]
			return p
		}
		b := make([]byte, n, 1<<c)
		return &b
	}
	b := make([]byte, n)
	return &b
}

// putFetchBuf returns a buffer from getFetchBuf to its pool.
func putFetchBuf(p *[]byte) {
	c := bits.Len64(uint64(cap(*p) - 1))
	if c < minFetchClass || c > maxFetchClass || cap(*p) != 1<<c {
		return
	}
	fetchBufs[c].Put(p)
}
