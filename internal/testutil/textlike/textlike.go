// Package textlike generates deterministic text-like data (log- and
// config-like lines of words, numbers and key=value pairs) for the
// compression tests and benchmarks (docs/ARCHITECTURE.md §19). It is a
// harder case than real prose or logs: the words are random strings, so
// only their repetition compresses.
package textlike

import (
	"bytes"
	"fmt"
	"math/rand/v2"
)

// Bytes returns n bytes of text-like data, the same for the same seed.
func Bytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 42))
	vocab := make([]string, 2000)
	for i := range vocab {
		w := make([]byte, 2+r.IntN(9))
		for j := range w {
			w[j] = byte('a' + r.IntN(26))
		}
		vocab[i] = string(w)
	}
	var b bytes.Buffer
	b.Grow(n + 64)
	for b.Len() < n {
		switch r.IntN(12) {
		case 0:
			fmt.Fprintf(&b, "%d", r.IntN(100000))
		case 1:
			b.WriteString(". ")
		case 2:
			b.WriteString("\n")
		case 3:
			fmt.Fprintf(&b, "%s=%q ", vocab[r.IntN(64)], vocab[r.IntN(len(vocab))])
		default:
			// Zipf-like: common words far more often.
			b.WriteString(vocab[int(float64(len(vocab))*r.Float64()*r.Float64()*r.Float64())])
			b.WriteByte(' ')
		}
	}
	return b.Bytes()[:n]
}
