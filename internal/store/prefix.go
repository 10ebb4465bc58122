package store

import (
	"context"
	"strings"
)

// WithPrefix returns a Store that keeps every object of s under prefix, so
// several volumes can share one bucket or directory. An empty prefix
// returns s itself. A prefix that does not end in '/' gets one.
func WithPrefix(s Store, prefix string) Store {
	if prefix == "" {
		return s
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	if v, ok := s.(VectorReader); ok {
		return prefixedV{prefixed{s: s, p: prefix}, v}
	}
	return prefixed{s: s, p: prefix}
}

// prefixedV is prefixed over a store that reads into several buffers.
type prefixedV struct {
	prefixed
	v VectorReader
}

func (p prefixedV) GetRangeV(ctx context.Context, name string, off int64, bufs [][]byte) (int, error) {
	return p.v.GetRangeV(ctx, p.p+name, off, bufs)
}

type prefixed struct {
	s Store
	p string
}

func (p prefixed) Put(ctx context.Context, name string, body []byte, ifAbsent bool) error {
	return p.s.Put(ctx, p.p+name, body, ifAbsent)
}

// PutV implements VectorWriter: pieces go through when s takes them.
func (p prefixed) PutV(ctx context.Context, name string, body [][]byte, ifAbsent bool) error {
	return PutPieces(ctx, p.s, p.p+name, body, ifAbsent)
}

func (p prefixed) GetRange(ctx context.Context, name string, off int64, buf []byte) (int, error) {
	return p.s.GetRange(ctx, p.p+name, off, buf)
}

func (p prefixed) Size(ctx context.Context, name string) (int64, error) {
	return p.s.Size(ctx, p.p+name)
}

func (p prefixed) List(ctx context.Context, prefix string, fn func(string, int64) error) error {
	return p.s.List(ctx, p.p+prefix, func(name string, size int64) error {
		return fn(strings.TrimPrefix(name, p.p), size)
	})
}

func (p prefixed) Delete(ctx context.Context, name string) error {
	return p.s.Delete(ctx, p.p+name)
}
