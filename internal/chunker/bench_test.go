package chunker

import (
	"context"
	"testing"
	"time"

	"github.com/bs3/bs3/internal/store/faulty"
	"github.com/bs3/bs3/internal/store/mem"
)

// BenchmarkReadAfterWrite compares the two ways a read of a block whose
// write is not yet in the map can be served: from chunk memory (what the
// chunker does) and by waiting until the chunk is committed. The store
// delays every upload by 20 ms, a fast S3 PUT.
func BenchmarkReadAfterWrite(b *testing.B) {
	for _, wait := range []bool{false, true} {
		name := "from-memory"
		if wait {
			name = "wait-for-commit"
		}
		b.Run(name, func(b *testing.B) {
			f := faulty.New(mem.New())
			f.Add(faulty.Rule{Ops: []faulty.Op{faulty.OpPut}, Delay: 20 * time.Millisecond})
			r := newRig(b, f, false)
			ctx := context.Background()
			data := block(1, 4096)
			buf := make([]byte, 4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				off := int64(i%1024) * 4096
				if err := r.c.WriteAt(ctx, data, off, false); err != nil {
					b.Fatal(err)
				}
				if wait {
					if err := r.c.Drain(ctx); err != nil {
						b.Fatal(err)
					}
				}
				if err := r.c.ReadAt(ctx, buf, off); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
