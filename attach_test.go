package main

// Black-box attach-integrity scenarios against the real bs3 binary: the
// NBD frontend over a real MinIO, driven with qemu-io, with the bucket
// inspected (and damaged on purpose) directly through the s3 store. Each
// scenario starts and stops the daemon several times and checks what a
// start that must not attach leaves behind in the bucket, and that every
// flushed write survives.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	s3store "github.com/bs3/bs3/internal/store/s3"
	"github.com/bs3/bs3/internal/testutil/minio"
)

const (
	// attachSettleTimeout bounds how long a started daemon may take to
	// either serve its NBD export or exit. It covers the wait over a lease
	// that was not released (2.5 lease intervals of 5 s) with room to spare.
	attachSettleTimeout = 60 * time.Second
	// attachStopTimeout bounds a clean stop after SIGTERM.
	attachStopTimeout = 60 * time.Second
	// attachClientTimeout bounds one qemu-io run.
	attachClientTimeout = 2 * time.Minute
	// attachBlock is the device block size the tests use.
	attachBlock = 4096
)

// attachEnv is one scenario: a MinIO server, a bucket of its own, the
// daemon binary and a direct client on the bucket.
type attachEnv struct {
	t      *testing.T
	bin    string
	srv    *minio.Server
	bucket string
	st     *s3store.Store
	base   []string // BS3_* settings every daemon of the scenario gets
}

func attachSetup(t *testing.T, settings ...string) *attachEnv {
	t.Helper()
	if _, err := exec.LookPath("qemu-io"); err != nil {
		t.Skip("qemu-io not installed (Debian package qemu-utils); skipping the attach scenarios that drive the NBD export with it")
	}
	srv := minio.Start(t)
	bucket := srv.Bucket(t)
	e := &attachEnv{
		t:      t,
		bin:    buildDaemon(t),
		srv:    srv,
		bucket: bucket,
		st:     srv.Store(t, bucket),
	}
	e.base = append([]string{
		"BS3_STORE=s3",
		"BS3_S3_BUCKET=" + bucket,
		"BS3_S3_REMOTE=" + srv.Endpoint,
		"BS3_S3_REGION=" + srv.Region,
		"BS3_S3_ACCESS_KEY=" + srv.AccessKey,
		"BS3_S3_SECRET_KEY=" + srv.SecretKey,
		"BS3_FRONTEND=nbd",
		"BS3_SIZE=1",
		"BS3_BLOCK_SIZE=" + strconv.Itoa(attachBlock),
		"BS3_THREADS=1",
		"BS3_WRITE_CHUNK_SIZE=1",
		"BS3_WRITE_SHARED_BUFFER_SIZE=4",
		"BS3_WRITE_DURABLE=true",
		"BS3_LOG_LEVEL=info",
	}, settings...)
	return e
}

// attachOutput collects a daemon's stdout and stderr.
type attachOutput struct{ syncBuffer }

// tail is the last n lines of the output.
func (o *attachOutput) tail(n int) string {
	lines := strings.Split(strings.TrimRight(o.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// attachDaemon is one bs3 process.
type attachDaemon struct {
	t    *testing.T
	name string
	addr string // NBD listen address
	cmd  *exec.Cmd
	out  *attachOutput
	done chan struct{} // closed when the process has exited
}

// start runs the daemon with the scenario's settings plus extra ones (a
// later setting of the same variable wins).
func (e *attachEnv) start(name string, extra ...string) *attachDaemon {
	e.t.Helper()
	d := &attachDaemon{t: e.t, name: name, addr: freeAddr(e.t), out: &attachOutput{}, done: make(chan struct{})}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BS3_") { // no outside settings leak in
			env = append(env, kv)
		}
	}
	env = append(env, e.base...)
	env = append(env, "BS3_NBD_LISTEN="+d.addr)
	env = append(env, extra...)
	d.cmd = exec.Command(e.bin, "-c", "")
	d.cmd.Env = env
	d.cmd.Stdout = d.out
	d.cmd.Stderr = d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		e.t.Fatalf("start bs3 (%s): %v", name, err)
	}
	go func() {
		_ = d.cmd.Wait() // the status is read from ProcessState
		close(d.done)
	}()
	e.t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			_ = d.cmd.Process.Kill()
			<-d.done
		}
		if e.t.Failed() {
			e.t.Logf("bs3 %s output (tail):\n%s", d.name, d.out.tail(30))
		}
	})
	return d
}

