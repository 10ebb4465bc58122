package compressed

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
)

// Codec ids as recorded in an object's header. An object names its own
// codec, so objects written under different settings coexist and every
// codec stays readable whatever the configuration says now.
const (
	codecNone byte = 0 // every segment is stored raw
	codecZstd byte = 1
	codecLZ4  byte = 2
	codecS2   byte = 3
)

// Codecs are the names [compression] codec accepts.
var Codecs = []string{"none", "zstd", "lz4", "s2"}

// Levels are the names [compression] level accepts.
var Levels = []string{"fastest", "default", "better", "best"}

func codecID(name string) (byte, error) {
	switch name {
	case "none", "":
		return codecNone, nil
	case "zstd":
		return codecZstd, nil
	case "lz4":
		return codecLZ4, nil
	case "s2":
		return codecS2, nil
	}
	return 0, fmt.Errorf("compression codec %q is not known: use one of %s", name, strings.Join(Codecs, ", "))
}

func codecName(id byte) string {
	switch id {
	case codecNone:
		return "none"
	case codecZstd:
		return "zstd"
	case codecLZ4:
		return "lz4"
	case codecS2:
		return "s2"
	}
	return fmt.Sprintf("unknown codec %d", id)
}

// encoder compresses one segment. It is safe for concurrent use.
type encoder interface {
	// encode appends the compressed form of src to dst.
	encode(dst, src []byte) []byte
}

func newEncoder(id byte, level string) (encoder, error) {
	switch level {
	case "", "fastest", "default", "better", "best":
	default:
		return nil, fmt.Errorf("compression level %q is not known: use one of %s", level, strings.Join(Levels, ", "))
	}
	switch id {
	case codecNone:
		return nil, nil
	case codecZstd:
		l := map[string]zstd.EncoderLevel{
			"": zstd.SpeedDefault, "fastest": zstd.SpeedFastest, "default": zstd.SpeedDefault,
			"better": zstd.SpeedBetterCompression, "best": zstd.SpeedBestCompression,
		}[level]
		// Our own per-segment CRC32C covers the plaintext; the frame
		// checksum would only repeat it.
		e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(l), zstd.WithEncoderCRC(false),
			zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)))
		if err != nil {
			return nil, fmt.Errorf("zstd encoder: %w", err)
		}
		return zstdEncoder{e}, nil
	case codecS2:
		switch level {
		case "better":
			return s2Encoder(s2.EncodeBetter), nil
		case "best":
			return s2Encoder(s2.EncodeBest), nil
		}
		return s2Encoder(s2.Encode), nil
	case codecLZ4:
		if level == "better" || level == "best" {
			hc := lz4.Level5
			if level == "best" {
				hc = lz4.Level9
			}
			return &lz4Encoder{pool: sync.Pool{New: func() any { return &lz4.CompressorHC{Level: hc} }}}, nil
		}
		return &lz4Encoder{pool: sync.Pool{New: func() any { return &lz4.Compressor{} }}}, nil
	}
	return nil, fmt.Errorf("compression codec %d is not known", id)
}

type zstdEncoder struct{ e *zstd.Encoder }

func (z zstdEncoder) encode(dst, src []byte) []byte { return z.e.EncodeAll(src, dst) }

type s2Encoder func(dst, src []byte) []byte

func (f s2Encoder) encode(dst, src []byte) []byte {
	n := s2.MaxEncodedLen(len(src))
	if n < 0 {
		return append(dst, src...) // too large for s2: never smaller
	}
	dst = grow(dst, n)
	out := f(dst[len(dst):len(dst)+n], src)
	return dst[:len(dst)+len(out)]
}

type lz4Encoder struct{ pool sync.Pool }

func (l *lz4Encoder) encode(dst, src []byte) []byte {
	bound := lz4.CompressBlockBound(len(src))
	dst = grow(dst, bound)
	c := l.pool.Get().(interface {
		CompressBlock(src, dst []byte) (int, error)
	})
	defer l.pool.Put(c)
	n, err := c.CompressBlock(src, dst[len(dst):len(dst)+bound])
	if err != nil || n == 0 {
		// Incompressible: the caller stores the segment raw when the
		// result does not shrink, so hand back something as long.
		return append(dst, src...)
	}
	return dst[:len(dst)+n]
}

// grow returns b with room for n more bytes.
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b
	}
	nb := make([]byte, len(b), len(b)+n)
	copy(nb, b)
	return nb
}

// decoders decode every codec, whatever the configured one, since an
// object records its own. They are safe for concurrent use.
type decoders struct {
	once sync.Once
	zstd *zstd.Decoder
	err  error
}

var errDecode = errors.New("segment does not decode")

// decode decompresses src, a segment of codec id, into dst, which has
// exactly the segment's plaintext length, never writing past it.
func (d *decoders) decode(id byte, dst, src []byte) error {
	switch id {
	case codecZstd:
		d.once.Do(func() {
			// DecodeAll with a capacity limit writes into dst and
			// nowhere else; a damaged frame cannot make it allocate
			// past a segment.
			d.zstd, d.err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0),
				zstd.WithDecodeAllCapLimit(true), zstd.WithDecoderMaxMemory(maxSegment))
		})
		if d.err != nil {
			return fmt.Errorf("zstd decoder: %w", d.err)
		}
		out, err := d.zstd.DecodeAll(src, dst[:0:len(dst)])
		if err != nil {
			return fmt.Errorf("%w: zstd: %v", errDecode, err)
		}
		if len(out) != len(dst) || (len(out) > 0 && &out[0] != &dst[0]) {
			return fmt.Errorf("%w: zstd gave %d bytes, want %d", errDecode, len(out), len(dst))
		}
		return nil
	case codecS2:
		n, err := s2.DecodedLen(src)
		if err != nil || n != len(dst) {
			return fmt.Errorf("%w: s2 length %d (%v), want %d", errDecode, n, err, len(dst))
		}
		out, err := s2.Decode(dst, src)
		if err != nil || len(out) != len(dst) || (len(out) > 0 && &out[0] != &dst[0]) {
			return fmt.Errorf("%w: s2: %v", errDecode, err)
		}
		return nil
	case codecLZ4:
		n, err := lz4.UncompressBlock(src, dst)
		if err != nil || n != len(dst) {
			return fmt.Errorf("%w: lz4 gave %d bytes (%v), want %d", errDecode, n, err, len(dst))
		}
		return nil
	}
	return fmt.Errorf("%w: %s", errDecode, codecName(id))
}
