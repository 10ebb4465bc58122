package gc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/testutil/enginetest"
	"github.com/bs3/bs3/internal/testutil/minio"
	"github.com/bs3/bs3/internal/volume"
)

// newestKey is the key of the object the last drain committed.
func newestKey(e *enginetest.Engine) int64 { return e.Volume.Watermark() - 1 }

func objectSize(t *testing.T, st store.Store, key int64) (int64, bool) {
	t.Helper()
	size, err := st.Size(context.Background(), store.DataName(key))
	if errors.Is(err, store.ErrNotFound) {
		return 0, false
	}
	if err != nil {
		t.Fatalf("size of key %d: %v", key, err)
	}
	return size, true
}

// TestDeadGCPlaceholdersThenDeletes follows dead objects through their
// life: emptied while a checkpoint recovery could still need their key,
// deleted (and forgotten by the map) once the delete floor passes them;
// an object holding only superseded discards is emptied too; a placeholder
// found after a restart is recognized without being written again.
func TestDeadGCPlaceholdersThenDeletes(t *testing.T) {
	ctx := context.Background()
	st := mem.New()
	const bs = 4096
	eo := enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: 1 * mib}
	e := enginetest.Open(t, st, eo)
	m := newModel(bs)
	md := e.Volume.Layout().MetadataSize()

	// One checkpoint before everything: it stays the oldest retained one
	// (the delete floor) through the restart below, whose final
	// checkpoint becomes the second.
	m.write(t, e.Dev, 300, 1)
	drain(t, e)
	if err := e.Volume.Checkpoint(ctx); err != nil {
		t.Fatalf("checkpoint: %v", err)
	}
	m.write(t, e.Dev, 0, 4)
	drain(t, e)
	k0 := newestKey(e)
	m.write(t, e.Dev, 0, 4) // k0 is dead now
	drain(t, e)
	m.write(t, e.Dev, 8, 4)
	drain(t, e)
	k8 := newestKey(e)
	m.discard(t, e.Dev, 8, 4) // k8 is dead now
	drain(t, e)
	kDiscard := newestKey(e)
	m.write(t, e.Dev, 8, 4) // supersedes the discards: kDiscard is dead
	drain(t, e)
	m.write(t, e.Dev, 100, 1)
	drain(t, e)

	c := New(e.Volume, Options{Logger: testLogger(t)})
	s, err := c.CollectDead(ctx)
	if err != nil {
		t.Fatalf("dead pass: %v", err)
	}
	// The floor is at the checkpoint, below them: every dead object keeps
	// its key. (Keys the attach claimed with placeholders of its own lie
	// below the floor and may be deleted: Reclaimed is not checked.)
	if s.Placeholders != 3 {
		t.Fatalf("first pass: %s; want 3 placeholders (k0, k8, the discards)", describe(s))
	}
	// One item each; a compact object stores its item and the end slot
	// instead of the whole metadata area (docs/ARCHITECTURE.md §3).
	if e.Volume.Superblock().Format == volume.FormatVersion {
		md = 2 * chunk.ItemSize
	}
	if want := 2*(md+4*bs) + md; s.BytesFreed != want {
		t.Errorf("bytes freed %d, want %d", s.BytesFreed, want)
	}
	for _, k := range []int64{k0, k8, kDiscard} {
		if size, ok := objectSize(t, st, k); !ok || size != 0 {
			t.Errorf("key %d: size %d present %v, want an empty placeholder", k, size, ok)
		}
	}
	state, _, _ := mapState(t, e.Volume, []int64{k0, k8, kDiscard})
	for k, s := range state {
		if !s.tracked || s.total != 0 || s.live != 0 {
			t.Errorf("map tracks placeholder %d as %+v, want tracked with total 0", k, s)
		}
	}
	if s, err := c.CollectDead(ctx); err != nil || s.Placeholders != 0 || s.Reclaimed != 0 {
		t.Fatalf("second pass: %s, %v; want nothing to do", describe(s), err)
	}
	m.verify(t, e.Dev, 512)

	// A restart: placeholders come back from the bucket, the collector
	// has no memory of them; it must look, not rewrite.
	e.Close(t)
	e = enginetest.Open(t, st, eo)
	if floor := e.Volume.DeleteFloor(); floor > k0 {
		t.Fatalf("delete floor %d passed key %d at restart; the test needs it below", floor, k0)
	}
	c = New(e.Volume, Options{Logger: testLogger(t)})
	if s, err := c.CollectDead(ctx); err != nil || s.Placeholders != 0 || s.Reclaimed != 0 {
		t.Fatalf("pass after restart: %s, %v; want nothing new", describe(s), err)
	}
	m.verify(t, e.Dev, 512)

	// Two checkpoints at higher watermarks raise the floor past them.
	for range 2 {
		m.write(t, e.Dev, 200, 1)
		drain(t, e)
		if err := e.Volume.Checkpoint(ctx); err != nil {
			t.Fatalf("checkpoint: %v", err)
		}
	}
	if floor := e.Volume.DeleteFloor(); floor <= kDiscard {
		t.Fatalf("delete floor %d did not pass key %d", floor, kDiscard)
	}
	s, err = c.CollectDead(ctx)
	if err != nil {
		t.Fatalf("pass after checkpoints: %v", err)
	}
	if s.Reclaimed < 3 {
		t.Errorf("pass after checkpoints: %s; want the 3 placeholders deleted", describe(s))
	}
	for _, k := range []int64{k0, k8, kDiscard} {
		if _, ok := objectSize(t, st, k); ok {
			t.Errorf("placeholder %d below the floor still exists", k)
		}
	}
	state, _, _ = mapState(t, e.Volume, []int64{k0, k8, kDiscard})
	for k, s := range state {
		if s.tracked {
			t.Errorf("map still tracks deleted key %d", k)
		}
	}
	checkBucket(t, c, st)
	m.verify(t, e.Dev, 512)
	e.Close(t)
	e = enginetest.Open(t, st, eo)
	m.verify(t, e.Dev, 512)
}