func (d *attachDaemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// serving reports whether the NBD export answers, i.e. the daemon
// attached the volume. The address is bound before the attach (so a busy
// address fails first) and a connection made earlier waits in the
// backlog, so a connect alone proves nothing: the server's greeting is
// sent only once it serves.
func (d *attachDaemon) serving() bool {
	return nbdGreets(d.addr, 200*time.Millisecond)
}

// Outcomes of a start.
const (
	attachPending = iota
	attachAttached
	attachExited
)

// attachSettle waits until every daemon has either attached or exited and
// returns the outcomes; a daemon that does neither within the timeout
// fails the test.
func attachSettle(t *testing.T, ds ...*attachDaemon) []int {
	t.Helper()
	states := make([]int, len(ds))
	deadline := time.Now().Add(attachSettleTimeout)
	for {
		pending := 0
		for i, d := range ds {
			if states[i] != attachPending {
				continue
			}
			switch {
			case d.exited():
				states[i] = attachExited
			case d.serving():
				states[i] = attachAttached
			default:
				pending++
			}
		}
		if pending == 0 {
			return states
		}
		if time.Now().After(deadline) {
			for i, d := range ds {
				if states[i] == attachPending {
					t.Errorf("bs3 %s neither attached nor exited within %v", d.name, attachSettleTimeout)
				}
			}
			t.FailNow()
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitAttached fails the test unless the daemon attaches.
func (d *attachDaemon) waitAttached() {
	d.t.Helper()
	if attachSettle(d.t, d)[0] != attachAttached {
		d.t.Fatalf("bs3 %s exited (%v) instead of attaching:\n%s", d.name, d.cmd.ProcessState, d.out.tail(30))
	}
}

// stop sends SIGTERM and requires a clean exit.
func (d *attachDaemon) stop() {
	d.t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil && !d.exited() {
		d.t.Fatalf("SIGTERM to bs3 %s: %v", d.name, err)
	}
	select {
	case <-d.done:
	case <-time.After(attachStopTimeout):
		d.t.Fatalf("bs3 %s did not stop within %v of SIGTERM:\n%s", d.name, attachStopTimeout, d.out.tail(30))
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		d.t.Fatalf("bs3 %s exited with status %d after SIGTERM, want 0:\n%s", d.name, code, d.out.tail(30))
	}
}

// checkRefused checks an exited daemon: non-zero status and a message
// containing fragment (case-insensitively).
func (d *attachDaemon) checkRefused(fragment string) {
	d.t.Helper()
	if code := d.cmd.ProcessState.ExitCode(); code == 0 {
		d.t.Errorf("bs3 %s refused to attach but exited with status 0, want non-zero", d.name)
	}
	if !strings.Contains(strings.ToLower(d.out.String()), strings.ToLower(fragment)) {
		d.t.Errorf("bs3 %s exited without a message containing %q:\n%s", d.name, fragment, d.out.tail(30))
	}
}

// expectRefusal requires the daemon not to attach: it must exit non-zero
// with a message containing fragment. A daemon that attaches anyway fails
// the test and is stopped (cleanly, so that the damage stays as it did it).
// It reports whether the daemon attached.
func (d *attachDaemon) expectRefusal(fragment, why string) (attached bool) {
	d.t.Helper()
	if attachSettle(d.t, d)[0] == attachAttached {
		d.t.Errorf("bs3 %s attached the volume although %s; it must refuse with a message containing %q", d.name, why, fragment)
		d.stop()
		return true
	}
	d.checkRefused(fragment)
	return false
}

// cycle attaches and detaches once.
func (e *attachEnv) cycle(name string, extra ...string) {
	e.t.Helper()
	d := e.start(name, extra...)
	d.waitAttached()
	d.stop()
}

// attachQemu runs qemu-io with cmds on the daemon's export and returns
// its output and whether every command succeeded (pattern checks
// included: qemu-io reports a mismatch without an exit status).
func attachQemu(t *testing.T, d *attachDaemon, cmds []string) (string, bool) {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, "nbd://"+d.addr+"/bs3")
	ctx, cancel := context.WithTimeout(context.Background(), attachClientTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-io", args...).CombinedOutput()
	s := string(out)
	if ctx.Err() != nil {
		return s + "\n(qemu-io timed out)", false
	}
	ok := err == nil &&
		!strings.Contains(s, "Pattern verification failed") &&
		!strings.Contains(s, "failed:") &&
		!strings.Contains(strings.ToLower(s), "error")
	return s, ok
}

// attachWrite writes and flushes through d, failing the test on error.
func attachWrite(t *testing.T, d *attachDaemon, cmds []string) {
	t.Helper()
	if out, ok := attachQemu(t, d, cmds); !ok {
		t.Fatalf("qemu-io writes through bs3 %s failed:\n%s", d.name, out)
	}
}

// attachReadCmds are qemu-io commands that check every block of want
// (offset → pattern); with zeroNext also that the block after each reads
// zeros (the writes were placed apart).
func attachReadCmds(want map[int64]byte, zeroNext bool) []string {
	offs := make([]int64, 0, len(want))
	for off := range want {
		offs = append(offs, off)
	}
	sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
	var cmds []string
	for _, off := range offs {
		cmds = append(cmds, fmt.Sprintf("read -P 0x%02x %d 4k", want[off], off))
		if zeroNext {
			cmds = append(cmds, fmt.Sprintf("read -P 0x00 %d 4k", off+attachBlock))
		}
	}
	return cmds
}

// attachObject is one object of the bucket.
type attachObject struct {
	size int64
	sum  [32]byte
	body []byte
}

// objects reads the whole bucket (only while no daemon runs).
func (e *attachEnv) objects() map[string]attachObject {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sizes := map[string]int64{}
	if err := e.st.List(ctx, "", func(name string, size int64) error {
		sizes[name] = size
		return nil
	}); err != nil {
		e.t.Fatalf("list bucket: %v", err)
	}
	objs := make(map[string]attachObject, len(sizes))
	for name, size := range sizes {
		buf := make([]byte, size)
		n, err := e.st.GetRange(ctx, name, 0, buf)
		if err != nil {
			e.t.Fatalf("read %s: %v", name, err)
		}
		if int64(n) != size {
			e.t.Fatalf("read %s: %d of %d bytes", name, n, size)
		}
		objs[name] = attachObject{size: size, sum: sha256.Sum256(buf), body: buf}
	}
	return objs
}

// names lists the bucket without reading the objects.
func (e *attachEnv) names() map[string]int64 {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	names := map[string]int64{}
	if err := e.st.List(ctx, "", func(name string, size int64) error {
		names[name] = size
		return nil
	}); err != nil {
		e.t.Fatalf("list bucket: %v", err)
	}
	return names
}

func (e *attachEnv) put(name string, body []byte) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.st.Put(ctx, name, body, false); err != nil {
		e.t.Fatalf("put %s: %v", name, err)
	}
}

func (e *attachEnv) remove(name string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.st.Delete(ctx, name); err != nil {
		e.t.Fatalf("delete %s: %v", name, err)
	}
}

// restore puts the bucket back exactly as snap.
func (e *attachEnv) restore(snap map[string]attachObject) {
	e.t.Helper()
	for name := range e.names() {
		if _, ok := snap[name]; !ok {
			e.remove(name)
		}
	}
	for name, o := range snap {
		e.put(name, o.body)
	}
}

// attachDataKey parses a data object name, %08x/%08x (low and high 32
// bits of the key).
func attachDataKey(name string) (uint64, bool) {
	if len(name) != 17 || name[8] != '/' {
		return 0, false
	}
	lo, err1 := strconv.ParseUint(name[:8], 16, 32)
	hi, err2 := strconv.ParseUint(name[9:], 16, 32)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return hi<<32 | lo, true
}

func attachIsCheckpoint(name string) bool { return strings.HasPrefix(name, "checkpoint/") }

// attachCheckKept fails the test unless after still holds every object of
// before, with every data object and checkpoint byte-identical, and no
// data object or checkpoint that before did not have. The superblock, the
// lease and attach records may have been rewritten.
func attachCheckKept(t *testing.T, what string, before, after map[string]attachObject) {
	t.Helper()
	var problems []string
	for _, name := range attachSorted(before) {
		b := before[name]
		a, ok := after[name]
		_, isData := attachDataKey(name)
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("%s (%d bytes) was deleted", name, b.size))
		case (isData || attachIsCheckpoint(name)) && a.size == 0 && b.size > 0:
			problems = append(problems, fmt.Sprintf("%s (%d bytes) was emptied", name, b.size))
		case (isData || attachIsCheckpoint(name)) && a.sum != b.sum:
			problems = append(problems, fmt.Sprintf("%s changed: %d bytes, was %d bytes", name, a.size, b.size))
		}
	}
	for _, name := range attachSorted(after) {
		_, isData := attachDataKey(name)
		if _, ok := before[name]; !ok && (isData || attachIsCheckpoint(name)) {
			problems = append(problems, fmt.Sprintf("%s (%d bytes) was created", name, after[name].size))
		}
	}
	attachReport(t, what, problems)
}

// attachCheckSame fails the test unless after is exactly before.
func attachCheckSame(t *testing.T, what string, before, after map[string]attachObject) {
	t.Helper()
	var problems []string
	for _, name := range attachSorted(before) {
		a, ok := after[name]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("%s (%d bytes) was deleted", name, before[name].size))
		case a.sum != before[name].sum:
			problems = append(problems, fmt.Sprintf("%s changed: %d bytes, was %d bytes", name, a.size, before[name].size))
		}
	}
	for _, name := range attachSorted(after) {
		if _, ok := before[name]; !ok {
			problems = append(problems, fmt.Sprintf("%s (%d bytes) was created", name, after[name].size))
		}
	}
	attachReport(t, what, problems)
}

