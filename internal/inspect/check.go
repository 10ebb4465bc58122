package inspect

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"

	"github.com/bs3/bs3/internal/chunk"
	"github.com/bs3/bs3/internal/extentmap"
	"github.com/bs3/bs3/internal/objproxy"
	"github.com/bs3/bs3/internal/store"
	"github.com/bs3/bs3/internal/volume"
)

// CheckOptions configure Check.
type CheckOptions struct {
	// Fallback is the geometry to use when the superblock is unusable.
	Fallback Fallback
	// Concurrency is how many object headers are read at once (32).
	Concurrency int
	// Progress, when set, is told how far each phase got.
	Progress func(phase string, done, total int64)
}

// Severity of a finding.
type Severity string

// Severities: Damage makes the check fail; Warning is something that may
// be damage or a moment of a live volume; Note is informational.
const (
	Damage  Severity = "damage"
	Warning Severity = "warning"
	Note    Severity = "note"
)

// Finding is one thing check found. Key is the data key concerned (-1
// when none); Object the object name, if any.
type Finding struct {
	Severity Severity `json:"severity"`
	Key      int64    `json:"key"`
	Object   string   `json:"object,omitempty"`
	Message  string   `json:"message"`
}

// Report is the result of Check.
type Report struct {
	Findings []Finding `json:"findings"`
	// Checked counts what was looked at.
	DataObjects  int64 `json:"data_objects"`
	Checkpoints  int   `json:"checkpoints"`
	Replays      int   `json:"replays"`
	ReplayedKeys int64 `json:"replayed_keys"`
	// EndOfLog is the first key a roll-forward from the delete floor
	// stops at: the next key the volume will store.
	EndOfLog int64 `json:"end_of_log"`
	// Probes are leftover probe objects of the S3 store (Repair).
	Probes []string `json:"probes,omitempty"`
}

// Healthy reports whether check found no damage.
func (r *Report) Healthy() bool { return r.count(Damage) == 0 }