// gateStore holds GETs of chosen objects until released, and reports
// when one arrives: a read that is in flight for as long as a test needs.
type gateStore struct {
	store.Store
	mu      sync.Mutex
	gates   map[string]chan struct{}
	arrived chan string
}

func newGateStore(s store.Store) *gateStore {
	return &gateStore{Store: s, gates: make(map[string]chan struct{}), arrived: make(chan string, 64)}
}

func (g *gateStore) hold(name string) (release func()) {
	ch := make(chan struct{})
	g.mu.Lock()
	g.gates[name] = ch
	g.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			delete(g.gates, name)
			g.mu.Unlock()
			close(ch)
		})
	}
}

func (g *gateStore) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	g.mu.Lock()
	ch := g.gates[name]
	g.mu.Unlock()
	if ch != nil {
		select {
		case g.arrived <- name:
		default:
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	return g.Store.GetRange(ctx, name, off, buf)
}

// TestDeadGCSkipsObjectsOfReadsInFlight holds a read's GET of an object
// while every block of that object is overwritten: dead GC must leave the
// object alone until the read is done, and the read returns the data it
// looked up.
func TestDeadGCSkipsObjectsOfReadsInFlight(t *testing.T) {
	srv := minio.Start(t)
	raw := srv.Store(t, srv.Bucket(t))
	gs := newGateStore(raw)
	const bs = 4096
	// No read cache: the read under test must reach the store, where its
	// GET is held.
	e := enginetest.Open(t, gs, enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: 1 * mib, NoCache: true})
	m := newModel(bs)
	ctx := context.Background()

	m.write(t, e.Dev, 0, 16)
	drain(t, e)
	k := newestKey(e)
	old := m.expect(0, 16)
	release := gs.hold(store.DataName(k))
	defer release() // a failing test must not leave the read hanging

	got := make([]byte, 16*bs)
	readErr := make(chan error, 1)
	go func() { readErr <- e.Dev.ReadAt(ctx, got, 0) }()
	select {
	case <-gs.arrived:
	case err := <-readErr:
		t.Fatalf("read finished before its GET was held: %v", err)
	}

	m.write(t, e.Dev, 0, 16) // every block of k: k is dead
	drain(t, e)
	m.write(t, e.Dev, 100, 1)
	drain(t, e)
	state, _, _ := mapState(t, e.Volume, []int64{k})
	if s := state[k]; s.live != 0 {
		t.Fatalf("key %d still has %d live blocks; the test needs it dead", k, s.live)
	}

	c := New(e.Volume, Options{Logger: testLogger(t)})
	s, err := c.CollectDead(ctx)
	if err != nil {
		t.Fatalf("dead pass during the read: %v", err)
	}
	if size, ok := objectSize(t, raw, k); !ok || size == 0 {
		t.Fatalf("object %d, which a read in flight uses, was reclaimed (present %v, size %d; pass: %s)", k, ok, size, describe(s))
	}
	if s.InUse != 1 {
		t.Errorf("pass during the read: %s; want exactly the read's object counted in use", describe(s))
	}
	release()
	if err := <-readErr; err != nil {
		t.Fatalf("read in flight: %v", err)
	}
	if !bytes.Equal(got, old) {
		t.Fatalf("read in flight returned other data than it looked up (first diff at %d)", firstDiff(got, old))
	}

	s, err = c.CollectDead(ctx)
	if err != nil {
		t.Fatalf("dead pass after the read: %v", err)
	}
	if size, ok := objectSize(t, raw, k); ok && size != 0 {
		t.Fatalf("dead object %d not reclaimed after its read ended (size %d; pass: %s)", k, size, describe(s))
	}
	m.verify(t, e.Dev, 128)
}