// attachCheckNonEmptyKept fails the test unless every non-empty data
// object of before is still in after, byte-identical: no object holding
// data was deleted or emptied.
func attachCheckNonEmptyKept(t *testing.T, what string, before, after map[string]attachObject) {
	t.Helper()
	var problems []string
	for _, name := range attachSorted(before) {
		b := before[name]
		if _, isData := attachDataKey(name); !isData || b.size == 0 {
			continue
		}
		a, ok := after[name]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("%s (%d bytes) was deleted", name, b.size))
		case a.size == 0:
			problems = append(problems, fmt.Sprintf("%s (%d bytes) was emptied", name, b.size))
		case a.sum != b.sum:
			problems = append(problems, fmt.Sprintf("%s changed: %d bytes, was %d bytes", name, a.size, b.size))
		}
	}
	attachReport(t, what, problems)
}

func attachReport(t *testing.T, what string, problems []string) {
	t.Helper()
	if len(problems) == 0 {
		return
	}
	const show = 20
	total, more := len(problems), ""
	if total > show {
		more = fmt.Sprintf("\n  ... and %d more", total-show)
		problems = problems[:show]
	}
	t.Errorf("%s: the bucket changed (%d problems):\n  %s%s", what, total, strings.Join(problems, "\n  "), more)
}

