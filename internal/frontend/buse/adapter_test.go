package buse

import (
	"context"
	"testing"
)

// fakeEngine records what the adapter asks of it.
type fakeEngine struct {
	key         int64
	commits     [][2]int64 // key, items
	readAt, nrd int64
}

func (f *fakeEngine) Read(_ context.Context, block, n int64, buf []byte) error {
	f.readAt, f.nrd = block, n
	buf[0] = 42
	return nil
}

func (f *fakeEngine) NextKey() int64 { f.key++; return f.key }

func (f *fakeEngine) Commit(_ context.Context, key int64, _ []byte, items int) error {
	f.commits = append(f.commits, [2]int64{key, int64(items)})
	return nil
}

// Each chunk the kernel hands over is committed under its own next key
// with its count of writes; reads pass their block range through.
func TestAdapter(t *testing.T) {
	f := &fakeEngine{}
	a := NewAdapter(f)
	for _, items := range []int64{3, 1} {
		if err := a.BuseWrite(items, make([]byte, 16)); err != nil {
			t.Fatal(err)
		}
	}
	if len(f.commits) != 2 || f.commits[0] != [2]int64{1, 3} || f.commits[1] != [2]int64{2, 1} {
		t.Fatalf("commits %v, want key 1 with 3 items then key 2 with 1", f.commits)
	}
	buf := make([]byte, 8)
	if err := a.BuseRead(7, 2, buf); err != nil || buf[0] != 42 || f.readAt != 7 || f.nrd != 2 {
		t.Fatalf("read: err %v, byte %d, at %d n %d", err, buf[0], f.readAt, f.nrd)
	}
}
