package metrics

import (
	"context"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/frontend"
)

// Device operations, the values of the op label of the bs3_device_*
// families.
const (
	devRead = iota
	devWrite
	devFlush
	devTrim
	devZero
	numDevOps
)

var devOpNames = [numDevOps]string{"read", "write", "flush", "trim", "zero"}

// deviceBuckets span a read served from the cache (tens of µs) to a
// durable flush or a read during an outage (seconds).
var deviceBuckets = prometheus.ExponentialBuckets(10e-6, 4, 11) // 10µs … 10.5s

// devOp holds the pre-resolved children of one operation, so counting a
// request looks nothing up and allocates nothing.
type devOp struct {
	reqs, errs prometheus.Counter
	bytes      prometheus.Counter // nil for flush
	dur        prometheus.Observer
}

// done counts one request of n bytes that started at start; with timed
// false (BUSE writes, see Buse) no latency is recorded.
func (o *devOp) done(start time.Time, n int64, err error, timed bool) {
	if timed {
		o.dur.Observe(time.Since(start).Seconds())
	}
	o.reqs.Inc()
	if err != nil {
		o.errs.Inc()
		return
	}
	if o.bytes != nil {
		o.bytes.Add(float64(n))
	}
}

type deviceMetrics struct {
	reqs, errs, bytes *prometheus.CounterVec
	dur               *prometheus.HistogramVec
	ops               [numDevOps]devOp
}

func newDeviceMetrics() *deviceMetrics {
	d := &deviceMetrics{
		reqs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "device", Name: "requests_total",
			Help: "Requests served by the block device, by operation (read, write, flush, trim, zero).",
		}, []string{"op"}),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "device", Name: "request_errors_total",
			Help: "Device requests that failed, by operation.",
		}, []string{"op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "device", Name: "bytes_total",
			Help: "Bytes of the device requests that succeeded, by operation (read, write, trim, zero: the bytes they cover).",
		}, []string{"op"}),
		dur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "device", Name: "request_duration_seconds",
			Help:    "Time from a device request's arrival at the engine to its answer, by operation.",
			Buckets: deviceBuckets,
		}, []string{"op"}),
	}
	for i, name := range devOpNames {
		o := &d.ops[i]
		o.reqs = d.reqs.WithLabelValues(name)
		o.errs = d.errs.WithLabelValues(name)
		o.dur = d.dur.WithLabelValues(name)
		if i != devFlush {
			o.bytes = d.bytes.WithLabelValues(name)
		}
	}
	return d
}

func (d *deviceMetrics) Describe(ch chan<- *prometheus.Desc) {
	d.reqs.Describe(ch)
	d.errs.Describe(ch)
	d.bytes.Describe(ch)
	d.dur.Describe(ch)
}

func (d *deviceMetrics) Collect(ch chan<- prometheus.Metric) {
	d.reqs.Collect(ch)
	d.errs.Collect(ch)
	d.bytes.Collect(ch)
	d.dur.Collect(ch)
}

// Device returns dev counting every request in the bs3_device_* families;
// with m nil, dev itself. The NBD, FUSE and ublk frontends all serve the
// chunker through it, so it is the one place their I/O passes.
func (m *Metrics) Device(dev frontend.Device) frontend.Device {
	if m == nil || dev == nil {
		return dev
	}
	return &device{Device: dev, m: m.dev}
}

type device struct {
	frontend.Device
	m *deviceMetrics
}

func (d *device) ReadAt(ctx context.Context, p []byte, off int64) error {
	start := time.Now()
	err := d.Device.ReadAt(ctx, p, off)
	d.m.ops[devRead].done(start, int64(len(p)), err, true)
	return err
}

func (d *device) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	start := time.Now()
	err := d.Device.WriteAt(ctx, p, off, fua)
	d.m.ops[devWrite].done(start, int64(len(p)), err, true)
	return err
}

// TryWriteAt forwards to the device when it is a frontend.TryWriter and
// counts the writes it takes; otherwise it takes none.
func (d *device) TryWriteAt(p []byte, off int64) (bool, error) {
	tw, ok := d.Device.(frontend.TryWriter)
	if !ok {
		return false, nil
	}
	start := time.Now()
	done, err := tw.TryWriteAt(p, off)
	if done {
		d.m.ops[devWrite].done(start, int64(len(p)), err, true)
	}
	return done, err
}

