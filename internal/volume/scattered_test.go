package volume

import "testing"

// TestScattered: which objects a stream's read or prefetch takes as
// scattered (fetched whole, into the main tier) and which it reads
// through (aligned pieces, into the stream tier).
func TestScattered(t *testing.T) {
	const bs = 4096
	const read = 1 << 20 // a 1 MiB read at device block 1000
	const start = 1000
	run := func(block, off, n int64) readPiece {
		return readPiece{block: block, off: off * bs, length: n * bs}
	}
	cases := []struct {
		name   string
		pieces []readPiece
		want   bool
	}{
		{"one 4 KiB block inside the read (a random overwrite)", []readPiece{run(1100, 77, 1)}, true},
		{"blocks of one object far apart (random overwrites)", []readPiece{run(1010, 500, 1), run(1100, 3, 1), run(1200, 901, 2)}, true},
		{"a run of the next object, at the read's end", []readPiece{run(1248, 0, 5), run(1254, 6, 2)}, false},
		{"a run of the previous object, at the read's start, cut short by overwrites", []readPiece{run(1000, 1020, 2), run(1003, 1023, 1)}, false},
		{"a dense 120 KiB run inside the read (a chunk filled out of device order)", []readPiece{run(1100, 384, 20), run(1121, 405, 10)}, false},
		{"a sparse run inside the read (every eighth block)", []readPiece{run(1040, 0, 1), run(1048, 1, 1), run(1056, 2, 1), run(1064, 3, 1)}, true},
		{"more than an eighth of the read", []readPiece{run(1000, 0, 40)}, false},
	}
	for _, c := range cases {
		if got := scattered(c.pieces, start*bs, read, bs, 4<<20); got != c.want {
			t.Errorf("%s: scattered %v, want %v", c.name, got, c.want)
		}
	}
	// A 32 MiB prefetch range: a 4 MiB object filled out of device order
	// (eight 512 KiB runs, 3 MiB of them live, over 12 MiB of the range)
	// is under an eighth of the range, but it is a whole chunk the stream
	// reads through, not scattered blocks.
	var runs []readPiece
	for i := int64(0); i < 8; i++ {
		runs = append(runs, run(1000+i*384, i*128, 96))
	}
	if scattered(runs, start*bs, 32<<20, bs, 4<<20) {
		t.Error("a 4 MiB object in eight runs over 12 MiB of a 32 MiB prefetch range: taken for scattered")
	}
}
