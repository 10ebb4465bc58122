package crashtest

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunker"
	bs3engine "github.com/bs3/bs3/internal/engine"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/volume"
)

// Geometry shared by every test here: small chunks and a small device, so
// that a few seconds of writing close many chunks, fill the device's hot
// regions over and over, and cross several periodic checkpoints.
const (
	blockSize = 4096
	chunkSize = 1 << 20
	// maxInflight is both the chunker's buffer count and the volume's
	// MaxInflight, as main wires them.
	maxInflight = 8
)

// engineOpts choose what differs between the engines of the tests.
type engineOpts struct {
	size    int64
	durable bool
	// ckptObjects and ckptInterval: 0 means 8 objects and 1 s, so that
	// kills also land while a checkpoint is being written.
	ckptObjects  int64
	ckptInterval time.Duration
	// maxBackoff caps the object proxy's retry delay (0: 1 s), so a test
	// resumes soon after an outage ends.
	maxBackoff time.Duration
	log        zerolog.Logger
}

// engine is one attach of a volume opened as main opens it for the NBD and
// FUSE frontends (engine.Open): object proxy → volume → userspace chunker.
type engine struct {
	e    *bs3engine.Engine
	objs *objproxy.Proxy
	vol  *volume.Volume
	dev  *chunker.Chunker
}

// openEngine attaches the volume in st. On error nothing is left running.
func openEngine(ctx context.Context, st store.Store, o engineOpts) (*engine, error) {
	if o.ckptObjects == 0 {
		o.ckptObjects = 8
	}
	if o.ckptInterval == 0 {
		o.ckptInterval = time.Second
	}
	if o.maxBackoff == 0 {
		o.maxBackoff = time.Second
	}
	e, err := bs3engine.Open(ctx, bs3engine.Options{
		Store: st,
		Proxy: objproxy.Options{
			Uploaders: 8, Downloaders: 16,
			AttemptTimeout: 20 * time.Second,
			BaseBackoff:    50 * time.Millisecond, MaxBackoff: o.maxBackoff,
		},
		Volume: volume.Options{
			Size: o.size, BlockSize: blockSize, ChunkSize: chunkSize,
			ConditionalWrites:  true,
			CheckpointInterval: o.ckptInterval, CheckpointObjects: o.ckptObjects,
			MaxInflight: maxInflight, MapIdleTimeout: 50 * time.Millisecond,
			RecoveryConcurrency: 16,
		},
		Chunker: &chunker.Options{Durable: o.durable, Buffers: maxInflight, CollisionArea: 1 << 20},
		Logger:  o.log,
	})
	if err != nil {
		return nil, err
	}
	return &engine{e: e, objs: e.Proxy, vol: e.Volume, dev: e.Chunker}, nil
}

// close stops the engine as SIGTERM does: the chunker commits what it
// holds, the volume writes its final checkpoint. Both errors are returned.
func (e *engine) close() error {
	return e.e.Close(context.Background())
}

// closeChecked closes e at the end of a test and reports a failed close.
func closeChecked(t *testing.T, e *engine, what string) {
	t.Helper()
	if err := e.close(); err != nil {
		t.Errorf("close %s: %v", what, err)
	}
}

// Block stamps. Every block a test writes starts with the id of the write
// and the device block number; the rest of the block is a slice of a fixed
// random pool at an offset derived from both. A block read back therefore
// names the write it came from, and a torn, shifted or foreign block fails
// the comparison. No stamp is all zeros, as ids are never 0, so zeros mean
// "discarded or never written". The body is copied and compared with
// copy and bytes.Equal, which the race detector checks as one range
// access, so stamping stays cheap in -race builds.

const stampHeader = 16

// stampPool is the same in every process (fixed seed), so the parent can
// check blocks its children wrote.
var stampPool = func() []byte {
	p := make([]byte, 4<<20)
	if _, err := rand.NewChaCha8([32]byte{'b', 's', '3'}).Read(p); err != nil {
		panic(err) // ChaCha8 never fails
	}
	return p
}()