// TestDeadGCUnderConcurrentReads runs dead passes back to back while a
// writer keeps overwriting a small working set (each write its own object)
// and readers read it, each GET held until a whole dead pass has run.
// Every read must succeed and return, for each block, an intact version at
// least as new as the one acknowledged when the read started.
func TestDeadGCUnderConcurrentReads(t *testing.T) {
	for _, seed := range []uint64{1, 2} {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) { deadGCUnderReads(t, seed) })
	}
}

// passGate holds every GET of a data object until a dead pass that
// started after the GET arrived has finished: each read in flight spans a
// whole pass, whatever the machine's speed.
type passGate struct {
	store.Store
	mu     sync.Mutex
	cond   *sync.Cond
	passes int64
	open   bool // set-up or the test's end: let everything through
}

func newPassGate(s store.Store) *passGate {
	g := &passGate{Store: s, open: true} // closed once set up
	g.cond = sync.NewCond(&g.mu)
	return g
}

func (g *passGate) passDone() {
	g.mu.Lock()
	g.passes++
	g.mu.Unlock()
	g.cond.Broadcast()
}

func (g *passGate) openUp() {
	g.mu.Lock()
	g.open = true
	g.mu.Unlock()
	g.cond.Broadcast()
}

func (g *passGate) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	if _, ok := store.ParseDataName(name); ok {
		g.mu.Lock()
		// The pass running now may have decided before the read pinned
		// its object; the next one surely decides after.
		until := g.passes + 2
		for !g.open && g.passes < until {
			g.cond.Wait()
		}
		g.mu.Unlock()
	}
	return g.Store.GetRange(ctx, name, off, buf)
}

func deadGCUnderReads(t *testing.T, seed uint64) {
	srv := minio.Start(t)
	raw := srv.Store(t, srv.Bucket(t))
	gate := newPassGate(raw)
	const bs = 4096
	const ws = 32 // blocks: small, so reads often hold objects that die
	// No read cache: the reads must reach the store to overlap with dead
	// GC (a cached read pins too, but for no time worth testing).
	e := enginetest.Open(t, gate, enginetest.Options{Size: 64 * mib, BlockSize: bs, ChunkSize: 1 * mib, NoCache: true})
	m := newModel(bs)
	ctx := context.Background()
	fill(t, e, m, ws)
	gate.mu.Lock()
	gate.open = false
	gate.mu.Unlock()
	c := New(e.Volume, Options{Logger: testLogger(t)})

	done := make(chan struct{})
	defer gate.openUp()
	var wg sync.WaitGroup
	var reads atomic.Int64
	var reclaimed, inUse atomic.Int64
	errs := make(chan error, 16)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	// Readers.
	for r := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(r)))
			buf := make([]byte, 8*bs)
			for {
				select {
				case <-done:
					return
				default:
				}
				n := 1 + rng.Int64N(4)
				b := rng.Int64N(ws - n + 1)
				lo := make([]uint64, n)
				m.mu.Lock()
				for i := range lo {
					lo[i] = m.ver[b+int64(i)]
				}
				m.mu.Unlock()
				p := buf[:n*bs]
				if err := e.Dev.ReadAt(ctx, p, b*bs); err != nil {
					report(err)
					return
				}
				m.mu.Lock()
				for i := int64(0); i < n; i++ {
					blk := p[i*bs : (i+1)*bs]
					ver := binary.LittleEndian.Uint64(blk[8:])
					want := make([]byte, bs)
					enginetest.BlockVersion(want, b+i, ver)
					switch {
					case !bytes.Equal(blk, want):
						report(fmt.Errorf("block %d: content is not an intact version (header says version %d)", b+i, ver))
					case ver < lo[i] || ver > m.assigned[b+i]:
						report(fmt.Errorf("block %d: read version %d, acknowledged %d at the start, newest %d", b+i, ver, lo[i], m.ver[b+i]))
					}
				}
				m.mu.Unlock()
				reads.Add(1)
			}
		}()
	}
	// Dead GC, back to back.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			s, err := c.CollectDead(ctx)
			gate.passDone()
			if err != nil {
				report(err)
				return
			}
			reclaimed.Add(s.Reclaimed + s.Placeholders)
			inUse.Add(s.InUse)
		}
	}()
	// The writer: every write is its own object, so objects die fast.
	rng := rand.New(rand.NewPCG(seed, 99))
	for range 300 {
		n := 1 + rng.Int64N(2)
		m.write(t, e.Dev, rng.Int64N(ws-n+1), n)
		if err := e.Dev.Flush(ctx); err != nil {
			t.Fatalf("flush: %v", err)
		}
	}
	drain(t, e)
	close(done)
	gate.openUp()
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	if reads.Load() == 0 || reclaimed.Load() == 0 || inUse.Load() == 0 {
		t.Fatalf("no overlap to test: %d reads, %d objects reclaimed, %d left for reads in flight", reads.Load(), reclaimed.Load(), inUse.Load())
	}
	checkBucket(t, c, raw)
	m.verify(t, e.Dev, ws)
	t.Logf("%d reads, %d objects reclaimed during them, %d times a dead object was left for a read in flight", reads.Load(), reclaimed.Load(), inUse.Load())
}

