package dir_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/dir"
	"github.com/bs3/bs3/internal/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		s, err := dir.New(filepath.Join(t.TempDir(), "objects"))
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func listAll(t *testing.T, s store.Store) []string {
	t.Helper()
	var got []string
	if err := s.List(context.Background(), "", func(name string, _ int64) error {
		got = append(got, name)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return got
}

func TestLayoutAndTempCleanup(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s, err := dir.New(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, store.DataName(1), []byte("one"), true); err != nil {
		t.Fatal(err)
	}
	// The object is a plain file at the path its name spells.
	b, err := os.ReadFile(filepath.Join(root, "00000001", "00000000"))
	if err != nil || string(b) != "one" {
		t.Fatalf("object file = %q, %v", b, err)
	}
	// Leftovers of a crash in the middle of a Put.
	for _, p := range []string{".bs3tmp-123", "00000001/.bs3tmp-456"} {
		if err := os.WriteFile(filepath.Join(root, p), []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if got := listAll(t, s); !slices.Equal(got, []string{store.DataName(1)}) {
		t.Fatalf("List shows temporary files: %q", got)
	}
	if _, err := dir.New(root); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{".bs3tmp-123", "00000001/.bs3tmp-456"} {
		if _, err := os.Stat(filepath.Join(root, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("New did not remove temporary file %s (stat err %v)", p, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(root, "00000001", "00000000")); err != nil || string(b) != "one" {
		t.Fatalf("New touched a real object: %q, %v", b, err)
	}
	// No temporary file is left behind by Puts, successful or refused.
	if err := s.Put(ctx, store.DataName(1), []byte("x"), true); !errors.Is(err, store.ErrExists) {
		t.Fatalf("err = %v, want ErrExists", err)
	}
	if err := s.Put(ctx, store.DataName(1), []byte("two"), false); err != nil {
		t.Fatal(err)
	}
	err = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.HasPrefix(d.Name(), ".bs3tmp-") {
			t.Errorf("temporary file left behind: %s", p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestDeleteRemovesEmptyDirectories(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s, err := dir.New(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"v/00000001/00000000", "v/00000002/00000000"} {
		if err := s.Put(ctx, n, []byte("x"), false); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Delete(ctx, "v/00000001/00000000"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "v", "00000001")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("empty directory v/00000001 not removed (stat err %v)", err)
	}
	if _, err := os.Stat(filepath.Join(root, "v", "00000002", "00000000")); err != nil {
		t.Errorf("sibling object gone: %v", err)
	}
	if err := s.Delete(ctx, "v/00000002/00000000"); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("root not empty after deleting every object: %v", entries)
	}
	// The root itself stays.
	if err := s.Put(ctx, "again", nil, true); err != nil {
		t.Fatal(err)
	}
}

func TestInvalidNames(t *testing.T) {
	ctx := context.Background()
	s, err := dir.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"", "/abs", "a/../../etc/passwd", "..", "a/./b", "a//b", "a/", ".bs3tmp-x", "a/.bs3tmp-1", "nul\x00"} {
		if err := s.Put(ctx, n, []byte("x"), false); err == nil {
			t.Errorf("Put(%q) succeeded, want an error", n)
		}
		if _, err := s.Size(ctx, n); err == nil {
			t.Errorf("Size(%q) succeeded, want an error", n)
		}
	}
	if got := listAll(t, s); len(got) != 0 {
		t.Errorf("invalid Puts stored objects: %q", got)
	}
}

func TestFileDirectoryClash(t *testing.T) {
	ctx := context.Background()
	s, err := dir.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, "a/b", []byte("x"), false); err != nil {
		t.Fatal(err)
	}
	for _, ifAbsent := range []bool{false, true} {
		err := s.Put(ctx, "a", []byte("y"), ifAbsent)
		if err == nil || errors.Is(err, store.ErrExists) {
			t.Errorf("Put(\"a\", ifAbsent=%v) over directory a/ = %v, want a non-ErrExists error", ifAbsent, err)
		}
	}
	if _, err := s.Size(ctx, "a"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Size of a directory name: %v, want ErrNotFound", err)
	}
	if err := s.Delete(ctx, "a"); err != nil {
		t.Errorf("Delete of a directory name: %v", err)
	}
	if _, err := s.Size(ctx, "a/b"); err != nil {
		t.Errorf("Delete of directory name removed objects below it: %v", err)
	}
	if err := s.Put(ctx, "a/b/c", []byte("z"), false); err == nil {
		t.Error("Put below an object name succeeded")
	}
	if _, err := s.Size(ctx, "a/b/c"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Size below an object name: %v, want ErrNotFound", err)
	}
}