// DamagedKeys lists the data keys with damage, ascending.
func (r *Report) DamagedKeys() []int64 {
	seen := map[int64]bool{}
	var keys []int64
	for _, f := range r.Findings {
		if f.Severity == Damage && f.Key >= 0 && !seen[f.Key] {
			seen[f.Key] = true
			keys = append(keys, f.Key)
		}
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	return keys
}

func (r *Report) count(s Severity) int {
	n := 0
	for _, f := range r.Findings {
		if f.Severity == s {
			n++
		}
	}
	return n
}

func (r *Report) add(s Severity, key int64, object, format string, args ...any) {
	r.Findings = append(r.Findings, Finding{Severity: s, Key: key, Object: object, Message: fmt.Sprintf(format, args...)})
}

// WriteText prints the report for a person: findings by severity, then a
// summary line.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	for _, s := range []Severity{Damage, Warning, Note} {
		for _, f := range r.Findings {
			if f.Severity != s {
				continue
			}
			fmt.Fprintf(&b, "%-7s ", strings.ToUpper(string(s)))
			if f.Key >= 0 {
				fmt.Fprintf(&b, "key %d: ", f.Key)
			} else if f.Object != "" {
				fmt.Fprintf(&b, "%s: ", f.Object)
			}
			fmt.Fprintln(&b, f.Message)
		}
	}
	fmt.Fprintf(&b, "checked %d data objects, %d checkpoints, %d replays over %d keys; end of log at key %d\n",
		r.DataObjects, r.Checkpoints, r.Replays, r.ReplayedKeys, r.EndOfLog)
	if r.Healthy() {
		fmt.Fprintf(&b, "healthy: no damage found (%d warnings)\n", r.count(Warning))
	} else {
		keys := r.DamagedKeys()
		fmt.Fprintf(&b, "DAMAGED: %d problem(s)", r.count(Damage))
		if len(keys) > 0 {
			fmt.Fprintf(&b, "; damaged keys: %s", joinKeys(keys))
		}
		fmt.Fprintln(&b)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func joinKeys(keys []int64) string {
	s := make([]string, len(keys))
	for i, k := range keys {
		s[i] = fmt.Sprint(k)
	}
	return strings.Join(s, " ")
}

// object is what check knows about one data key. The item list
// (hdr.Parsed) is kept only for keys a replay needs (see keepItems); end
// and gen are what the per-object checks need of it.
type object struct {
	size int64
	hdr  volume.Header
	end  int64  // the object's length its items imply
	gen  uint64 // the highest generation among its items
}

// replayFromZeroMax bounds the keys below the delete floor whose item
// lists check keeps to replay from key 0 (young volumes whose first keys
// were never collected); past it only the checkpoints are replayed, and
// check's memory stays bounded by the keys between the checkpoints.
const replayFromZeroMax = 1 << 14

// keepItems reports whether a replay may need key's item list: keys from
// the oldest checkpoint on, and on young volumes the keys below it.
func (c *checker) keepItems(key int64) bool {
	return key >= c.floor || c.floor <= replayFromZeroMax
}

// checker carries one run of Check.
type checker struct {
	objs   *objproxy.Proxy
	o      CheckOptions
	r      *Report
	l      *listing
	sb     volume.Superblock
	sbOK   bool
	layout chunk.Layout
	size   int64
	latest uint64
	lease  LeaseInfo
	obj    map[int64]*object
	// windows are the claim windows [start, end) by start key.
	windows [][2]int64
	// floor and newest are the watermarks of the oldest and the newest
	// checkpoint listed (0 without checkpoints).
	floor, newest int64
}

// Check reads every record of the volume and verifies the rules of
// docs/ARCHITECTURE.md §3–§8 without changing anything:
//
//   - the superblock decodes and agrees with the attach records and lease;
//   - every data object's header parses, and its size is what its items
//     need (a truncated object is named);
//   - from the delete floor, keys are contiguous up to the end of the log,
//     gaps only inside claim windows; keys past the end are orphans;
//   - every checkpoint decodes, and each agrees with a replay from the one
//     before it (or from key 0 when no key below it was collected);
//   - the state the next attach recovers (the newest usable checkpoint
//     rolled forward to the end of the log) maps every block to an object
//     that holds it.
//
// Findings name the keys and objects concerned. An error is returned only
// when the bucket cannot be read.
func Check(ctx context.Context, objs *objproxy.Proxy, o CheckOptions) (*Report, error) {
	if o.Concurrency <= 0 {
		o.Concurrency = 32
	}
	if o.Progress == nil {
		o.Progress = func(string, int64, int64) {}
	}
	c := &checker{objs: objs, o: o, r: &Report{}, obj: make(map[int64]*object)}
	var err error
	if c.l, err = list(ctx, objs); err != nil {
		return nil, err
	}
	if err := c.checkRecords(ctx); err != nil {
		return nil, err
	}
	if !usable(c.layout, c.size) {
		c.r.add(Damage, -1, "", "no usable geometry (block size %d, chunk size %d, size %d): the data objects and checkpoints cannot be checked", c.layout.BlockSize, c.layout.ChunkSize, c.size)
		return c.r, nil
	}
	if err := c.readHeaders(ctx); err != nil {
		return nil, err
	}
	c.checkObjects()
	c.checkContiguity()
	if err := c.checkCheckpoints(ctx); err != nil {
		return nil, err
	}
	c.r.Probes = c.l.probes
	if len(c.l.probes) > 0 {
		c.r.add(Note, -1, "", "%d probe object(s) left by interrupted starts, e.g. %q (bs3 check --repair removes those older than an hour)", len(c.l.probes), c.l.probes[0])
	}
	if n := len(c.l.unknown); n > 0 {
		c.r.add(Note, -1, "", "%d object(s) under the volume's prefix that bs3 does not write, e.g. %q; left alone", n, c.l.unknown[0])
	}
	return c.r, nil
}

// checkRecords checks the superblock, attach records and lease.
func (c *checker) checkRecords(ctx context.Context) error {
	sb, ok, derr, err := readSuperblock(ctx, c.objs)
	if err != nil {
		return err
	}
	hasData := len(c.l.keys) > 0 || len(c.l.checkpoints) > 0
	switch {
	case !ok && hasData:
		c.r.add(Damage, -1, store.SuperblockName, "missing, but the bucket holds volume data: bs3 refuses to attach; restore the superblock object (from a backup or an older object version)")
	case !ok:
		c.r.add(Note, -1, "", "no superblock and no volume data: the volume has not been created yet")
	case derr != nil:
		c.r.add(Damage, -1, store.SuperblockName, "%v", derr)
	default:
		c.sb, c.sbOK = sb, true
		switch {
		case sb.BlockSize != 512 && sb.BlockSize != 4096:
			c.r.add(Damage, -1, store.SuperblockName, "block size %d is neither 512 nor 4096", sb.BlockSize)
			c.sbOK = false
		case sb.ChunkSize <= 0 || sb.ChunkSize%sb.BlockSize != 0:
			c.r.add(Damage, -1, store.SuperblockName, "chunk size %d is not a positive multiple of the block size %d", sb.ChunkSize, sb.BlockSize)
			c.sbOK = false
		case sb.Size <= 0 || sb.Size%sb.BlockSize != 0:
			c.r.add(Damage, -1, store.SuperblockName, "size %d is not a positive multiple of the block size %d", sb.Size, sb.BlockSize)
			c.sbOK = false
		}
		if sb.VolumeID == "" {
			c.r.add(Damage, -1, store.SuperblockName, "has no volume id")
		}
	}
	c.layout, c.size = layoutOf(c.sb, c.sbOK, c.o.Fallback)
	if !c.sbOK && ok {
		c.r.add(Warning, -1, "", "objects are checked with the configured geometry (block size %d, chunk size %d, size %d) instead of the superblock's", c.layout.BlockSize, c.layout.ChunkSize, c.size)
	}
	c.latest = latestGeneration(c.l, c.sb)
	for _, name := range c.l.attach {
		g, okName := store.ParseAttachName(name)
		if !okName {
			c.r.add(Note, -1, name, "not an attach record name; ignored by bs3")
			continue
		}
		raw, err := volume.ReadSmall(ctx, c.objs, name)
		if errors.Is(err, store.ErrNotFound) {
			continue // pruned by an attach meanwhile
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", name, err)
		}
		rec, err := volume.DecodeAttachRecord(raw)
		switch {
		case err != nil:
			// The name is what counts (§3); the body is for people.
			c.r.add(Warning, -1, name, "%v (only its name counts, so the volume is unaffected)", err)
		case rec.Generation != g:
			c.r.add(Warning, -1, name, "says generation %d, its name says %d (only the name counts)", rec.Generation, g)
		case c.sbOK && rec.VolumeID != c.sb.VolumeID:
			c.r.add(Damage, -1, name, "belongs to volume %s, the superblock says %s: two volumes share this bucket prefix", rec.VolumeID, c.sb.VolumeID)
		}
	}
	if c.lease, err = readLease(ctx, c.objs); err != nil {
		return err
	}
	switch {
	case c.lease.Present && !c.lease.Readable:
		c.r.add(Warning, -1, volume.LeaseName, "unreadable; the next attach treats the holder as possibly alive and waits for it")
	case c.lease.Present && c.sbOK && c.lease.VolumeID != c.sb.VolumeID:
		c.r.add(Damage, -1, volume.LeaseName, "belongs to volume %s, the superblock says %s: two volumes share this bucket prefix", c.lease.VolumeID, c.sb.VolumeID)
	case c.lease.Present && c.lease.Generation > c.latest:
		c.r.add(Damage, -1, volume.LeaseName, "has generation %d, above every attach record (%d)", c.lease.Generation, c.latest)
	}
	if n := len(c.l.checkpoints); n > 0 {
		c.floor, _ = volume.ParseCheckpointName(c.l.checkpoints[0])
		c.newest, _ = volume.ParseCheckpointName(c.l.checkpoints[n-1])
	}
	return nil
}

// readHeaders reads the header of every listed data object.
func (c *checker) readHeaders(ctx context.Context) error {
	keys := c.l.keys
	total := int64(len(keys))
	c.r.DataObjects = total
	devSectors := uint64(c.size / chunk.SectorSize)
	var mu sync.Mutex
	var firstErr error
	var done int64
	sem := make(chan struct{}, c.o.Concurrency)
	var wg sync.WaitGroup
	for _, k := range keys {
		size := c.l.data[k]
		if size == 0 {
			mu.Lock()
			c.obj[k] = &object{size: 0, hdr: volume.Header{Kind: volume.KeyPlaceholder}}
			done++
			mu.Unlock()
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			h, err := volume.ReadHeader(ctx, c.objs, objproxy.Low, c.layout, devSectors, k)
			if err == nil && h.Kind == volume.KeyChunk && h.Err == nil && size != h.Parsed.End {
				// A compressed object is listed with its stored size;
				// its own size is in its header (docs/ARCHITECTURE.md
				// §19.4). Asked only when the sizes differ.
				if logical, serr := c.objs.Size(ctx, objproxy.Low, store.DataName(k)); serr == nil {
					size = logical
				} else if !errors.Is(serr, store.ErrNotFound) {
					err = fmt.Errorf("size of key %d: %w", k, serr)
				}
			}
			o := &object{size: size, hdr: h, end: h.Parsed.End, gen: volume.ItemsGeneration(h.Parsed)}
			if !c.keepItems(k) {
				o.hdr.Parsed = chunk.Parsed{}
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			c.obj[k] = o
			done++
			c.o.Progress("headers", done, total)
		}()
		mu.Lock()
		stop := firstErr != nil
		mu.Unlock()
		if stop {
			break
		}
	}
	wg.Wait()
	c.o.Progress("headers", total, total)
	if firstErr != nil {
		return firstErr
	}
	for _, k := range keys {
		o := c.obj[k]
		if o.hdr.Kind == volume.KeyClaim && o.hdr.Err == nil {
			c.windows = append(c.windows, [2]int64{k + 1, o.hdr.Claim.End})
		}
	}
	return nil
}

// inWindow reports whether key lies inside a claim window (after its
// claim record), where whatever is stored counts as a placeholder.
func (c *checker) inWindow(key int64) bool {
	for _, w := range c.windows {
		if key >= w[0] && key < w[1] {
			return true
		}
	}
	return false
}

// checkObjects checks each object on its own: header, size, generation.
func (c *checker) checkObjects() {
	for _, k := range c.l.keys {
		o := c.obj[k]
		name := store.DataName(k)
		sev := Damage
		where := ""
		if c.inWindow(k) {
			// Roll-forward never reads it (§6.4): an orphan of a
			// crashed or fenced writer, reclaimed by dead GC.
			sev, where = Warning, " (inside a claim window: recovery ignores it and dead GC empties it)"
		}
		h := o.hdr
		switch {
		case h.Kind == volume.KeyMissing:
			c.r.add(Warning, k, name, "listed but gone when read (deleted meanwhile by dead GC?)")
		case h.Kind == volume.KeyPlaceholder:
		case h.Kind == volume.KeyClaim && h.Err != nil:
			c.r.add(Damage, k, name, "claim record: %v; recovery refuses to attach past it", h.Err)
		case h.Kind == volume.KeyClaim:
			if h.Claim.Generation > c.latest {
				c.r.add(Damage, k, name, "claim record of generation %d, above every attach record (%d)", h.Claim.Generation, c.latest)
			}
		case h.Err != nil:
			c.r.add(sev, k, name, "%v%s", h.Err, where)
		default:
			// Commit uploads exactly the metadata area and the items'
			// data (§3), so the size is known from the header.
			end := o.end
			switch {
			case o.size < end:
				c.r.add(sev, k, name, "truncated: %d bytes, its items need %d%s", o.size, end, where)
			case o.size > end:
				c.r.add(sev, k, name, "%d bytes, but its items end at %d (trailing bytes: damaged or not a bs3 chunk)%s", o.size, end, where)
			}
			if g := o.gen; g > c.latest {
				c.r.add(sev, k, name, "holds writes of generation %d, above every attach record (%d)%s", g, c.latest, where)
			}
		}
	}
}

// claimWindowLen is how far past the end of the log a crashed writer may
// have stored keys: the claim window of the next attach (§6.5).
func (c *checker) claimWindowLen() int64 {
	return 2*max(c.sb.MaxInflight, 64) + 16
}

// checkContiguity walks the keys from the delete floor: every key must
// exist or lie in a claim window up to the end of the log (§6.3, §6.4).
func (c *checker) checkContiguity() {
	key := c.floor
	for {
		if _, ok := c.obj[key]; ok || c.inWindow(key) {
			key++
			continue
		}
		break
	}
	c.r.EndOfLog = key
	var past []int64
	claimPast := false
	for _, k := range c.l.keys {
		if k > key && !c.inWindow(k) {
			past = append(past, k)
			if c.obj[k].hdr.Kind == volume.KeyClaim {
				claimPast = true
			}
		}
	}
	newest := c.newest
	if newest > key {
		c.r.add(Damage, key, store.DataName(key), "missing, below the watermark %d of the newest checkpoint: keys from the delete floor %d on must all exist (as data or placeholders); the next attach would stop here", newest, c.floor)
	}
	if len(past) == 0 {
		return
	}
	last := past[len(past)-1]
	cleanStop := c.lease.Present && c.lease.Readable && c.lease.Released && c.lease.Generation >= c.latest
	switch {
	case newest > key:
	case claimPast:
		c.r.add(Damage, key, store.DataName(key), "missing, but an attach claimed keys after it: the log has a hole; %d key(s) up to %d exist past it", len(past), last)
	case cleanStop:
		c.r.add(Damage, key, store.DataName(key), "missing, but %d key(s) up to %d exist past it although the last daemon stopped cleanly: those keys would be ignored by the next attach", len(past), last)
	case last-key > c.claimWindowLen():
		c.r.add(Damage, key, store.DataName(key), "missing, and %d key(s) exist past it up to %d, farther than any writer keeps in flight (%d): the log has a hole", len(past), last, c.claimWindowLen())
	default:
		c.r.add(Warning, key, store.DataName(key), "end of the log, with %d key(s) past it up to %d: uploads in flight of the attached daemon, or orphans of a crash that the next attach claims and ignores", len(past), last)
	}
}

// checkCheckpoints decodes every checkpoint and replays between them.
func (c *checker) checkCheckpoints(ctx context.Context) error {
	type ckpt struct {
		name string
		wm   int64
		m    *extentmap.Map
	}
	var good []ckpt
	c.r.Checkpoints = len(c.l.checkpoints)
	for _, name := range c.l.checkpoints {
		wm, ok := volume.ParseCheckpointName(name)
		if !ok {
			c.r.add(Note, -1, name, "not a checkpoint name; ignored by bs3")
			continue
		}
		raw, err := volume.ReadSmall(ctx, c.objs, name)
		if errors.Is(err, store.ErrNotFound) {
			c.r.add(Warning, -1, name, "deleted while listed (a newer checkpoint replaced it)")
			continue
		}
		if errors.Is(err, store.ErrCorrupt) {
			c.r.add(Damage, -1, name, "unusable: %v (recovery falls back to the previous checkpoint)", err)
			continue
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", name, err)
		}
		h, m, err := volume.LoadCheckpoint(name, raw, c.layout.BlockSize)
		switch {
		case err != nil:
			c.r.add(Damage, -1, name, "unusable: %v (recovery falls back to the previous checkpoint)", err)
			continue
		case h.Generation > c.latest:
			c.r.add(Damage, -1, name, "written by generation %d, above every attach record (%d)", h.Generation, c.latest)
			continue
		}
		good = append(good, ckpt{name: name, wm: wm, m: m})
	}
	if len(good) > 0 && good[0].wm <= replayFromZeroMax && c.replayable(0, good[0].wm) {
		// From key 0 when nothing below the oldest checkpoint was
		// collected.
		m, err := extentmap.New(c.size / c.layout.BlockSize)
		if err != nil {
			return fmt.Errorf("new extent map: %w", err)
		}
		c.replayCompare(m, 0, good[0].wm, "key 0", good[0].name, good[0].m)
	}
	for i := 1; i < len(good); i++ {
		a, b := good[i-1], good[i]
		if !c.replayable(a.wm, b.wm) {
			continue // the missing keys are reported by checkContiguity
		}
		c.replayCompare(a.m, a.wm, b.wm, a.name, b.name, b.m)
		c.o.Progress("replay", int64(i), int64(len(good)-1))
	}

	// What the next attach recovers (§6.3, §6.4): the newest usable
	// checkpoint, or key 0 when it may start there, rolled forward to the
	// end of the log. Every block it maps must be readable.
	var m *extentmap.Map
	from, name := int64(0), "key 0"
	switch {
	case len(good) > 0:
		last := good[len(good)-1]
		m, from, name = last.m, last.wm, last.name
	case c.floor <= replayFromZeroMax:
		var err error
		if m, err = extentmap.New(c.size / c.layout.BlockSize); err != nil {
			return fmt.Errorf("new extent map: %w", err)
		}
	default:
		return nil // no usable checkpoint: reported above
	}
	if m.Blocks() < c.size/c.layout.BlockSize {
		if err := m.Grow(c.size / c.layout.BlockSize); err != nil {
			c.r.add(Damage, -1, name, "cannot grow its map to the device: %v", err)
			return nil
		}
	}
	if from > c.r.EndOfLog || !c.replayable(from, c.r.EndOfLog) {
		return nil // reported by checkContiguity
	}
	c.r.Replays++
	if _, ok := c.replay(m, from, c.r.EndOfLog, name, name); ok {
		c.checkMapped(m, fmt.Sprintf("the state recovered from %s and keys %d to %d", name, from, c.r.EndOfLog))
	}
	return nil
}

// checkMapped checks that every block m maps to data is inside an object
// that holds it.
func (c *checker) checkMapped(m *extentmap.Map, what string) {
	// A chunk's data starts where its header says: compact chunks have a
	// shorter metadata area (docs/ARCHITECTURE.md §3).
	bs := c.layout.BlockSize
	type miss struct {
		blocks, first int64
		why           string
		sev           Severity
	}
	bad := map[int64]*miss{}
	var order []int64
	m.Scan(0, m.Blocks(), func(e extentmap.Extent, _ uint64) bool {
		if e.Zero || e.Key < 0 {
			return true
		}
		o := c.obj[e.Key]
		why, sev := "", Damage
		switch {
		case o == nil:
			why = "is missing"
		case o.hdr.Kind == volume.KeyPlaceholder && o.size > 0:
			why, sev = "was emptied while check ran (dead GC beside a running daemon?)", Warning
		case o.hdr.Kind == volume.KeyMissing:
			why, sev = "was deleted while check ran (dead GC beside a running daemon?)", Warning
		case o.hdr.Kind != volume.KeyChunk:
			why = "holds no data (a placeholder or claim record)"
		case o.hdr.Err == nil && o.size < o.hdr.Parsed.DataStart+(e.Off+e.N)*bs:
			why = fmt.Sprintf("is %d bytes, too short for the mapped blocks %d to %d of it", o.size, e.Off, e.Off+e.N-1)
		}
		if why == "" {
			return true
		}
		b := bad[e.Key]
		if b == nil {
			b = &miss{first: e.Block, why: why, sev: sev}
			bad[e.Key] = b
			order = append(order, e.Key)
		}
		b.blocks += e.N
		return true
	})
	for _, k := range order {
		b := bad[k]
		c.r.add(b.sev, k, store.DataName(k), "%s, but %s maps %d block(s) to it (first device block %d): those blocks cannot be read", b.why, what, b.blocks, b.first)
	}
}

// replayable reports whether every key of [from, to) exists or lies in a
// claim window.
func (c *checker) replayable(from, to int64) bool {
	for k := from; k < to; k++ {
		if _, ok := c.obj[k]; !ok && !c.inWindow(k) {
			return false
		}
	}
	return true
}

// replayCompare applies keys [from, to) to m (the state at from) as
// roll-forward does and compares the result with want, the checkpoint at
// to. m is consumed.
func (c *checker) replayCompare(m *extentmap.Map, from, to int64, fromName, wantName string, want *extentmap.Map) {
	c.r.Replays++
	if m.Blocks() < want.Blocks() {
		if err := m.Grow(want.Blocks()); err != nil {
			c.r.add(Damage, -1, wantName, "cannot replay from %s: %v", fromName, err)
			return
		}
	}
	emptied, ok := c.replay(m, from, to, fromName, wantName)
	if !ok {
		return
	}
	// Keys that are placeholders now but held data when want was written
	// (dead GC emptied them since): blocks want maps to them cannot be
	// compared.
	for k := from; k < to; k++ {
		_, wantTotal, tracked := want.Live(k)
		_, gotTotal, _ := m.Live(k)
		switch {
		case !tracked:
			c.r.add(Damage, -1, wantName, "does not track key %d, which a replay from %s applies", k, fromName)
		case gotTotal > 0 && wantTotal != gotTotal:
			c.r.add(Damage, -1, wantName, "says key %d holds %d blocks, the object holds %d", k, wantTotal, gotTotal)
		case gotTotal == 0 && wantTotal > 0:
			emptied[k] = true
		}
	}
	c.compareEntries(m, want, fromName, wantName, emptied)
}

// replay applies keys [from, to) to m as roll-forward does (§6.4). It
// reports false, with a finding on what, when it cannot: a damaged
// object on the way. The returned set is for the caller to fill.
func (c *checker) replay(m *extentmap.Map, from, to int64, fromName, what string) (map[int64]bool, bool) {
	for k := from; k < to; k++ {
		c.r.ReplayedKeys++
		o := c.obj[k]
		var p chunk.Parsed
		switch {
		case c.inWindow(k) || o == nil || o.hdr.Kind != volume.KeyChunk:
			// A placeholder, a claim record, or anything inside a claim
			// window (replayable let missing keys through only there):
			// tracked with no blocks.
		case o.hdr.Err != nil:
			c.r.add(Damage, -1, what, "cannot be verified: the replay from %s stops at damaged key %d", fromName, k)
			return nil, false
		default:
			p = o.hdr.Parsed
		}
		if err := volume.ApplyChunk(m, c.layout, k, p); err != nil {
			c.r.add(Damage, k, store.DataName(k), "replay from %s: %v", fromName, err)
			return nil, false
		}
	}
	return map[int64]bool{}, true
}

// compareEntries compares every block's entry of got (a replay) with want
// (a checkpoint), window by window, and reports the first differences.
func (c *checker) compareEntries(got, want *extentmap.Map, fromName, wantName string, emptied map[int64]bool) {
	type entry struct {
		key, off int64
		seq      uint64
		zero     bool
		set      bool
	}
	const step = 1 << 16
	blocks := want.Blocks()
	fill := func(m *extentmap.Map, from int64, dst []entry) {
		clear(dst)
		m.Scan(from, int64(len(dst)), func(e extentmap.Extent, seq uint64) bool {
			for i := int64(0); i < e.N; i++ {
				off := e.Off
				if !e.Zero {
					off += i
				}
				dst[e.Block-from+i] = entry{key: e.Key, off: off, seq: seq, zero: e.Zero, set: true}
			}
			return true
		})
	}
	a := make([]entry, step)
	b := make([]entry, step)
	reported := 0
	for from := int64(0); from < blocks; from += step {
		n := min(step, blocks-from)
		fill(got, from, a[:n])
		fill(want, from, b[:n])
		for i := range n {
			if a[i] == b[i] || (b[i].set && emptied[b[i].key]) {
				continue
			}
			if reported < 5 {
				c.r.add(Damage, -1, wantName, "disagrees with a replay from %s at block %d: checkpoint %s, replay %s",
					fromName, from+i, describe(b[i].set, b[i].key, b[i].off, b[i].seq, b[i].zero), describe(a[i].set, a[i].key, a[i].off, a[i].seq, a[i].zero))
			}
			reported++
		}
		c.o.Progress("compare", from+n, blocks)
	}
	if reported > 5 {
		c.r.add(Damage, -1, wantName, "disagrees with the replay from %s at %d more blocks", fromName, reported-5)
	}
}

func describe(set bool, key, off int64, seq uint64, zero bool) string {
	switch {
	case !set:
		return "unwritten"
	case zero:
		return fmt.Sprintf("zeros by key %d (seqno %#x)", key, seq)
	}
	return fmt.Sprintf("key %d block %d (seqno %#x)", key, off, seq)
}