// isClaimRecord reads whether key holds a claim record.
func isClaimRecord(t *testing.T, st store.Store, key int64) bool {
	t.Helper()
	head := make([]byte, volume.ClaimMagicLen)
	n, err := st.GetRange(context.Background(), store.DataName(key), 0, head)
	if err != nil {
		t.Fatalf("read key %d: %v", key, err)
	}
	return volume.IsClaimRecord(head[:n])
}

// TestDeadGCKeepsClaimRecords: a claim record at or above the delete
// floor is what keeps the orphans in its window out of a roll-forward from
// the oldest checkpoint. A later attach that loaded a newer checkpoint has
// never read it, sees a dead object without blocks, and must leave it
// alone until the floor passes it; then it is deleted.
func TestDeadGCKeepsClaimRecords(t *testing.T) {
	st := mem.New()
	ctx := context.Background()
	o := enginetest.Options{Size: 16 * mib, BlockSize: 4096, ChunkSize: 1 * mib}
	m := newModel(4096)
	e := enginetest.Open(t, st, o)
	fill(t, e, m, 8)
	e.Close(t) // checkpoint C1
	e, err := enginetest.New(st, o)
	if err != nil {
		t.Fatal(err)
	}
	claim := e.Volume.Watermark() - 2*18 - 16 // the gap this attach claimed
	if !isClaimRecord(t, st, claim) {
		t.Fatalf("key %d: no claim record", claim)
	}
	fill(t, e, m, 8)
	drain(t, e)
	if err := e.Volume.Checkpoint(ctx); err != nil { // C2 above the claim
		t.Fatal(err)
	}
	if floor := e.Volume.DeleteFloor(); floor > claim {
		t.Fatalf("delete floor %d above the claim %d: the test needs it below", floor, claim)
	}
	e.Objs.Close() // crash

	e = enginetest.Open(t, st, o) // loads C2: never reads the claim record
	c := New(e.Volume, Options{Logger: testLogger(t)})
	if e.Volume.IsClaim(claim) {
		t.Fatal("the attach read the claim record; the test needs one it did not")
	}
	if _, err := c.CollectDead(ctx); err != nil {
		t.Fatal(err)
	}
	if !isClaimRecord(t, st, claim) {
		t.Fatalf("dead GC replaced the claim record at key %d above the floor %d", claim, e.Volume.DeleteFloor())
	}
	// Two more checkpoints raise the floor past the claim.
	for range 2 {
		fill(t, e, m, 8)
		drain(t, e)
		if err := e.Volume.Checkpoint(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if floor := e.Volume.DeleteFloor(); floor <= claim {
		t.Fatalf("floor %d still at or below the claim %d", floor, claim)
	}
	if _, err := c.CollectDead(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := objectSize(t, st, claim); ok {
		t.Fatalf("claim record at key %d below the floor was not deleted", claim)
	}
	m.verify(t, e.Dev, 8)
}
