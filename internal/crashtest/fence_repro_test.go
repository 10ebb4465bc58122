package crashtest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/testutil/minio"
)

// TestTwoWritersScripted replays, with one upload held back on purpose, the
// two ways a second engine on a busy volume went wrong in TestTwoWriters,
// so that each is reproduced on every run. In both, engine A closes chunk
// k (a 1 MiB write fills it; its upload is delayed 2 s) and chunk k+1 (the
// write's last block; a flush uploads it at once), so k+1 is in the bucket
// while k is not.
//
//   - "attach-during-upload": B attaches in that window. Asserted: if A's
//     flush returns success, A's write reads back, on A and on a third
//     engine (a successful durable flush is never lost); at least one
//     engine is fenced.
//   - "interleaved-keys": B attached before (A idle), then writes and
//     flushes while A's k is held back, then writes again. Asserted: a
//     third engine does not show data of both A's post-attach write and
//     B's writes (one writer's history, not an interleaving); every flush
//     that returned success is kept; at least one engine is fenced.
func TestTwoWritersScripted(t *testing.T) {
	srv := minio.Start(t)
	t.Run("attach-during-upload", func(t *testing.T) { scriptedTwoWriters(t, srv, false) })
	t.Run("interleaved-keys", func(t *testing.T) { scriptedTwoWriters(t, srv, true) })
}

