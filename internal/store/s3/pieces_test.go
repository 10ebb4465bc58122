package s3

import (
	"bytes"
	"io"
	"math/rand/v2"
	"testing"
)

// TestPiecesReader: reads in any sizes, after any seek, return the
// concatenation of the pieces from the position sought, and EOF at its
// end; a seek before the start fails.
func TestPiecesReader(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var pieces [][]byte
	var all []byte
	for _, n := range []int{0, 1, 7, 0, 4096, 3, 0, 65536, 5} {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		pieces = append(pieces, p)
		all = append(all, p...)
	}
	r := newPiecesReader(pieces)
	got, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(got, all) {
		t.Fatalf("ReadAll: %d bytes, %v; want the %d bytes of the pieces", len(got), err, len(all))
	}
	for range 200 {
		pos := rng.Int64N(int64(len(all)) + 10)
		whence := rng.IntN(3)
		var off int64
		switch whence {
		case io.SeekStart:
			off = pos
		case io.SeekCurrent:
			cur, _ := r.Seek(0, io.SeekCurrent)
			off = pos - cur
		case io.SeekEnd:
			off = pos - int64(len(all))
		}
		if abs, err := r.Seek(off, whence); err != nil || abs != pos {
			t.Fatalf("Seek(%d, %d) = %d, %v; want %d", off, whence, abs, err, pos)
		}
		buf := make([]byte, 1+rng.IntN(70000))
		n, err := io.ReadFull(r, buf)
		want := all[min(pos, int64(len(all))):]
		want = want[:min(len(want), len(buf))]
		if !bytes.Equal(buf[:n], want) {
			t.Fatalf("read %d bytes at %d: wrong bytes", n, pos)
		}
		if n < len(buf) && err != io.ErrUnexpectedEOF && err != io.EOF {
			t.Fatalf("short read at %d: %v", pos, err)
		}
	}
	if _, err := r.Seek(-1, io.SeekStart); err == nil {
		t.Fatal("a seek before the start succeeded")
	}
}
