// Package mem is an in-memory store.Store for tests and the null/demo
// volume: a map guarded by a mutex.
//
// It owns copies of every body it holds (bodies are copied in on Put and out
// on GetRange), so callers may reuse their buffers. It must never be used
// where data has to survive the process.
package mem

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/bs3/bs3/internal/store"
)

// Store is an in-memory object store. The zero value is not usable; call New.
type Store struct {
	mu    sync.RWMutex
	objs  map[string][]byte
	bytes int64
}

var (
	_ store.VectorReader = (*Store)(nil)
	_ store.VectorWriter = (*Store)(nil)
)

// New returns an empty store.
func New() *Store {
	return &Store{objs: make(map[string][]byte)}
}

// Put implements store.Store.
func (s *Store) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	one := [1][]byte{body}
	return s.PutV(ctx, name, one[:], ifAbsent)
}

// PutV implements store.VectorWriter.
func (s *Store) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("mem put %q: %w", name, err)
	}
	// Copy outside the lock: an 8 MiB memmove should not stall readers.
	c := make([]byte, 0, store.PiecesLen(body))
	for _, p := range body {
		c = append(c, p...)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old, ok := s.objs[name]
	if ok && ifAbsent {
		return fmt.Errorf("mem put %q: %w", name, store.ErrExists)
	}
	s.bytes += int64(len(c)) - int64(len(old))
	s.objs[name] = c
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
		return 0, fmt.Errorf("mem get %q: %w", name, err)
	}
	if off < 0 {
		return 0, fmt.Errorf("mem get %q: negative offset %d", name, off)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	b, ok := s.objs[name]
	if !ok {
		return 0, fmt.Errorf("mem get %q: %w", name, store.ErrNotFound)
	}
	n := 0
	for _, buf := range bufs {
		if off >= int64(len(b)) {
			break
		}
		k := copy(buf, b[off:])
		n += k
		off += int64(k)
	}
	return n, nil
}

// Size implements store.Store.
func (s *Store) Size(ctx context.Context, name string) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("mem size %q: %w", name, err)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	b, ok := s.objs[name]
	if !ok {
		return 0, fmt.Errorf("mem size %q: %w", name, store.ErrNotFound)
	}
	return int64(len(b)), nil
}

// List implements store.Store. It works on a snapshot of the names taken
// under the lock, so fn may call back into the store (e.g. Delete).
func (s *Store) List(ctx context.Context, prefix string, fn func(name string, size int64) error) error {
	type entry struct {
		name string
		size int64
	}
	s.mu.RLock()
	var entries []entry
	for n, b := range s.objs {
		if strings.HasPrefix(n, prefix) {
			entries = append(entries, entry{n, int64(len(b))})
		}
	}
	s.mu.RUnlock()
	sort.Slice(entries, func(i, j int) bool { return entries[i].name < entries[j].name })
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("mem list %q: %w", prefix, err)
		}
		if err := fn(e.name, e.size); err != nil {
			return err
		}
	}
	return nil
}

// Delete implements store.Store.
func (s *Store) Delete(ctx context.Context, name string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("mem delete %q: %w", name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bytes -= int64(len(s.objs[name]))
	delete(s.objs, name)
	return nil
}

// Len returns the number of objects held.
func (s *Store) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.objs)
}

// Bytes returns the total size of all objects held.
func (s *Store) Bytes() int64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.bytes
}
