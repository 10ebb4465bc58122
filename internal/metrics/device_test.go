package metrics

import (
	"context"
	"errors"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/frontend"
)

// nopDevice answers every request at once; fail makes requests fail.
type nopDevice struct{ fail error }

func (nopDevice) Size() int64      { return 1 << 30 }
func (nopDevice) BlockSize() int64 { return 4096 }
func (d nopDevice) ReadAt(context.Context, []byte, int64) error {
	return d.fail
}
func (d nopDevice) WriteAt(context.Context, []byte, int64, bool) error {
	return d.fail
}
func (d nopDevice) Zero(context.Context, int64, int64, bool, bool) error {
	return d.fail
}
func (d nopDevice) Flush(context.Context) error { return d.fail }

func TestDeviceCountsRequests(t *testing.T) {
	m := New(zerolog.Nop())
	ctx := context.Background()
	dev := m.Device(nopDevice{})
	buf := make([]byte, 3*4096)
	for range 2 {
		if err := dev.WriteAt(ctx, buf, 0, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.ReadAt(ctx, buf[:4096], 0); err != nil {
		t.Fatal(err)
	}
	if err := dev.Zero(ctx, 0, 1<<20, true, false); err != nil {
		t.Fatal(err)
	}
	if err := dev.Zero(ctx, 0, 8192, false, true); err != nil {
		t.Fatal(err)
	}
	if err := dev.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	bad := m.Device(nopDevice{fail: boom})
	if err := bad.WriteAt(ctx, buf, 0, true); !errors.Is(err, boom) {
		t.Fatalf("failed write returned %v, want its error", err)
	}
	gather(t, m.Registry()).want(t, sample{
		`bs3_device_requests_total{op="write"}`:                 3,
		`bs3_device_request_errors_total{op="write"}`:           1,
		`bs3_device_bytes_total{op="write"}`:                    2 * 3 * 4096, // the failed one moved nothing
		`bs3_device_requests_total{op="read"}`:                  1,
		`bs3_device_bytes_total{op="read"}`:                     4096,
		`bs3_device_requests_total{op="trim"}`:                  1,
		`bs3_device_bytes_total{op="trim"}`:                     1 << 20,
		`bs3_device_requests_total{op="zero"}`:                  1,
		`bs3_device_bytes_total{op="zero"}`:                     8192,
		`bs3_device_requests_total{op="flush"}`:                 1,
		`bs3_device_request_errors_total{op="read"}`:            0,
		`bs3_device_request_duration_seconds_count{op="write"}`: 3,
		`bs3_device_request_duration_seconds_count{op="flush"}`: 1,
		`bs3_device_request_duration_seconds_count{op="read"}`:  1,
	})
	if _, ok := gather(t, m.Registry())[`bs3_device_bytes_total{op="flush"}`]; ok {
		t.Error("flush has a bytes series; it moves no data")
	}
}

// TestDeviceNoAllocation: counting a request allocates nothing, so the
// wrapper costs the hot path only a clock read and atomic adds.
func TestDeviceNoAllocation(t *testing.T) {
	dev := New(zerolog.Nop()).Device(nopDevice{})
	ctx := context.Background()
	buf := make([]byte, 4096)
	allocs := testing.AllocsPerRun(1000, func() {
		_ = dev.WriteAt(ctx, buf, 0, false)
		_ = dev.ReadAt(ctx, buf, 0)
		_ = dev.Zero(ctx, 0, 4096, true, false)
		_ = dev.Flush(ctx)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per round of four requests, want 0", allocs)
	}
}

func TestNilMetricsIsOff(t *testing.T) {
	var m *Metrics
	var d frontend.Device = nopDevice{}
	if got := m.Device(d); got != d {
		t.Error("nil Metrics wrapped the device")
	}
	var b BuseDevice = &nopBuse{}
	if got := m.Buse(b, chunk.Layout{ChunkSize: 1 << 20, BlockSize: 4096}); got != b {
		t.Error("nil Metrics wrapped the BUSE callbacks")
	}
	if m.StoreObserver() != nil {
		t.Error("nil Metrics has a store observer")
	}
	if err := m.AddEngine(Engine{}); err != nil {
		t.Errorf("nil Metrics AddEngine: %v", err)
	}
}

type nopBuse struct{ reads, writes int }

func (b *nopBuse) BuseRead(sector, length int64, buf []byte) error { b.reads++; return nil }
func (b *nopBuse) BuseWrite(writes int64, buf []byte) error        { b.writes++; return nil }
func (b *nopBuse) BusePreRun()                                     {}
func (b *nopBuse) BusePostRemove()                                 {}

// TestBuseCountsItems: a chunk from the kernel counts one request per
// item, by op, with the bytes the item covers.
func TestBuseCountsItems(t *testing.T) {
	m := New(zerolog.Nop())
	l := chunk.Layout{ChunkSize: 1 << 20, BlockSize: 4096}
	inner := &nopBuse{}
	rw := m.Buse(inner, l)
	buf := make([]byte, l.BufferSize())
	b := chunk.NewBuilder(l, buf)
	data := make([]byte, 8192)
	b.Add(chunk.Item{Sector: 0, Length: 16, Seqno: 1, Flag: chunk.OpWrite}, data)
	b.Add(chunk.Item{Sector: 64, Length: 8, Seqno: 2, Flag: chunk.OpWrite}, data[:4096])
	b.Add(chunk.Item{Sector: 128, Length: 2048, Seqno: 3, Flag: chunk.OpDiscard}, nil)
	b.Add(chunk.Item{Sector: 8192, Length: 8, Seqno: 4, Flag: chunk.OpWriteZeroes}, nil)
	b.Seal()
	if err := rw.BuseWrite(int64(b.Items()), buf); err != nil {
		t.Fatal(err)
	}
	if err := rw.BuseRead(10, 4, make([]byte, 4*4096)); err != nil {
		t.Fatal(err)
	}
	rw.BusePreRun()
	rw.BusePostRemove()
	if inner.reads != 1 || inner.writes != 1 {
		t.Fatalf("wrapper passed %d reads and %d writes, want 1 and 1", inner.reads, inner.writes)
	}
	gather(t, m.Registry()).want(t, sample{
		`bs3_device_requests_total{op="write"}`:                 2,
		`bs3_device_bytes_total{op="write"}`:                    3 * 4096,
		`bs3_device_requests_total{op="trim"}`:                  1,
		`bs3_device_bytes_total{op="trim"}`:                     1 << 20,
		`bs3_device_requests_total{op="zero"}`:                  1,
		`bs3_device_bytes_total{op="zero"}`:                     4096,
		`bs3_device_requests_total{op="read"}`:                  1,
		`bs3_device_bytes_total{op="read"}`:                     4 * 4096,
		`bs3_device_request_duration_seconds_count{op="write"}`: 0,
		`bs3_device_request_duration_seconds_count{op="read"}`:  1,
	})
}

// BenchmarkDeviceOverhead measures what the wrapper adds to a request
// that costs nothing by itself: compare the bare and counted sub-benchmarks.
func BenchmarkDeviceOverhead(b *testing.B) {
	ctx := context.Background()
	buf := make([]byte, 4096)
	for _, bc := range []struct {
		name string
		dev  frontend.Device
	}{{"bare", nopDevice{}}, {"counted", New(zerolog.Nop()).Device(nopDevice{})}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					_ = bc.dev.WriteAt(ctx, buf, 0, false)
				}
			})
		})
	}
}

// tryDevice is a nopDevice that takes small writes without waiting when
// take is set.
type tryDevice struct {
	nopDevice
	take bool
}

func (d tryDevice) TryWriteAt([]byte, int64) (bool, error) { return d.take, nil }

// Writes the NBD reader runs itself (TryWriteAt) are counted like any
// other write, and a declined one not at all; over a device without
// TryWriteAt the wrapper declines every write.
func TestDeviceCountsTryWrites(t *testing.T) {
	m := New(zerolog.Nop())
	buf := make([]byte, 4096)
	for _, d := range []frontend.Device{tryDevice{take: true}, tryDevice{take: false}, nopDevice{}} {
		tw, ok := m.Device(d).(frontend.TryWriter)
		if !ok {
			t.Fatal("the counting device does not forward TryWriteAt")
		}
		took, err := tw.TryWriteAt(buf, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, isTry := d.(tryDevice)
		if want := isTry && d.(tryDevice).take; took != want {
			t.Fatalf("TryWriteAt over %T = %v, want %v", d, took, want)
		}
	}
	gather(t, m.Registry()).want(t, sample{
		`bs3_device_requests_total{op="write"}`: 1,
		`bs3_device_bytes_total{op="write"}`:    4096,
	})
}
