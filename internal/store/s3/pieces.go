package s3

import (
	"errors"
	"fmt"
	"io"
)

// piecesReader reads the concatenation of several byte slices, the body of
// a PutV, without joining them. It seeks because the SDK rewinds a body
// to sign or resend it.
type piecesReader struct {
	pieces [][]byte
	size   int64
	off    int64 // read position in the concatenation
	i      int   // piece holding off (len(pieces) at the end)
	in     int   // offset of off in pieces[i]
}

func newPiecesReader(pieces [][]byte) *piecesReader {
	r := &piecesReader{pieces: pieces}
	for _, p := range pieces {
		r.size += int64(len(p))
	}
	r.locate()
	return r
}

// locate sets i and in from off.
func (r *piecesReader) locate() {
	rest := r.off
	for r.i = 0; r.i < len(r.pieces); r.i++ {
		if rest < int64(len(r.pieces[r.i])) {
			r.in = int(rest)
			return
		}
		rest -= int64(len(r.pieces[r.i]))
	}
	r.in = 0
}

func (r *piecesReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) && r.i < len(r.pieces) {
		c := copy(p[n:], r.pieces[r.i][r.in:])
		n += c
		r.in += c
		r.off += int64(c)
		if r.in == len(r.pieces[r.i]) {
			r.i++
			r.in = 0
		}
	}
	if n == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	return n, nil
}

var errNegativeSeek = errors.New("seek to a negative position")

func (r *piecesReader) Seek(offset int64, whence int) (int64, error) {
	var abs int64
	switch whence {
	case io.SeekStart:
		abs = offset
	case io.SeekCurrent:
		abs = r.off + offset
	case io.SeekEnd:
		abs = r.size + offset
	default:
		return 0, fmt.Errorf("seek: whence %d", whence)
	}
	if abs < 0 {
		return 0, errNegativeSeek
	}
	r.off = abs
	r.locate() // past the end: no piece, reads find EOF
	return abs, nil
}
