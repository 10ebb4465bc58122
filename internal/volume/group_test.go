package volume

import (
	"math/rand/v2"
	"testing"
)

// TestGroupByKey: every piece lands in its object's group, objects in the
// order they first appear, each group's pieces in their input order, for
// inputs where objects alternate, repeat and stand alone.
func TestGroupByKey(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := range 500 {
		n := rng.IntN(200)
		objects := 1 + rng.IntN(8)
		pieces := make([]readPiece, n)
		for i := range pieces {
			pieces[i] = readPiece{key: int64(rng.IntN(objects)) * 7, block: int64(i), off: int64(i) * 4096, length: 4096}
		}
		in := append([]readPiece(nil), pieces...)
		keys, groups := groupByKey(pieces)
		if len(keys) != len(groups) {
			t.Fatalf("trial %d: %d keys, %d groups", trial, len(keys), len(groups))
		}
		// The expected grouping, the slow way.
		var wantKeys []int64
		want := map[int64][]readPiece{}
		for _, p := range in {
			if _, ok := want[p.key]; !ok {
				wantKeys = append(wantKeys, p.key)
			}
			want[p.key] = append(want[p.key], p)
		}
		if len(keys) != len(wantKeys) {
			t.Fatalf("trial %d: keys %v, want %v", trial, keys, wantKeys)
		}
		for i, k := range keys {
			if k != wantKeys[i] {
				t.Fatalf("trial %d: keys %v, want %v", trial, keys, wantKeys)
			}
			if len(groups[i]) != len(want[k]) {
				t.Fatalf("trial %d key %d: %d pieces, want %d", trial, k, len(groups[i]), len(want[k]))
			}
			for j, p := range groups[i] {
				if w := want[k][j]; p.key != w.key || p.block != w.block || p.off != w.off || p.length != w.length {
					t.Fatalf("trial %d key %d piece %d: %+v, want %+v", trial, k, j, p, want[k][j])
				}
			}
		}
	}
}
