package fuse

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
)

// These tests exercise the byte-to-block translation without a kernel, so
// they run everywhere; the FUSE tests cover the same paths end to end.

func TestBlockIORandomAgainstReference(t *testing.T) {
	for _, bs := range []int64{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			const size = 1 << 20
			dev := newTestDevice(t, size, bs).(*memDevice)
			b := newBlockIO(dev)
			ref := make([]byte, size)
			rng := rand.New(rand.NewPCG(uint64(bs), 1))
			ctx := context.Background()
			for i := range 2000 {
				off := rng.Int64N(size)
				n := 1 + rng.Int64N(3*bs)
				if i%10 == 0 {
					n = 1 + rng.Int64N(200<<10)
				}
				want := min(n, size-off)
				switch rng.IntN(3) {
				case 0:
					p := make([]byte, n)
					fillRandom(rng, p)
					got, err := b.write(ctx, p, off, false)
					if err != nil || int64(got) != want {
						t.Fatalf("write(%d bytes at %d) = %d, %v; want %d, nil", n, off, got, err, want)
					}
					copy(ref[off:], p[:want])
				case 1:
					p := make([]byte, n)
					got, err := b.read(ctx, p, off)
					if err != nil || int64(got) != want {
						t.Fatalf("read(%d bytes at %d) = %d, %v; want %d, nil", n, off, got, err, want)
					}
					if !bytes.Equal(p[:got], ref[off:off+want]) {
						t.Fatalf("read(%d bytes at %d) returned wrong data", n, off)
					}
				case 2:
					discard := rng.IntN(2) == 0
					if err := b.zero(ctx, off, want, discard, false); err != nil {
						t.Fatalf("zero(%d, %d) = %v", off, want, err)
					}
					clear(ref[off : off+want])
				}
			}
			if !bytes.Equal(dev.snapshot(), ref) {
				t.Fatal("device content differs from the reference")
			}
		})
	}
}

func TestBlockIOBounds(t *testing.T) {
	const size, bs = 64 << 10, 4096
	dev := newTestDevice(t, size, bs).(*memDevice)
	b := newBlockIO(dev)
	ctx := context.Background()

	if n, err := b.write(ctx, []byte{1}, size, false); !errors.Is(err, syscall.ENOSPC) || n != 0 {
		t.Fatalf("write at the end = %d, %v; want 0, ENOSPC", n, err)
	}
	if n, err := b.write(ctx, bytes.Repeat([]byte{7}, 100), size-10, false); err != nil || n != 10 {
		t.Fatalf("write across the end = %d, %v; want 10, nil", n, err)
	}
	p := make([]byte, 100)
	if n, err := b.read(ctx, p, size-10); err != nil || n != 10 || !bytes.Equal(p[:10], bytes.Repeat([]byte{7}, 10)) {
		t.Fatalf("read across the end = %d, %v, %v", n, err, p[:n])
	}
	if n, err := b.read(ctx, p, size); err != nil || n != 0 {
		t.Fatalf("read at the end = %d, %v; want 0, nil", n, err)
	}
	if err := b.zero(ctx, size-bs, 2*bs, true, false); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("zero past the end = %v; want EINVAL", err)
	}
	if _, err := b.write(ctx, []byte{1}, -1, false); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("write at -1 = %v; want EINVAL", err)
	}
}

// TestBlockIOConcurrentRMW interleaves many writers within the same blocks:
// writer g owns every run-byte piece whose index is g modulo the number of
// writers. Without the RMW lock, one writer's read-modify-write puts back
// stale bytes of its neighbours.
func TestBlockIOConcurrentRMW(t *testing.T) {
	const size, bs, writers, run = 64 << 10, 4096, 8, 4
	const region = 2 * bs // a multiple of writers*run: every byte has an owner
	dev := newTestDevice(t, size, bs).(*memDevice)
	dev.slowReads.Store(true)
	b := newBlockIO(dev)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			val := bytes.Repeat([]byte{byte(g + 1)}, run)
			for off := int64(g * run); off < region; off += writers * run {
				if _, err := b.write(context.Background(), val, off, false); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := dev.snapshot()
	for i := range int64(region) {
		if want := byte((i/run)%writers + 1); got[i] != want {
			t.Fatalf("byte %d = %d, want %d (lost update)", i, got[i], want)
		}
	}
}

func fillRandom(rng *rand.Rand, p []byte) {
	for len(p) >= 8 {
		binary.LittleEndian.PutUint64(p, rng.Uint64())
		p = p[8:]
	}
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
}