// bodyOf returns the body write id puts in block (without the header).
func bodyOf(id uint64, block int64) []byte {
	off := mix(id^uint64(block)*0x9e3779b97f4a7c15) % uint64(len(stampPool)-blockSize)
	return stampPool[off : off+blockSize-stampHeader]
}

// stamp fills dst (one block) with the content write id puts in block.
func stamp(dst []byte, id uint64, block int64) {
	binary.LittleEndian.PutUint64(dst[0:], id)
	binary.LittleEndian.PutUint64(dst[8:], uint64(block))
	copy(dst[stampHeader:], bodyOf(id, block))
}

// mix is the splitmix64 finalizer: it spreads (id, block) over the pool.
func mix(z uint64) uint64 {
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

// stamped returns n blocks of write id starting at block.
func stamped(id uint64, block, n int64) []byte {
	buf := make([]byte, n*blockSize)
	for i := int64(0); i < n; i++ {
		stamp(buf[i*blockSize:(i+1)*blockSize], id, block+i)
	}
	return buf
}

var zeroBlock [blockSize]byte

// decodeBlock tells which write a block read back at block holds: 0 for
// all zeros, the write's id for an intact stamp, or an error describing
// what is wrong with it.
func decodeBlock(b []byte, block int64) (uint64, error) {
	id := binary.LittleEndian.Uint64(b[0:])
	at := int64(binary.LittleEndian.Uint64(b[8:]))
	if id == 0 && at == 0 {
		if !bytes.Equal(b, zeroBlock[:len(b)]) {
			return 0, errors.New("block starts with a zero stamp but is not all zeros (torn or foreign data)")
		}
		return 0, nil
	}
	if at != block {
		return 0, fmt.Errorf("block holds data write %#x put in block %d (misplaced data)", id, at)
	}
	if want := bodyOf(id, block); !bytes.Equal(b[stampHeader:], want) {
		i := 0
		for b[stampHeader+i] == want[i] {
			i++
		}
		return 0, fmt.Errorf("block holds write %#x's stamp but differs from its content at byte %d (torn or corrupt)", id, stampHeader+i)
	}
	return id, nil
}

// readBlocks reads the given blocks (sorted) through dev, in runs of up to
// 1 MiB read by four goroutines, and returns the write id each holds;
// undecodable blocks are reported in bad.
func readBlocks(ctx context.Context, dev *chunker.Chunker, blocks []int64) (got map[int64]uint64, bad map[int64]error, err error) {
	var runs [][2]int64
	for i := 0; i < len(blocks); {
		j := i + 1
		for j < len(blocks) && blocks[j] == blocks[j-1]+1 && j-i < 256 {
			j++
		}
		runs = append(runs, [2]int64{blocks[i], int64(j - i)})
		i = j
	}
	got = make(map[int64]uint64, len(blocks))
	bad = make(map[int64]error)
	var mu sync.Mutex
	var firstErr error
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 256*blockSize)
			for {
				i := next.Add(1) - 1
				if i >= int64(len(runs)) {
					return
				}
				start, n := runs[i][0], runs[i][1]
				p := buf[:n*blockSize]
				if err := dev.ReadAt(ctx, p, start*blockSize); err != nil {
					mu.Lock()
					firstErr = cmp.Or(firstErr, fmt.Errorf("read blocks %d+%d: %w", start, n, err))
					mu.Unlock()
					return
				}
				ids := make([]uint64, n)
				errs := make([]error, n)
				for k := range n {
					ids[k], errs[k] = decodeBlock(p[k*blockSize:(k+1)*blockSize], start+k)
				}
				mu.Lock()
				for k := range n {
					if errs[k] != nil {
						bad[start+k] = errs[k]
					} else {
						got[start+k] = ids[k]
					}
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, nil, firstErr
	}
	return got, bad, nil
}