func scriptedTwoWriters(t *testing.T, srv *minio.Server, interleave bool) {
	ctx := context.Background()
	const size = 16 << 20
	st := srv.Store(t, srv.Bucket(t))
	fst := faulty.New(st)
	open := func(s store.Store) *engine {
		t.Helper()
		e, err := openEngine(ctx, s, engineOpts{size: size, durable: true, log: zerolog.Nop()})
		if err != nil {
			t.Fatalf("attach: %v", err)
		}
		return e
	}
	a := open(fst)
	aOpen := true
	defer func() {
		if aOpen {
			a.close() //nolint:errcheck // the test failed already
		}
	}()
	const idBase, idA, idB1, idB2 = 0x100, 0xa00, 0xb01, 0xb02
	mustWrite := func(e *engine, id uint64, block, n int64) {
		t.Helper()
		if err := e.dev.WriteAt(ctx, stamped(id, block, n), block*blockSize, false); err != nil {
			t.Fatalf("write %#x: %v", id, err)
		}
	}
	mustWrite(a, idBase, 0, 8)
	if err := a.dev.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	k := a.vol.Watermark() // A's next key: everything before it is applied
	var b *engine
	if interleave {
		b = open(st) // A is idle: B's next key is k too
	}

	fst.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Count: 1, Delay: 2 * time.Second,
		Match: func(name string) bool { return name == store.DataName(k) }})
	// 257 blocks: the first 256 fill chunk k, the last goes to chunk k+1.
	const aBlock, aN = 256, chunkSize/blockSize + 1
	mustWrite(a, idA, aBlock, aN)
	aFlush := make(chan error, 1)
	go func() { aFlush <- a.dev.Flush(ctx) }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := st.Size(ctx, store.DataName(k+1)); err == nil {
			break
		} else if !errors.Is(err, store.ErrNotFound) {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("A's chunk %d did not reach the bucket", k+1)
		}
		time.Sleep(5 * time.Millisecond)
	}

	var bAttach, bFlush1, bFlush2 error
	if !interleave {
		// k is missing, k+1 is there: B's recovery sees a gap. Refusing
		// to attach (with a fencing error) would be a correct answer.
		b, bAttach = openEngine(ctx, st, engineOpts{size: size, durable: true, log: zerolog.Nop()})
	}
	bOpen := b != nil
	defer func() {
		if bOpen {
			b.close() //nolint:errcheck // the test failed already
		}
	}()
	if interleave {
		mustWrite(b, idB1, 600, 4)
		bFlush1 = b.dev.Flush(ctx) // key k, while A's upload of k waits
	}
	aErr := <-aFlush
	if aErr == nil {
		// A was told its write is durable: it must read it back.
		got, bad, err := readBlocks(ctx, a.dev, seq(aBlock, aN))
		switch {
		case err != nil:
			t.Errorf("A's flush returned success, but A cannot read its own write back: %v", err)
		case len(bad) > 0 || !allAre(got, idA):
			t.Errorf("A's flush returned success, but A reads other data back: %s", describe(got, bad))
		}
	}
	switch {
	case b == nil:
		bFlush2 = bAttach
	case b.dev.WriteAt(ctx, stamped(idB2, 700, 4), 700*blockSize, false) == nil:
		bFlush2 = b.dev.Flush(ctx)
	default:
		bFlush2 = b.dev.Flush(ctx) // the write failed; Flush reports why
	}
	fenced := 0
	for _, err := range []error{aErr, bFlush1, bFlush2} {
		switch {
		case err == nil:
		case isFenced(err):
			fenced++
		default:
			t.Errorf("unexpected error (not a fencing error): %v", err)
		}
	}
	if fenced == 0 {
		t.Errorf("neither engine was fenced (A's flush: %v; B's flushes: %v, %v)", aErr, bFlush1, bFlush2)
	}
	aOpen = false
	aClose := a.close()
	var bClose error
	if bOpen {
		bOpen = false
		bClose = b.close()
	}
	t.Logf("A's flush: %v\nB's attach: %v; B's flushes: %v, %v\nclose A: %v, B: %v", aErr, bAttach, bFlush1, bFlush2, aClose, bClose)

	c := open(st)
	defer closeChecked(t, c, "the third engine")
	blocks := append(append(seq(aBlock, aN), seq(600, 4)...), seq(700, 4)...)
	got, bad, err := readBlocks(ctx, c.dev, blocks)
	if err != nil {
		t.Fatalf("a third engine attached after both stopped cannot read the volume: %v", err)
	}
	for blk, err := range bad {
		t.Errorf("block %d: %v", blk, err)
	}
	seenA := countID(got, idA)
	seenB := countID(got, idB1) + countID(got, idB2)
	if seenA > 0 && seenB > 0 {
		t.Errorf("the volume interleaves the two writers: %d blocks of A's write made after B attached and %d blocks of B's writes are visible", seenA, seenB)
	}
	if aErr == nil && countID(got, idA) != aN {
		t.Errorf("A's flush returned success, but a later attach finds %d of its %d blocks: %s", countID(got, idA), aN, describe(got, nil))
	}
	if interleave && bFlush1 == nil && countID(got, idB1) != 4 {
		t.Errorf("B's flush returned success, but a later attach finds %d of its 4 blocks", countID(got, idB1))
	}
	if bFlush2 == nil && countID(got, idB2) != 4 {
		t.Errorf("B's second flush returned success, but a later attach finds %d of its 4 blocks", countID(got, idB2))
	}
}

func seq(block, n int64) []int64 {
	out := make([]int64, n)
	for i := range out {
		out[i] = block + int64(i)
	}
	return out
}

func allAre(got map[int64]uint64, id uint64) bool {
	for _, v := range got {
		if v != id {
			return false
		}
	}
	return true
}

func countID(got map[int64]uint64, id uint64) int {
	n := 0
	for _, v := range got {
		if v == id {
			n++
		}
	}
	return n
}

// describe summarizes which writes a set of blocks holds.
func describe(got map[int64]uint64, bad map[int64]error) string {
	ids := make(map[uint64]int)
	for _, v := range got {
		ids[v]++
	}
	s := ""
	for id, n := range ids {
		s += fmt.Sprintf(" %#x×%d", id, n)
	}
	if len(bad) > 0 {
		s += fmt.Sprintf(" and %d undecodable blocks", len(bad))
	}
	return s
}