// ObserveRead forwards to the device when it is a
// frontend.ReadObserver.
func (d *device) ObserveRead(ctx context.Context, off, length int64) context.Context {
	if ro, ok := d.Device.(frontend.ReadObserver); ok {
		return ro.ObserveRead(ctx, off, length)
	}
	return ctx
}

// PayloadWindow forwards to the device when it is a
// frontend.WindowWriter; otherwise it takes no windows.
func (d *device) PayloadWindow() []byte {
	if ww, ok := d.Device.(frontend.WindowWriter); ok {
		return ww.PayloadWindow()
	}
	return nil
}

// WriteWindows forwards to the device (only windows from PayloadWindow
// reach it) and counts the write as WriteAt does.
func (d *device) WriteWindows(ctx context.Context, wins [][]byte, crcs []uint32, n, off int64, fua bool) error {
	ww, ok := d.Device.(frontend.WindowWriter)
	if !ok {
		return fmt.Errorf("write windows: the device takes none: %w", frontend.ErrInvalid)
	}
	start := time.Now()
	err := ww.WriteWindows(ctx, wins, crcs, n, off, fua)
	d.m.ops[devWrite].done(start, n, err, true)
	return err
}

// RecycleWindows forwards to the device.
func (d *device) RecycleWindows(wins [][]byte) {
	if ww, ok := d.Device.(frontend.WindowWriter); ok {
		ww.RecycleWindows(wins)
	}
}

func (d *device) Zero(ctx context.Context, off, length int64, discard, fua bool) error {
	start := time.Now()
	err := d.Device.Zero(ctx, off, length, discard, fua)
	op := devZero
	if discard {
		op = devTrim
	}
	d.m.ops[op].done(start, length, err, true)
	return err
}

func (d *device) Flush(ctx context.Context) error {
	start := time.Now()
	err := d.Device.Flush(ctx)
	d.m.ops[devFlush].done(start, 0, err, true)
	return err
}

// BuseDevice is the set of callbacks the BUSE library calls (a
// buse.Adapter over the volume or the null device).
type BuseDevice interface {
	BuseRead(sector, length int64, buf []byte) error
	BuseWrite(writes int64, buf []byte) error
	BusePreRun()
	BusePostRemove()
}

// Buse returns rw counting its requests in the bs3_device_* families;
// with m nil, rw itself. Reads are counted like the other frontends'.
// Writes arrive as whole chunks that the kernel module built (and the
// BUSE library answers flushes itself), so each item of a committed chunk
// counts as one request of its op with its bytes, and no write latency is
// recorded (docs/ARCHITECTURE.md §14).
func (m *Metrics) Buse(rw BuseDevice, l chunk.Layout) BuseDevice {
	if m == nil || rw == nil {
		return rw
	}
	return &buseDevice{BuseDevice: rw, m: m.dev, l: l}
}

type buseDevice struct {
	BuseDevice
	m *deviceMetrics
	l chunk.Layout
}

func (b *buseDevice) BuseRead(sector, length int64, buf []byte) error {
	start := time.Now()
	err := b.BuseDevice.BuseRead(sector, length, buf)
	// sector and length count device blocks (see buse.Adapter.BuseRead).
	b.m.ops[devRead].done(start, length*b.l.BlockSize, err, true)
	return err
}

func (b *buseDevice) BuseWrite(writes int64, buf []byte) error {
	err := b.BuseDevice.BuseWrite(writes, buf)
	n := b.l.MaxItems()
	if writes >= 0 {
		n = min(n, writes)
	}
	n = min(n, int64(len(buf))/chunk.ItemSize)
	for i := range int(n) {
		it := chunk.GetItem(buf, i)
		if it.Length == 0 {
			break
		}
		op := devWrite
		switch it.Flag {
		case chunk.OpDiscard, chunk.OpSecureErase:
			op = devTrim
		case chunk.OpWriteZeroes:
			op = devZero
		}
		b.m.ops[op].done(time.Time{}, it.Bytes(), err, false)
	}
	return err
}
