// Package dir is a store.Store on a local directory: the embedded default
// store for `make run` and single-host volumes.
//
// Each object is one file; the '/'-separated parts of its name become
// subdirectories. It owns the atomicity and durability of every Put: the
// body goes to a temporary file in the target directory, is fsynced, and is
// then renamed (plain Put) or hard-linked (conditional Put, which fails
// atomically when the name exists) into place, and the directories on the
// path are fsynced, so a Put that returned survives a power loss and a
// crash never leaves a partial object under its final name. It must never
// expose temporary files (they are skipped by List and removed by New).
//
// A name cannot be both an object and a "directory" of other objects (for
// example "a" and "a/b"): a file system cannot hold both. bs3's own names
// never do this; such a Put fails with an error.
package dir

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/bs3/bs3/internal/store"
)

// tempPrefix starts the name of every temporary file. Object names with a
// part starting with it are refused, so New can remove leftovers safely.
const tempPrefix = ".bs3tmp-"

// Store keeps objects as files under a root directory.
type Store struct {
	root string
}

var (
	_ store.VectorReader = (*Store)(nil)
	_ store.VectorWriter = (*Store)(nil)
)

// New opens (creating if needed) the directory at path and removes
// temporary files a crash may have left behind.
func New(path string) (*Store, error) {
	root, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("dir store %q: %w", path, err)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("dir store %q: %w", root, err)
	}
	// Puts fsync directories up to the root; the root's own entry is made
	// durable here, once.
	if err := syncDir(filepath.Dir(root)); err != nil {
		return nil, fmt.Errorf("dir store %q: %w", root, err)
	}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasPrefix(d.Name(), tempPrefix) {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("dir store %q: remove temporary files: %w", root, err)
	}
	return &Store{root: root}, nil
}

// Root returns the absolute path of the store's directory.
func (s *Store) Root() string { return s.root }

// path validates name and returns its file path.
func (s *Store) path(name string) (string, error) {
	if name == "" {
		return "", errors.New("empty object name")
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("invalid object name %q: contains NUL", name)
	}
	for part := range strings.SplitSeq(name, "/") {
		switch {
		case part == "":
			return "", fmt.Errorf("invalid object name %q: empty path element (leading, trailing or double '/')", name)
		case part == "." || part == "..":
			return "", fmt.Errorf("invalid object name %q: %q path element", name, part)
		case strings.HasPrefix(part, tempPrefix):
			return "", fmt.Errorf("invalid object name %q: element starts with reserved %q", name, tempPrefix)
		}
	}
	return filepath.Join(s.root, filepath.FromSlash(name)), nil
}

// Put implements store.Store.
func (s *Store) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	one := [1][]byte{body}
	return s.PutV(ctx, name, one[:], ifAbsent)
}

// PutV implements store.VectorWriter: the pieces are written to the file
// in turn.
func (s *Store) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("dir put %q: %w", name, err)
	}
	p, err := s.path(name)
	if err != nil {
		return fmt.Errorf("dir put: %w", err)
	}
	if err := s.put(p, body, ifAbsent); err != nil {
		return fmt.Errorf("dir put %q: %w", name, err)
	}
	return nil
}

// putBuffer gathers the small pieces of a body into writes of this size.
const putBuffer = 256 << 10

