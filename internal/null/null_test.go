package null

import (
	"context"
	"errors"
	"testing"

	"github.com/bs3/bs3/internal/frontend"
)

func TestNullReadsZerosAndChecksRange(t *testing.T) {
	d := New(1<<20, 4096)
	ctx := context.Background()
	if err := d.WriteAt(ctx, make([]byte, 4096), 8192, false); err != nil {
		t.Fatal(err)
	}
	buf := []byte{1, 2, 3, 4}
	buf = append(buf, make([]byte, 4092)...)
	if err := d.ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	for i, b := range buf {
		if b != 0 {
			t.Fatalf("byte %d = %d, want 0", i, b)
		}
	}
	if err := d.WriteAt(ctx, make([]byte, 4096), 1<<20, false); !errors.Is(err, frontend.ErrInvalid) {
		t.Fatalf("write past the end: %v, want ErrInvalid", err)
	}
	if err := d.ReadAt(ctx, make([]byte, 100), 0); !errors.Is(err, frontend.ErrInvalid) {
		t.Fatalf("misaligned read: %v, want ErrInvalid", err)
	}
	chunk := []byte{9, 9, 9, 9, 9, 9, 9, 9}
	chunk = append(chunk, make([]byte, 4096)...)
	if err := d.Read(ctx, 0, 1, chunk); err != nil || chunk[0] != 0 {
		t.Fatalf("Read: err %v, first byte %d", err, chunk[0])
	}
}