func attachSorted[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// attachSummary counts data objects (and the empty ones) and checkpoints.
func attachSummary(objs map[string]attachObject) (data, empty, ckpts int, lowest uint64) {
	lowest = ^uint64(0)
	for name, o := range objs {
		if k, ok := attachDataKey(name); ok {
			data++
			if o.size == 0 {
				empty++
			}
			lowest = min(lowest, k)
		} else if attachIsCheckpoint(name) {
			ckpts++
		}
	}
	return data, empty, ckpts, lowest
}

// Scenario: dead GC deleted the objects below the delete floor, so the
// keys of the bucket no longer start at 0 and only a checkpoint can say
// where the volume starts. A start that would rebuild the map from key 0
// (skip_checkpoint, or every checkpoint unusable) must refuse and leave
// the bucket alone; with the checkpoints back, every write is there.
func TestAttachNoUsableCheckpointAfterDeadGC(t *testing.T) {
	e := attachSetup(t, "BS3_CHECKPOINT_OBJECTS=16", "BS3_CHECKPOINT_INTERVAL=1", "BS3_GC_WAIT=3600")

	// 64 blocks, each written and flushed on its own, so each is its own
	// object; they sit 64 KiB apart so that misplaced data shows.
	const blocks = 64
	want := map[int64]byte{}
	var cmds []string
	for i := 0; i < blocks; i++ {
		off := int64(i) * 64 << 10
		want[off] = byte(0x40 + i)
		cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d 4k", want[off], off), "flush")
	}
	d := e.start("write")
	d.waitAttached()
	attachWrite(t, d, cmds)
	d.stop()
	written := e.objects()

	// Dead GC with a short period deletes dead objects below the delete
	// floor; wait until some object of the bucket is gone.
	d = e.start("dead-gc", "BS3_GC_WAIT=1")
	d.waitAttached()
	deadline := time.Now().Add(60 * time.Second)
	var gone []string
	for len(gone) == 0 {
		now := e.names()
		for name := range written {
			if _, isData := attachDataKey(name); isData {
				if _, ok := now[name]; !ok {
					gone = append(gone, name)
				}
			}
		}
		if len(gone) == 0 {
			if time.Now().After(deadline) {
				t.Fatalf("dead GC deleted no data object within 60 s; scenario precondition not met")
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	time.Sleep(2 * time.Second) // let the pass finish before stopping
	d.stop()
	snap := e.objects()
	data, empty, ckpts, lowest := attachSummary(snap)
	t.Logf("after dead GC: %d data objects (%d empty), lowest key %d, %d checkpoints; dead GC deleted %d objects (e.g. %s)",
		data, empty, lowest, ckpts, len(gone), gone[0])
	if ckpts == 0 {
		t.Fatalf("no checkpoint in the bucket after two clean stops")
	}

	// (a) skip_checkpoint, with a write buffer 16 times larger (so a
	// larger window of keys past the first missing one).
	d = e.start("skip-checkpoint", "BS3_SKIP_CHECKPOINT=true", "BS3_WRITE_SHARED_BUFFER_SIZE=64")
	attachedA := d.expectRefusal("skip_checkpoint", "the keys no longer start at 0 and skip_checkpoint = true ignores the checkpoints")
	failedBefore := t.Failed()
	attachCheckKept(t, "(a) start with skip_checkpoint = true", snap, e.objects())
	if attachedA || t.Failed() != failedBefore {
		t.Logf("(a) changed the bucket; restoring it as it was after dead GC for the next step")
		e.restore(snap)
	}

	// (b) every checkpoint damaged.
	for _, name := range attachSorted(snap) {
		if attachIsCheckpoint(name) {
			garbage := make([]byte, snap[name].size)
			if _, err := rand.Read(garbage); err != nil {
				t.Fatal(err)
			}
			e.put(name, garbage)
		}
	}
	corrupted := e.objects()
	d = e.start("corrupt-checkpoints")
	attachedB := d.expectRefusal("no usable checkpoint", "every checkpoint is damaged and the keys no longer start at 0")
	failedBefore = t.Failed()
	attachCheckKept(t, "(b) start with every checkpoint damaged", corrupted, e.objects())
	if attachedB || t.Failed() != failedBefore {
		t.Logf("(b) changed the bucket; restoring it as it was after dead GC for the last step")
		e.restore(snap)
	} else {
		for _, name := range attachSorted(snap) {
			if attachIsCheckpoint(name) {
				e.put(name, snap[name].body)
			}
		}
	}

	// With the checkpoints back every block reads back.
	d = e.start("verify")
	d.waitAttached()
	if out, ok := attachQemu(t, d, attachReadCmds(want, true)); !ok {
		t.Errorf("reading the %d blocks back after restoring the checkpoints failed:\n%s", blocks, out)
	}
	d.stop()
}

// Scenario: the superblock of a volume that has been attached several
// times is deleted (by hand, a lifecycle rule, ...). A start must either
// refuse and change nothing, or rebuild such that a new write still wins
// over the older ones after a restart.
func TestAttachMissingSuperblock(t *testing.T) {
	e := attachSetup(t, "BS3_GC_WAIT=3600")
	for i := 1; i <= 3; i++ {
		e.cycle(fmt.Sprintf("attach-%d", i))
	}
	const patA, patB = 0xa1, 0xb2
	d := e.start("write-A")
	d.waitAttached()
	attachWrite(t, d, []string{fmt.Sprintf("write -P 0x%02x 0 4k", patA), "flush", fmt.Sprintf("read -P 0x%02x 0 4k", patA)})
	d.stop()

	e.remove("superblock")
	before := e.objects()
	if _, ok := before["superblock"]; ok {
		t.Fatal("superblock still listed after deleting it")
	}
	d = e.start("no-superblock")
	if attachSettle(t, d)[0] == attachExited {
		// Refusal: a message saying so, and the bucket untouched.
		d.checkRefused("superblock is missing")
		attachCheckSame(t, "start without a superblock", before, e.objects())
		return
	}

	// Rebuild: a new flushed write must win over the old one, now and
	// after a restart.
	t.Logf("bs3 attached without a superblock (rebuild); checking that a new write wins")
	out, ok := attachQemu(t, d, []string{fmt.Sprintf("write -P 0x%02x 0 4k", patB), "flush", fmt.Sprintf("read -P 0x%02x 0 4k", patB)})
	if !ok {
		t.Errorf("after attaching without a superblock, block 0 written with 0x%02x and flushed does not read back as 0x%02x (the older 0x%02x write wins):\n%s", patB, patB, patA, out)
	}
	d.stop()
	d = e.start("after-rebuild")
	d.waitAttached()
	if out, ok := attachQemu(t, d, attachReadCmds(map[int64]byte{0: patB}, false)); !ok {
		t.Errorf("after a restart, block 0 does not read back as 0x%02x, the last flushed write (0x%02x was written before the superblock was lost):\n%s", patB, patA, out)
	}
	d.stop()
}

// Scenario: two daemons started on one volume at the same moment. At
// most one may attach; the other exits saying the volume is attached by
// another bs3. No object holding data is deleted or emptied, and every
// write flushed through the winner is there after a restart.
func TestAttachTwoDaemonsAtOnce(t *testing.T) {
	e := attachSetup(t, "BS3_GC_WAIT=3600")
	e.cycle("create")

	want := map[int64]byte{}
	var cmds []string
	for i := 0; i < 8; i++ {
		off := int64(i) * 64 << 10
		want[off] = byte(0x10 + i)
		cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d 4k", want[off], off))
	}
	d := e.start("initial-data")
	d.waitAttached()
	attachWrite(t, d, append(cmds, "flush"))
	d.stop()
	prev := e.objects()

	const rounds = 5
	for r := 1; r <= rounds; r++ {
		a := e.start(fmt.Sprintf("round-%d-a", r))
		b := e.start(fmt.Sprintf("round-%d-b", r))
		states := attachSettle(t, a, b)
		var winners, losers []*attachDaemon
		for i, dm := range []*attachDaemon{a, b} {
			if states[i] == attachAttached {
				winners = append(winners, dm)
			} else {
				losers = append(losers, dm)
			}
		}
		for _, l := range losers {
			l.checkRefused("attached by another bs3")
		}
		switch len(winners) {
		case 0:
			t.Fatalf("round %d: neither daemon attached the volume", r)
		case 2:
			t.Errorf("round %d: both daemons attached the volume at once", r)
		}

		// Write through the (first) winner: a new block, and block 0
		// overwritten, so the newest write must win there.
		w := winners[0]
		newOff := int64(0x100+r) * 64 << 10
		want[newOff] = byte(0xa0 + r)
		want[0] = byte(0xb0 + r)
		out, ok := attachQemu(t, w, []string{
			fmt.Sprintf("write -P 0x%02x %d 4k", want[newOff], newOff),
			fmt.Sprintf("write -P 0x%02x 0 4k", want[0]),
			"flush",
		})
		if !ok {
			t.Errorf("round %d: writes through bs3 %s failed:\n%s", r, w.name, out)
		}
		for _, dm := range winners {
			dm.stop()
		}
		now := e.objects()
		attachCheckNonEmptyKept(t, fmt.Sprintf("round %d, after the two starts", r), prev, now)

		v := e.start(fmt.Sprintf("round-%d-verify", r))
		v.waitAttached()
		if out, ok := attachQemu(t, v, attachReadCmds(want, true)); !ok {
			t.Errorf("round %d: a flushed write is missing after a restart:\n%s", r, out)
		}
		v.stop()
		after := e.objects()
		attachCheckNonEmptyKept(t, fmt.Sprintf("round %d, after the restart", r), now, after)
		prev = after
		if t.Failed() {
			t.FailNow() // later rounds would start from a damaged volume
		}
	}
}
