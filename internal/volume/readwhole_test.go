package volume

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/store/mem"
)

// replacingStore replaces the object named target with next right after
// a Size call on it answers, the way a lease renewal by another daemon
// lands between a reader's size query and its GET.
type replacingStore struct {
	store.Store
	target string
	next   []byte
}

func (s *replacingStore) Size(ctx context.Context, name string) (int64, error) {
	n, err := s.Store.Size(ctx, name)
	if err == nil && name == s.target && s.next != nil {
		if perr := s.Store.Put(ctx, name, s.next, false); perr != nil {
			return 0, perr
		}
		s.next = nil
	}
	return n, err
}

// TestReadWholeSeesOneVersion: an object replaced between the size query
// and the read (shorter or longer) is read as the one whole version the
// GET returned, not refused or cut short. CI hit this as "read lease: got
// 158 of 159 bytes" when a renewal changed the lease's length by a byte.
func TestReadWholeSeesOneVersion(t *testing.T) {
	for _, tc := range []struct {
		name        string
		first, next string
	}{
		{"shorter", `{"counter":10}`, `{"counter":9}`},
		{"longer", `{"counter":9}`, `{"counter":10}`},
		{"much longer", `{}`, `{"host":"` + strings.Repeat("h", 20000) + `"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := mem.New()
			if err := st.Put(context.Background(), LeaseName, []byte(tc.first), false); err != nil {
				t.Fatal(err)
			}
			rs := &replacingStore{Store: st, target: LeaseName, next: []byte(tc.next)}
			objs := newProxy(rs)
			defer objs.Close()
			got, err := readWhole(context.Background(), objs, LeaseName)
			if err != nil {
				t.Fatalf("readWhole: %v", err)
			}
			if !bytes.Equal(got, []byte(tc.next)) {
				t.Fatalf("readWhole returned %d bytes (%.20q...), want the replacing version of %d bytes", len(got), got, len(tc.next))
			}
		})
	}
}