func (s *Store) put(p string, body [][]byte, ifAbsent bool) error {
	dir := filepath.Dir(p)
	tmp, err := s.createTemp(dir)
	if err != nil {
		return err
	}
	tmpName := tmp.Name()
	committed := false
	defer func() {
		if !committed {
			// Best effort: New removes whatever is left.
			_ = os.Remove(tmpName)
		}
	}()
	// Small pieces are gathered (a checksummed chunk comes as thousands
	// of them: 4 KiB segments with their framing between); a piece as
	// large as the buffer goes straight to the file.
	w := bufio.NewWriterSize(tmp, putBuffer)
	for _, piece := range body {
		if _, err := w.Write(piece); err != nil {
			_ = tmp.Close()
			return fmt.Errorf("write temporary file: %w", err)
		}
	}
	if err := w.Flush(); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("write temporary file: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("fsync temporary file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close temporary file: %w", err)
	}
	if ifAbsent {
		// link(2) fails with EEXIST if the name exists, atomically with
		// respect to other links and renames: exactly one conditional Put
		// of a name can win.
		if err := os.Link(tmpName, p); err != nil {
			if errors.Is(err, fs.ErrExist) {
				if fi, serr := os.Lstat(p); serr == nil && fi.IsDir() {
					return fmt.Errorf("name is a directory of other objects: %w", err)
				}
				return store.ErrExists
			}
			return fmt.Errorf("link into place: %w", err)
		}
		// The temporary name is now a second link to the object; removing
		// it need not be durable.
		if err := os.Remove(tmpName); err != nil {
			return fmt.Errorf("remove temporary link: %w", err)
		}
	} else {
		if err := os.Rename(tmpName, p); err != nil {
			if errors.Is(err, syscall.EISDIR) || errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) {
				return fmt.Errorf("name is a directory of other objects: %w", err)
			}
			return fmt.Errorf("rename into place: %w", err)
		}
	}
	committed = true
	// Make the new directory entry durable, and the entries of the
	// directories on the path (which this or a concurrent Put may just have
	// created) as well.
	for d := dir; ; d = filepath.Dir(d) {
		if err := syncDir(d); err != nil {
			return err
		}
		if d == s.root || len(d) <= len(s.root) {
			break
		}
	}
	return nil
}

// createTemp creates a temporary file in dir, creating dir if needed. A
// concurrent Delete may remove an empty dir between the two steps, so it
// retries a few times on ENOENT.
func (s *Store) createTemp(dir string) (*os.File, error) {
	var err error
	for range 10 {
		if err = os.MkdirAll(dir, 0o700); err != nil {
			if errors.Is(err, syscall.ENOTDIR) || errors.Is(err, fs.ErrExist) {
				return nil, fmt.Errorf("a path element is an object, not a directory: %w", err)
			}
			return nil, fmt.Errorf("create directory: %w", err)
		}
		var f *os.File
		f, err = os.CreateTemp(dir, tempPrefix+"*")
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			break
		}
	}
	return nil, fmt.Errorf("create temporary file: %w", err)
}

func syncDir(d string) error {
	f, err := os.Open(d)
	if err != nil {
		return fmt.Errorf("open directory for fsync: %w", err)
	}
	err = f.Sync()
	cerr := f.Close()
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", d, err)
	}
	if cerr != nil {
		return fmt.Errorf("close directory %s: %w", d, cerr)
	}
	return nil
}

// GetRange implements store.Store.
func (s *Store) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	one := [1][]byte{buf}
	return s.GetRangeV(ctx, name, off, one[:])
}

// GetRangeV implements store.VectorReader.
func (s *Store) GetRangeV(ctx context.Context, name string, off int64, bufs [][]byte) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("dir get %q: %w", name, err)
	}
	if off < 0 {
		return 0, fmt.Errorf("dir get %q: negative offset %d", name, off)
	}
	p, err := s.path(name)
	if err != nil {
		return 0, fmt.Errorf("dir get: %w", err)
	}
	f, err := os.Open(p)
	if err != nil {
		return 0, fmt.Errorf("dir get %q: %w", name, mapNotFound(err))
	}
	defer f.Close()
	n := 0
	for _, buf := range bufs {
		k, err := f.ReadAt(buf, off+int64(n))
		n += k
		if err == io.EOF {
			break // the object ended: a short read, not an error
		}
		if errors.Is(err, syscall.EISDIR) {
			err = store.ErrNotFound
		}
		if err != nil {
			return n, fmt.Errorf("dir get %q at %d: %w", name, off+int64(n), err)
		}
	}
	return n, nil
}

