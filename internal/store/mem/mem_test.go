package mem_test

import (
	"context"
	"testing"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
	"github.com/bs3/bs3/internal/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return mem.New() })
}

func TestLenBytes(t *testing.T) {
	ctx := context.Background()
	s := mem.New()
	check := func(wantLen int, wantBytes int64) {
		t.Helper()
		if s.Len() != wantLen || s.Bytes() != wantBytes {
			t.Fatalf("Len, Bytes = %d, %d; want %d, %d", s.Len(), s.Bytes(), wantLen, wantBytes)
		}
	}
	check(0, 0)
	if err := s.Put(ctx, "a", make([]byte, 100), false); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, "b", make([]byte, 50), false); err != nil {
		t.Fatal(err)
	}
	check(2, 150)
	if err := s.Put(ctx, "a", make([]byte, 10), false); err != nil { // overwrite shrinks
		t.Fatal(err)
	}
	check(2, 60)
	if err := s.Put(ctx, "b", make([]byte, 999), true); err == nil { // refused: no change
		t.Fatal("conditional Put over an existing name succeeded")
	}
	check(2, 60)
	if err := s.Delete(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	check(1, 10)
}