// mapNotFound turns "no such file" and "a path element is a file" into
// store.ErrNotFound.
func mapNotFound(err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return store.ErrNotFound
	}
	return err
}

// Size implements store.Store.
func (s *Store) Size(ctx context.Context, name string) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("dir size %q: %w", name, err)
	}
	p, err := s.path(name)
	if err != nil {
		return 0, fmt.Errorf("dir size: %w", err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		return 0, fmt.Errorf("dir size %q: %w", name, mapNotFound(err))
	}
	if fi.IsDir() {
		return 0, fmt.Errorf("dir size %q: %w", name, store.ErrNotFound)
	}
	return fi.Size(), nil
}

// List implements store.Store. It walks only the directories that can hold
// names with the prefix, and yields names in lexical order without sorting
// them all: within a directory, every name below a subdirectory "x" starts
// with "x/", so ordering entries by their name plus '/' for directories
// gives the lexical order of the full names.
func (s *Store) List(ctx context.Context, prefix string, fn func(name string, size int64) error) error {
	// Start at the deepest directory named by the prefix.
	base := ""
	if i := strings.LastIndexByte(prefix, '/'); i >= 0 {
		base = prefix[:i+1]
	}
	if err := s.walk(ctx, base, prefix, fn); err != nil {
		return err
	}
	return nil
}

// walk lists directory rel (empty or ending in '/').
func (s *Store) walk(ctx context.Context, rel, prefix string, fn func(string, int64) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("dir list %q: %w", prefix, err)
	}
	dirPath := filepath.Join(s.root, filepath.FromSlash(rel))
	entries, err := os.ReadDir(dirPath)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			return nil // nothing under this prefix (or removed meanwhile)
		}
		return fmt.Errorf("dir list %q: %w", prefix, err)
	}
	type item struct {
		key string // full name, plus '/' for directories
		e   fs.DirEntry
	}
	items := make([]item, 0, len(entries))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tempPrefix) {
			continue
		}
		key := rel + e.Name()
		if e.IsDir() {
			key += "/"
			// Descend only if names below can start with the prefix.
			if !strings.HasPrefix(key, prefix) && !strings.HasPrefix(prefix, key) {
				continue
			}
		} else if !strings.HasPrefix(key, prefix) {
			continue
		}
		items = append(items, item{key, e})
	}
	slices.SortFunc(items, func(a, b item) int { return strings.Compare(a.key, b.key) })
	for _, it := range items {
		if it.e.IsDir() {
			if err := s.walk(ctx, it.key, prefix, fn); err != nil {
				return err
			}
			continue
		}
		fi, err := it.e.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // deleted since ReadDir
			}
			return fmt.Errorf("dir list %q: %w", prefix, err)
		}
		if !fi.Mode().IsRegular() {
			continue
		}
		if err := fn(it.key, fi.Size()); err != nil {
			return err
		}
	}
	return nil
}

// Delete implements store.Store. Directories left empty are removed, so a
// collected volume does not leave one empty directory per key behind.
func (s *Store) Delete(ctx context.Context, name string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("dir delete %q: %w", name, err)
	}
	p, err := s.path(name)
	if err != nil {
		return fmt.Errorf("dir delete: %w", err)
	}
	fi, err := os.Lstat(p)
	if err != nil {
		if errors.Is(mapNotFound(err), store.ErrNotFound) {
			return nil
		}
		return fmt.Errorf("dir delete %q: %w", name, err)
	}
	if fi.IsDir() {
		return nil // no object of that name, only objects below it
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("dir delete %q: %w", name, err)
	}
	// Remove empty parents up to the root. rmdir refuses non-empty
	// directories, so a concurrent Put (whose temporary file is already in
	// the directory) is safe; one that has not created it yet retries.
	for d := filepath.Dir(p); len(d) > len(s.root); d = filepath.Dir(d) {
		if err := syscall.Rmdir(d); err != nil {
			break
		}
	}
	return nil
}
