package cache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/bs3/bs3/internal/crc32c"
)

// The disk tier is a log of segment files per volume,
// dir/<volume id>/<sequence>.seg, each a run of window records appended
// by one background goroutine, so that it survives a restart and a fast
// cold read can keep up with it: one append per window, no file created,
// renamed or removed per window (one file per window managed ~1,800
// windows/s on ext4, far behind a cold read; docs/ARCHITECTURE.md §1).
// Records are staged per segment and written in 1 MiB O_DIRECT writes
// (see flush). Space is freed a whole segment at a time, oldest first; a
// window read from the oldest quarter of the segments while the tier is
// three quarters full is appended again, so what is used stays. A restart
// rebuilds the index from each segment's index file (see writeIndex), or
// by reading each record's header where there is none.
//
// Nothing on disk is trusted: before a window is served, its record must
// name the same volume, key, window and window size, and the CRC32C of
// the header and of every 4 KiB block must match; otherwise the record is
// dropped from the index and the window fetched again. Record layout
// (little-endian):
//
//	magic "BS3CWIN1" | window size u32 | length u32 | key i64 | window i64
//	| id length u16 | volume id | CRC32C per 4 KiB block of data (u32 each)
//	| CRC32C of everything before it (u32) | data (length bytes)
//
// An encrypted volume's records (a Sealer is set) hold no plaintext and no
// CRC: the AEAD tag authenticates everything (docs/ARCHITECTURE.md §16.5):
//
//	magic "BS3CENC1" | window size u32 | length u32 | key i64 | window i64
//	| id length u16 | volume id | sealed data (Sealer.Seal of the window,
//	with everything before it as associated data)
//
// so a record whose header was edited, that was copied over another key's,
// window's or volume's, or was written under another data key or volume
// fails to open and is dropped like a damaged one. Each tier reads only its
// own magic: a plaintext record is never served by an encrypted tier, nor
// the reverse.
//
// A record enters the index only after the write of its stage returned,
// so a reader never sees half of one; a crash leaves at most a torn record at the end
// of a segment, which the restart's scan stops at. A full queue drops the
// write (it is only a cache). Each volume directory is flock'ed by the
// process using it, so two daemons sharing cache.dir never append to or
// trim each other's segments.

const (
	diskMagic   = "BS3CWIN1"
	sealedMagic = "BS3CENC1"
	crcBlock    = 4 << 10
	// minDiskQueue is the fewest windows the write queue holds (New sizes
	// it to an eighth of the memory bound).
	minDiskQueue = 256
	segSuffix    = ".seg"
	tmpPrefix    = ".tmp-" // temporary files (index files, and the one-file-per-window format's)
	// segSlack is the bytes counted per segment beyond its size (inode,
	// directory entry, the partly used last block).
	segSlack = 4 << 10
	// Segments are a sixteenth of the limit, so that freeing the oldest
	// gives back little of what is cached, within these bounds.
	minSegment = 256 << 10
	maxSegment = 64 << 20
	maxIDLen   = 64
	// directAlign is the alignment of O_DIRECT writes (offset, length and
	// buffer address): the file systems' 4 KiB blocks.
	directAlign = 4 << 10
	// stageSize is the most a segment's stage gathers before it is
	// written: O_DIRECT writes of 1 MiB ran at 1.3 GB/s on the test VM,
	// of 64 KiB at 0.4 GB/s, and buffered writes at 0.3-0.5 GB/s.
	stageSize = 1 << 20
)

// directIO opens segments for O_DIRECT appends (a test turns it off to
// check the buffered fallback used where the file system refuses it).
var directIO = true

// diskIDRe is the volume ids whose windows go to disk: the 32 hex digits
// bs3 generates. Anything else (a hand-edited superblock, the "unknown"
// fallback) could name another volume's directory, so it is kept in
// memory only.
var diskIDRe = regexp.MustCompile(`^[0-9a-f]{16,64}$`)

var segNameRe = regexp.MustCompile(`^([0-9a-f]{16})\.seg$`)

// idxNameRe is a segment's index file (see writeIndex).
var idxNameRe = regexp.MustCompile(`^([0-9a-f]{16})\.idx$`)

// oldWindowRe is a file of the former one-file-per-window format.
var oldWindowRe = regexp.MustCompile(`^[0-9a-f]{16}-[0-9a-f]+$`)

type diskTier struct {
	dir     string
	limit   int64
	win     int64
	segSize int64
	seal    Sealer // nil: plaintext records with CRC32C
	log     zerolog.Logger
	// release drops a queued write's reference on its memory entry.
	release func(*entry)
	// sealScratch is the writer's buffer for sealing a record.
	sealScratch []byte
	// buffer and recycle take and give back window buffers of the memory
	// tier's pool: a window read from disk is loaded into one.
	buffer  func(n int) []byte
	recycle func([]byte)

	mu      sync.Mutex
	used    int64
	segs    []*segment          // oldest first: the order space is freed in
	index   map[Key]recordLoc   // the newest good record of each window
	open    map[string]*segment // per volume: the segment appended to
	locks   map[string]*os.File // per volume: the flock'ed directory
	refused map[string]bool     // volume directories another process holds
	nextSeq uint64
	shut    bool         // closed: every lookup misses
	pending map[Key]bool // queued or staged, not yet indexed: not queued again

	qmu    sync.RWMutex // guards closed against sends on a closed queue
	closed bool
	queue  chan diskWrite
	done   chan struct{}

	hits, dropped, written, evicted, writeErrors atomic.Int64
	scanned                                      atomic.Int64 // records whose header a start-up scan read
}

// segment is one file of the log. size and f are the writer's (and
// openDisk's); refs, dead and live are guarded by diskTier.mu.
type segment struct {
	seq  uint64
	vol  string
	rel  string
	f    *os.File
	size int64
	keys []Key // records indexed in it, in order
	live int   // of keys, how many the index still points to here
	refs int   // reads between their lookup and the end of their ReadAt
	dead bool  // removed: close f when refs drops to 0
	// appending: created by this process and not yet retired; only the
	// writer removes such a segment (readers may remove others whose
	// records all failed).
	appending bool
	hasIdx    bool // an index file was found for it at start-up

	// The writer's side, while the segment takes appends (see stage).
	df       *os.File // O_DIRECT where the file system allows, else f
	stage    []byte   // block-aligned: the bytes from stageOff to size
	stageOff int64    // a multiple of directAlign
	staged   []stagedRecord
}

// stagedRecord is a record copied into its segment's stage, indexed once
// the stage is written.
type stagedRecord struct {
	k         Key
	off, size int64
}

type recordLoc struct {
	seg       *segment
	off, size int64
}

type diskWrite struct {
	k    Key
	data []byte
	// e, when set, is the memory entry data belongs to: the write holds
	// a reference on it until it is staged or dropped (pool.go).
	e       *entry
	refresh bool          // append again even though indexed (an old hit)
	sync    chan struct{} // a marker: closed when reached, nothing written
}

// openDisk indexes the segments already in dir (each volume directory it
// can lock), removes files of the former format and temporary files left
// by a crash, trims the tier to limit and starts the writer.
func openDisk(dir string, limit, win int64, queue int, seal Sealer, log zerolog.Logger) (*diskTier, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create the cache directory %s: %w", dir, err)
	}
	d := &diskTier{dir: dir, limit: limit, win: win, seal: seal, log: log,
		segSize: min(max(limit/16, minSegment), maxSegment),
		index:   make(map[Key]recordLoc), open: make(map[string]*segment), pending: make(map[Key]bool),
		locks: make(map[string]*os.File), refused: make(map[string]bool),
		queue: make(chan diskWrite, max(queue, minDiskQueue)), done: make(chan struct{}),
		// Until a Cache hands it its pool: plain allocations.
		buffer:  func(n int) []byte { return make([]byte, n, win) },
		recycle: func([]byte) {}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("index the cache directory %s: %w", dir, err)
	}
	var found []*segment
	for _, e := range ents {
		if !e.IsDir() || !diskIDRe.MatchString(e.Name()) {
			continue
		}
		segs, err := d.openVolumeDir(e.Name())
		if err != nil {
			d.closeFiles(found)
			d.unlockAll()
			return nil, err
		}
		found = append(found, segs...)
	}
	sort.Slice(found, func(i, j int) bool { return found[i].seq < found[j].seq })
	d.mu.Lock()
	for _, s := range found {
		d.nextSeq = max(d.nextSeq, s.seq+1)
		if !s.hasIdx || !d.loadIndex(s) {
			d.scan(s)
		}
		if s.live == 0 {
			d.removeFile(s)
			continue
		}
		d.segs = append(d.segs, s)
		d.used += s.size + segSlack
	}
	for d.used > d.limit && len(d.segs) > 0 {
		d.evictOldestLocked()
	}
	records := len(d.index)
	d.mu.Unlock()
	log.Debug().Str("dir", dir).Int("segments", len(d.segs)).Int("windows", records).Int64("bytes", d.used).Msg("read cache directory indexed")
	go d.writer()
	return d, nil
}

// openVolumeDir locks the directory of volume vol and opens its segments;
// a directory another process holds is left alone.
func (d *diskTier) openVolumeDir(vol string) ([]*segment, error) {
	p := filepath.Join(d.dir, vol)
	if ok, err := d.lockVolume(vol); err != nil || !ok {
		return nil, err
	}
	ents, err := os.ReadDir(p)
	if err != nil {
		return nil, fmt.Errorf("index the cache directory %s: %w", p, err)
	}
	var segs []*segment
	old := 0
	idx := make(map[string]bool)
	for _, e := range ents {
		if !e.IsDir() && idxNameRe.MatchString(e.Name()) {
			idx[e.Name()] = true
		}
	}
	for _, e := range ents {
		name := e.Name()
		m := segNameRe.FindStringSubmatch(name)
		if m == nil || e.IsDir() {
			if !e.IsDir() && (oldWindowRe.MatchString(name) || strings.HasPrefix(name, tmpPrefix)) {
				old++
				if err := os.Remove(filepath.Join(p, name)); err != nil {
					d.log.Warn().Str("file", filepath.Join(vol, name)).Err(err).Msg("could not remove a read cache file of the former format")
				}
			}
			continue
		}
		seq, _ := strconv.ParseUint(m[1], 16, 64)
		rel := filepath.Join(vol, name)
		f, err := os.OpenFile(filepath.Join(d.dir, rel), os.O_RDWR, 0)
		if err != nil {
			d.closeFiles(segs)
			return nil, fmt.Errorf("open the read cache segment %s: %w", rel, err)
		}
		idxName := fmt.Sprintf("%016x.idx", seq)
		segs = append(segs, &segment{seq: seq, vol: vol, rel: rel, f: f, hasIdx: idx[idxName]})
		delete(idx, idxName)
	}
	for name := range idx { // of a segment that is gone
		if err := os.Remove(filepath.Join(p, name)); err != nil {
			d.log.Warn().Str("file", filepath.Join(vol, name)).Err(err).Msg("could not remove a stale read cache index")
		}
	}
	if old > 0 {
		d.log.Info().Str("dir", p).Int("files", old).Msg("removed leftover read cache files (the former one-file-per-window format, or temporary files of a crash)")
	}
	return segs, nil
}

// lockVolume takes the flock of volume vol's directory (creating it)
// unless held already; false: another process holds it.
func (d *diskTier) lockVolume(vol string) (bool, error) {
	if d.locks[vol] != nil {
		return true, nil
	}
	if d.refused[vol] {
		return false, nil
	}
	p := filepath.Join(d.dir, vol)
	if err := os.MkdirAll(p, 0o700); err != nil {
		return false, fmt.Errorf("create the cache directory %s: %w", p, err)
	}
	f, err := os.Open(p)
	if err != nil {
		return false, fmt.Errorf("open the cache directory %s: %w", p, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			d.refused[vol] = true
			d.log.Warn().Str("dir", p).Msg("another process uses this read cache directory; this volume's windows stay in memory (give each daemon its own cache.dir)")
			return false, nil
		}
		return false, fmt.Errorf("lock the cache directory %s: %w", p, err)
	}
	d.locks[vol] = f
	return true, nil
}

// scan indexes the records of s, stopping at the first header it cannot
// read (a torn end after a crash, damage, another format); every record
// or tail it cannot use counts as dropped.
func (d *diskTier) scan(s *segment) {
	info, err := s.f.Stat()
	if err != nil {
		d.dropped.Add(1)
		d.log.Warn().Str("file", s.rel).Err(err).Msg("cannot read a read cache segment; dropping it")
		return
	}
	s.size = info.Size()
	buf := make([]byte, headerFixed+maxIDLen+4*((d.win+crcBlock-1)/crcBlock)+4)
	for off := int64(0); off < s.size; {
		n, err := s.f.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			d.dropped.Add(1)
			d.log.Warn().Str("file", s.rel).Int64("offset", off).Err(err).Msg("cannot read a read cache segment; the rest of it is dropped")
			return
		}
		if s.size-off < directAlign && allZero(s.f, off, s.size-off) {
			return // the padding of the last block written
		}
		d.scanned.Add(1)
		k, size, err := d.parseHeader(buf[:n], s.vol)
		if err == nil && off+size > s.size {
			err = fmt.Errorf("record of %d bytes runs past the end of the segment (%d bytes): torn by a crash", size, s.size)
		}
		if err != nil && size == 0 {
			d.dropped.Add(1)
			d.log.Warn().Str("file", s.rel).Int64("offset", off).Err(err).Msg("unreadable record in a read cache segment; the rest of it is dropped")
			return
		}
		if err != nil { // a sound header that is not this tier's: skip it
			d.dropped.Add(1)
			d.log.Warn().Str("file", s.rel).Int64("offset", off).Err(err).Msg("dropping a read cache record that is not this volume's")
		} else {
			d.indexLocked(k, recordLoc{s, off, size})
		}
		off += size
	}
}

// A segment's index file, <sequence>.idx beside it, is written when the
// segment takes no more appends (it is full, or the daemon stops) so that
// a start indexes the segment from it instead of reading the header of
// every record (3.2 s for 2 GiB of 64 KiB windows on the test VM: the
// O_DIRECT appends leave nothing in the page cache). Layout
// (little-endian):
//
//	magic "BS3CIDX1" | segment sequence u64 | segment size i64
//	| window size u32 | sealed u8 (1: an encrypted tier's) | count u32
//	| count × (object key i64, window i64, offset i64, size i64)
//	| CRC32C of everything before it (u32)
//
// It is only a hint: a record it points at is verified against the key
// looked up before it is served, like any other, so an index that lies
// costs a drop and a fetch, never wrong bytes. One that fails its own
// checks (CRC, sequence, window size, tier, a record past the segment's
// end) is ignored and the segment scanned.
const idxMagic = "BS3CIDX1"

func (d *diskTier) sealedFlag() byte {
	if d.seal != nil {
		return 1
	}
	return 0
}

func (d *diskTier) idxPath(s *segment) string {
	return filepath.Join(d.dir, s.vol, fmt.Sprintf("%016x.idx", s.seq))
}

// writeIndex writes s's index file (through a temporary file and a
// rename); a failure only costs a scan at the next start.
func (d *diskTier) writeIndex(s *segment) {
	d.mu.Lock()
	if s.dead {
		d.mu.Unlock()
		return
	}
	le := binary.LittleEndian
	b := append([]byte(nil), idxMagic...)
	b = le.AppendUint64(b, s.seq)
	b = le.AppendUint64(b, uint64(s.size))
	b = le.AppendUint32(b, uint32(d.win))
	b = append(b, d.sealedFlag())
	n := len(b)
	b = le.AppendUint32(b, 0)
	count := 0
	for _, k := range s.keys {
		if loc, ok := d.index[k]; ok && loc.seg == s {
			b = le.AppendUint64(b, uint64(k.Object))
			b = le.AppendUint64(b, uint64(k.Window))
			b = le.AppendUint64(b, uint64(loc.off))
			b = le.AppendUint64(b, uint64(loc.size))
			count++
		}
	}
	d.mu.Unlock()
	le.PutUint32(b[n:], uint32(count))
	b = le.AppendUint32(b, crc32c.Checksum(b))
	p := d.idxPath(s)
	// A temporary name a start removes if a crash leaves it behind.
	tmp := filepath.Join(filepath.Dir(p), tmpPrefix+filepath.Base(p))
	err := os.WriteFile(tmp, b, 0o600)
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		d.log.Debug().Err(err).Str("file", s.rel).Msg("could not write a read cache segment's index; the next start scans the segment")
	}
}

// loadIndex indexes s from its index file; false: the file is unusable
// (and removed), scan the segment.
func (d *diskTier) loadIndex(s *segment) bool {
	p := d.idxPath(s)
	b, err := os.ReadFile(p)
	if err == nil {
		err = d.parseIndex(s, b)
	}
	if err != nil {
		d.log.Warn().Str("file", s.rel).Err(err).Msg("read cache segment index unusable; scanning the segment")
		if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			d.log.Warn().Str("file", s.rel).Err(rerr).Msg("could not remove a read cache segment's index")
		}
		return false
	}
	return true
}

func (d *diskTier) parseIndex(s *segment, b []byte) error {
	le := binary.LittleEndian
	const fixed = 8 + 8 + 8 + 4 + 1 + 4
	if len(b) < fixed+4 || string(b[:8]) != idxMagic {
		return errors.New("not a segment index (bad magic or too short)")
	}
	if crc32c.Checksum(b[:len(b)-4]) != le.Uint32(b[len(b)-4:]) {
		return errors.New("CRC32C mismatch")
	}
	seq, size, win, sealed, count := le.Uint64(b[8:]), int64(le.Uint64(b[16:])), int64(le.Uint32(b[24:])), b[28], int(le.Uint32(b[29:]))
	if win != d.win || sealed != d.sealedFlag() {
		return fmt.Errorf("index of a tier with window size %d, sealed %d: this one has %d, %d", win, sealed, d.win, d.sealedFlag())
	}
	info, err := s.f.Stat()
	if err != nil {
		return err
	}
	if seq != s.seq || size > info.Size() || len(b) != fixed+32*count+4 {
		return fmt.Errorf("index of segment %d, %d bytes, %d records: does not fit segment %d of %d bytes", seq, size, count, s.seq, info.Size())
	}
	keys, locs := make([]Key, count), make([]recordLoc, count)
	for i := range count {
		e := b[fixed+32*i:]
		keys[i] = Key{Volume: s.vol, Object: int64(le.Uint64(e)), Window: int64(le.Uint64(e[8:]))}
		off, n := int64(le.Uint64(e[16:])), int64(le.Uint64(e[24:]))
		if off < 0 || n <= 0 || n > 2*MaxWindow || off+n > size {
			return fmt.Errorf("record %d at %d+%d lies outside the segment", i, off, n)
		}
		locs[i] = recordLoc{seg: s, off: off, size: n}
	}
	s.size = info.Size()
	for i := range keys {
		d.indexLocked(keys[i], locs[i])
	}
	return nil
}

// allZero reports whether the n bytes at off of f are all zero.
func allZero(f *os.File, off, n int64) bool {
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		return false
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// parseHeader reads the header of the record at the start of b, written
// for volume vol. size > 0 with an error: the record's extent is known
// (its header is sound) but it must not be indexed.
func (d *diskTier) parseHeader(b []byte, vol string) (Key, int64, error) {
	le := binary.LittleEndian
	magic := diskMagic
	if d.seal != nil {
		magic = sealedMagic
	}
	if len(b) < headerFixed || string(b[:8]) != magic {
		return Key{}, 0, errors.New("not a record of this tier (bad magic or too short)")
	}
	win, length := int64(le.Uint32(b[8:])), int64(le.Uint32(b[12:]))
	k := Key{Object: int64(le.Uint64(b[16:])), Window: int64(le.Uint64(b[24:]))}
	idLen := int(le.Uint16(b[32:]))
	if length <= 0 || length > MaxWindow || idLen > maxIDLen || len(b) < headerFixed+idLen {
		return Key{}, 0, fmt.Errorf("garbled header: length %d, id length %d", length, idLen)
	}
	k.Volume = string(b[headerFixed : headerFixed+idLen])
	var size int64
	if d.seal != nil {
		size = int64(headerFixed+idLen+d.seal.Overhead()) + length
	} else {
		hdr := headerFixed + idLen + 4*int((length+crcBlock-1)/crcBlock)
		if len(b) < hdr+4 || crc32c.Checksum(b[:hdr]) != le.Uint32(b[hdr:]) {
			return Key{}, 0, errors.New("header CRC32C mismatch")
		}
		size = int64(hdr+4) + length
	}
	if win != d.win || length > win {
		return k, size, fmt.Errorf("window size %d, length %d: written with window size %d", win, length, d.win)
	}
	if k.Volume != vol {
		return k, size, fmt.Errorf("names volume %s, found under %s", k.Volume, vol)
	}
	return k, size, nil
}

// indexLocked points window k at loc, replacing an older record.
func (d *diskTier) indexLocked(k Key, loc recordLoc) {
	loc.seg.keys = append(loc.seg.keys, k)
	loc.seg.live++ // first: replacing a record of the same segment must not empty it
	if old, ok := d.index[k]; ok {
		d.unindexLocked(k, old)
	}
	d.index[k] = loc
}

// unindexLocked removes window k's entry if it still points at loc. A
// segment left with no record in use, and not appended to, is removed.
func (d *diskTier) unindexLocked(k Key, loc recordLoc) {
	if cur, ok := d.index[k]; !ok || cur != loc {
		return
	}
	delete(d.index, k)
	s := loc.seg
	s.live--
	if s.live == 0 && !s.appending && !s.dead {
		d.removeSegmentLocked(s)
	}
}

// get returns the verified window k from disk. A record that fails any
// check is dropped from the index.
func (d *diskTier) get(k Key) (data []byte, old, ok bool) {
	if !diskIDRe.MatchString(k.Volume) {
		return nil, false, false
	}
	d.mu.Lock()
	loc, ok := d.index[k]
	ok = ok && !d.shut
	if ok {
		loc.seg.refs++
		// Close to being freed: the oldest quarter of the segments, with
		// the tier three quarters full (below that nothing is freed soon).
		old = len(d.segs) >= 4 && loc.seg.seq < d.segs[len(d.segs)/4].seq && d.used > d.limit/4*3
	}
	d.mu.Unlock()
	if !ok {
		return nil, false, false
	}
	var err error
	if d.seal != nil {
		data, err = d.readSealed(k, loc)
	} else {
		data, err = d.readPlain(k, loc)
	}
	d.mu.Lock()
	loc.seg.refs--
	if loc.seg.dead && loc.seg.refs == 0 {
		loc.seg.f.Close()
	}
	d.mu.Unlock()
	if err != nil {
		d.drop(k, loc, err)
		return nil, false, false
	}
	d.hits.Add(1)
	return data, old, true
}

// readPlain reads a plaintext record straight into a window buffer (its
// header into a small one, in the same preadv) and checks it. A window
// loaded from disk thus lands in memory the pool reuses: a fresh buffer
// per load cost a zeroing and first-touch page faults that made the
// disk-warm read slower than the copy (docs/ARCHITECTURE.md §1, "Window
// memory").
func (d *diskTier) readPlain(k Key, loc recordLoc) ([]byte, error) {
	n, h, ok := plainSplit(loc.size, len(k.Volume), d.win)
	if !ok {
		return nil, fmt.Errorf("record of %d bytes cannot hold a window of volume %s (window size %d)", loc.size, k.Volume, d.win)
	}
	hdr := make([]byte, h)
	data := d.buffer(int(n))
	if err := preadvFull(loc.seg.f, [][]byte{hdr, data}, loc.off); err != nil {
		d.recycle(data)
		return nil, err
	}
	if err := checkWindow(hdr, data, k, d.win); err != nil {
		d.recycle(data)
		return nil, err
	}
	return data, nil
}

// readSealed reads an encrypted record into a scratch buffer and opens it
// into a window buffer.
func (d *diskTier) readSealed(k Key, loc recordLoc) ([]byte, error) {
	scratch := getScratch(int(loc.size))
	defer putScratch(scratch)
	raw := *scratch
	if _, err := loc.seg.f.ReadAt(raw, loc.off); err != nil {
		return nil, fmt.Errorf("read record: %w", err)
	}
	n := len(raw) - headerFixed - len(k.Volume) - d.seal.Overhead()
	if n <= 0 || int64(n) > d.win {
		return nil, fmt.Errorf("record of %d bytes cannot hold a window of volume %s (window size %d)", loc.size, k.Volume, d.win)
	}
	data := d.buffer(n)
	out, err := openWindow(d.seal, raw, k, d.win, data[:0])
	if err != nil || len(out) != n || &out[0] != &data[0] {
		d.recycle(data)
		if err == nil {
			err = fmt.Errorf("opened %d bytes, not the %d the record holds", len(out), n)
		}
		return nil, err
	}
	return data, nil
}

// plainSplit finds, from a plaintext record's size, the length n of its
// data and the size h of the header before it (fields, volume id, one
// CRC per 4 KiB block and the header's CRC); ok is false when no window
// of at most win bytes makes a record of that size.
func plainSplit(size int64, idLen int, win int64) (n, h int64, ok bool) {
	for nCRC := int64(1); nCRC <= (win+crcBlock-1)/crcBlock; nCRC++ {
		h = int64(headerFixed+idLen) + 4*nCRC + 4
		n = size - h
		if n > (nCRC-1)*crcBlock && n <= min(nCRC*crcBlock, win) {
			return n, h, true
		}
	}
	return 0, 0, false
}

// preadvFull fills bufs from f at off in one preadv (regular files return
// short only at their end, which is an error here: a torn record).
func preadvFull(f *os.File, bufs [][]byte, off int64) error {
	want := 0
	for _, b := range bufs {
		want += len(b)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("read record: %w", err)
	}
	// Control, not Read: RawConn.Read takes the file's read lock, which
	// would let one preadv at a time into a segment. A positioned read
	// needs no lock; concurrent loads are what the disk tier is for.
	var got int
	var rerr error
	if err := rc.Control(func(fd uintptr) {
		for {
			got, rerr = unix.Preadv(int(fd), bufs, off)
			if rerr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return fmt.Errorf("read record: %w", err)
	}
	if rerr != nil {
		return fmt.Errorf("read record: %w", rerr)
	}
	if got != want {
		return fmt.Errorf("read record: %d of %d bytes (torn)", got, want)
	}
	return nil
}

// scratchBufs holds the buffers encrypted records are read into before
// they are opened into a window.
var scratchBufs sync.Pool

func getScratch(n int) *[]byte {
	if v := scratchBufs.Get(); v != nil {
		if p := v.(*[]byte); cap(*p) >= n {
			*p = (*p)[:n]
			return p
		}
	}
	b := make([]byte, n)
	return &b
}

func putScratch(p *[]byte) { scratchBufs.Put(p) }

// contains reports whether window k is indexed (not verified).
func (d *diskTier) contains(k Key) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.index[k]
	return ok
}

// drop forgets a record that cannot be served.
func (d *diskTier) drop(k Key, loc recordLoc, why error) {
	d.dropped.Add(1)
	d.log.Warn().Str("file", loc.seg.rel).Int64("offset", loc.off).Err(why).Msg("dropping a read cache record that fails its checks; the window is fetched again")
	d.mu.Lock()
	d.unindexLocked(k, loc)
	d.mu.Unlock()
}

// evictOldestLocked frees the oldest segment.
func (d *diskTier) evictOldestLocked() {
	s := d.segs[0]
	for _, k := range s.keys {
		if cur, ok := d.index[k]; ok && cur.seg == s {
			delete(d.index, k)
			d.evicted.Add(1)
		}
	}
	s.live = 0
	d.removeSegmentLocked(s)
}

// removeSegmentLocked deletes segment s; its file is closed once no read
// uses it.
func (d *diskTier) removeSegmentLocked(s *segment) {
	for i, x := range d.segs {
		if x == s {
			d.segs = append(d.segs[:i], d.segs[i+1:]...)
			d.used -= s.size + segSlack
			break
		}
	}
	if d.open[s.vol] == s {
		delete(d.open, s.vol)
	}
	if s.appending { // the writer's own: its staged records will not be written
		for _, r := range s.staged {
			delete(d.pending, r.k)
		}
		s.staged = nil
	}
	s.dead = true
	d.removeFile(s)
}

// removeFile unlinks s's file and closes it unless a read is under way.
func (d *diskTier) removeFile(s *segment) {
	if err := os.Remove(filepath.Join(d.dir, s.rel)); err != nil && !errors.Is(err, os.ErrNotExist) {
		d.log.Warn().Str("file", s.rel).Err(err).Msg("could not remove a read cache segment")
	}
	if err := os.Remove(d.idxPath(s)); err != nil && !errors.Is(err, os.ErrNotExist) {
		d.log.Warn().Str("file", s.rel).Err(err).Msg("could not remove a read cache segment's index")
	}
	if s.df != nil && s.df != s.f {
		s.df.Close()
	}
	s.df = nil
	if s.refs == 0 {
		s.f.Close()
	}
}

// put queues window k, the bytes of e, for writing; they must not change
// afterwards. The write holds a reference on e until its bytes are
// staged or it is dropped. False: the queue was full and the write
// skipped.
func (d *diskTier) put(k Key, e *entry) bool {
	if !diskIDRe.MatchString(k.Volume) {
		return true // never on disk: nothing to retry
	}
	e.hold()
	return d.enqueue(diskWrite{k: k, data: e.data, e: e})
}

// finished ends w's hold on its memory entry: its bytes are staged (copied)
// or will never be.
func (d *diskTier) finished(w diskWrite) {
	if w.e != nil && d.release != nil {
		d.release(w.e)
	}
}

// claim marks window k pending unless it is on disk or pending already.
func (d *diskTier) claim(k Key) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.index[k]; ok || d.pending[k] {
		return false
	}
	d.pending[k] = true
	return true
}

func (d *diskTier) unclaim(k Key) {
	d.mu.Lock()
	delete(d.pending, k)
	d.mu.Unlock()
}

// enqueue queues w unless the window is on disk or on its way there
// (a refresh is queued once). A full queue skips it (it is only a cache)
// and returns false.
func (d *diskTier) enqueue(w diskWrite) bool {
	if !w.refresh && !d.claim(w.k) {
		d.finished(w)
		return true
	}
	d.qmu.RLock()
	defer d.qmu.RUnlock()
	if !d.closed {
		select {
		case d.queue <- w:
			return true
		default:
		}
	}
	if !w.refresh {
		d.unclaim(w.k)
	}
	d.finished(w)
	return false
}

// writeWarnEvery spaces the warnings of failing writes: a full disk fails
// every window, thousands a second.
const writeWarnEvery = time.Minute

func (d *diskTier) writer() {
	defer close(d.done)
	var lastWarn time.Time
	failed := 0
	fail := func(err error) {
		if err == nil {
			return
		}
		d.writeErrors.Add(1)
		failed++
		if time.Since(lastWarn) >= writeWarnEvery {
			d.log.Warn().Err(err).Int("failed_writes", failed).Str("dir", d.dir).
				Msg("could not write to the read cache directory (windows are skipped, reads are not affected); check its free space and permissions")
			lastWarn, failed = time.Now(), 0
		}
	}
	for w := range d.queue {
		if w.sync != nil {
			fail(d.flushAll())
			close(w.sync)
			continue
		}
		err := d.write(w)
		d.finished(w) // staged (copied) or dropped: its bytes are not used again
		fail(err)
		if len(d.queue) == 0 { // idle: what is staged goes to disk now
			fail(d.flushAll())
		}
	}
	fail(d.flushAll())
}

// write stages window w.k in its volume's open segment; it reaches the
// disk (and the index) when the stage is full, the queue idle, or at a
// sync. The window stays pending while staged; every path that does not
// stage it clears that. An error from retiring the segment it replaced
// is returned even though the window was staged. Only the writer
// goroutine stages, flushes, rotates and frees segments.
func (d *diskTier) write(w diskWrite) error {
	k := w.k
	unclaim := func() { // a refresh was never claimed
		if !w.refresh {
			d.unclaim(k)
		}
	}
	d.mu.Lock()
	_, indexed := d.index[k]
	d.mu.Unlock()
	if indexed && !w.refresh {
		unclaim()
		return nil // immutable content: already there
	}
	var hdr, data []byte
	if d.seal != nil {
		var err error
		// Sealed into the writer's scratch buffer, reused for every
		// record (write runs on the writer goroutine only): a fresh
		// window-sized buffer per record was zeroed and faulted in.
		if hdr, err = sealWindowTo(d.sealScratch[:0], d.seal, k, d.win, w.data); err != nil {
			unclaim()
			return fmt.Errorf("seal window %d of key %d: %w", k.Window, k.Object, err)
		}
		d.sealScratch = hdr[:0] // grown if it had to be
	} else {
		hdr, data = windowHeader(k, d.win, w.data), w.data
	}
	n := int64(len(hdr) + len(data))
	if n+segSlack > d.limit || n > stageSize/2 {
		unclaim()
		return nil
	}
	d.mu.Lock()
	s, prev, err := d.reserveLocked(k.Volume, n)
	var off int64
	if s != nil {
		off = s.size
		s.size += n
	}
	d.mu.Unlock()
	if prev != nil {
		if rerr := d.retire(prev); err == nil {
			err = rerr
		}
	}
	if s == nil {
		unclaim()
		return err
	}
	if int64(len(s.stage))+n > int64(cap(s.stage)) {
		if err := d.flush(s); err != nil {
			unclaim()
			return err
		}
	}
	s.stage = append(s.stage, hdr...)
	s.stage = append(s.stage, data...)
	s.staged = append(s.staged, stagedRecord{k, off, n})
	return err
}

// flush writes s's stage, whole blocks padded with zeros, and indexes its
// records; the last partial block stays staged, to be written again with
// what follows it. On an error the segment takes no more appends (what
// the file holds past its last good write is unknown).
func (d *diskTier) flush(s *segment) error {
	if len(s.staged) == 0 {
		return nil
	}
	d.mu.Lock()
	dead := s.dead
	d.mu.Unlock()
	end := len(s.stage)
	var err error
	if !dead {
		padded := (end + directAlign - 1) / directAlign * directAlign
		buf := s.stage[:padded]
		clear(buf[end:])
		if _, err = s.df.WriteAt(buf, s.stageOff); err != nil {
			err = fmt.Errorf("append to read cache segment %s: %w", s.rel, err)
		}
	}
	d.mu.Lock()
	for _, r := range s.staged {
		delete(d.pending, r.k)
		if !dead && err == nil {
			d.indexLocked(r.k, recordLoc{s, r.off, r.size})
			d.written.Add(1)
		}
	}
	if err != nil && d.open[s.vol] == s {
		delete(d.open, s.vol)
	}
	d.mu.Unlock()
	s.staged = s.staged[:0]
	tail := end / directAlign * directAlign
	s.stage = s.stage[:copy(s.stage[:cap(s.stage)], s.stage[tail:end])]
	s.stageOff += int64(tail)
	if err != nil {
		if rerr := d.retire(s); rerr != nil {
			d.log.Debug().Err(rerr).Msg("retire a read cache segment after a failed append")
		}
	}
	return err
}

// flushAll flushes the stages of the segments taking appends.
func (d *diskTier) flushAll() error {
	d.mu.Lock()
	open := make([]*segment, 0, len(d.open))
	for _, s := range d.open {
		open = append(open, s)
	}
	d.mu.Unlock()
	var first error
	for _, s := range open {
		if err := d.flush(s); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// retire ends appends to s: its stage is flushed, its index file written
// and its write handle closed; a segment left with no record in use is
// removed.
func (d *diskTier) retire(s *segment) error {
	err := d.flush(s)
	if err == nil {
		d.writeIndex(s)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if s.df != nil && s.df != s.f {
		s.df.Close()
	}
	s.df, s.stage = nil, nil
	s.appending = false
	if s.live == 0 && !s.dead && d.open[s.vol] != s {
		d.removeSegmentLocked(s)
	}
	return err
}

// reserveLocked counts n more bytes against the limit, freeing the oldest
// segments first, and returns the segment to append them to (opening a
// new one when the volume has none or it is full) and the segment it
// replaced, which the caller retires; nil: the volume's directory is
// another process's.
func (d *diskTier) reserveLocked(vol string, n int64) (s, prev *segment, err error) {
	for {
		s = d.open[vol]
		fresh := s == nil || (s.size > 0 && s.size+n > d.segSize)
		need := n
		if fresh {
			need += segSlack
		}
		if d.used+need > d.limit && len(d.segs) > 0 {
			d.evictOldestLocked()
			continue
		}
		if fresh {
			prev = s
			if s, err = d.newSegmentLocked(vol); s == nil || err != nil {
				return nil, prev, err
			}
		}
		d.used += n
		return s, prev, nil
	}
}

// newSegmentLocked creates the next segment of volume vol and makes it the
// one appended to.
func (d *diskTier) newSegmentLocked(vol string) (*segment, error) {
	if ok, err := d.lockVolume(vol); err != nil || !ok {
		return nil, err
	}
	delete(d.open, vol)
	seq := d.nextSeq
	d.nextSeq++
	rel := filepath.Join(vol, fmt.Sprintf("%016x%s", seq, segSuffix))
	p := filepath.Join(d.dir, rel)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create read cache segment %s: %w", rel, err)
	}
	df := f
	if directIO {
		if g, err := os.OpenFile(p, os.O_WRONLY|syscall.O_DIRECT, 0); err == nil {
			df = g
		} else {
			d.log.Debug().Err(err).Str("file", rel).Msg("no O_DIRECT for read cache segments here; buffered appends")
		}
	}
	s := &segment{seq: seq, vol: vol, rel: rel, f: f, df: df, stage: alignedBuffer(stageSize), appending: true}
	d.segs = append(d.segs, s)
	d.open[vol] = s
	d.used += segSlack
	return s, nil
}

// alignedBuffer is an empty slice of capacity n whose first byte is
// directAlign-aligned, as O_DIRECT needs.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+directAlign)
	a := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) % directAlign); r != 0 {
		a = directAlign - r
	}
	return b[a : a : a+n]
}

// sync waits for the writes queued before it.
func (d *diskTier) sync() {
	done := make(chan struct{})
	d.qmu.RLock()
	if d.closed {
		d.qmu.RUnlock()
		return
	}
	d.queue <- diskWrite{sync: done}
	d.qmu.RUnlock()
	<-done
}

// close stops the writer after the queued writes, closes the segments
// and releases the directories.
func (d *diskTier) close() {
	d.qmu.Lock()
	if !d.closed {
		d.closed = true
		close(d.queue)
	}
	d.qmu.Unlock()
	<-d.done
	// The segments still taking appends get their index file, so the
	// next start need not read every record's header (the writer has
	// flushed them and stopped).
	d.mu.Lock()
	open := make([]*segment, 0, len(d.open))
	for _, s := range d.open {
		open = append(open, s)
	}
	d.mu.Unlock()
	for _, s := range open {
		d.writeIndex(s)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.segs {
		if !s.dead {
			s.dead = true
			if s.df != nil && s.df != s.f {
				s.df.Close()
			}
			if s.refs == 0 {
				s.f.Close()
			}
		}
	}
	d.shut = true
	d.unlockAll()
}

func (d *diskTier) closeFiles(segs []*segment) {
	for _, s := range segs {
		s.f.Close()
	}
}

func (d *diskTier) unlockAll() {
	for vol, f := range d.locks {
		f.Close() // releases the flock
		delete(d.locks, vol)
	}
}

// usedBytes is the bytes the tier counts against its limit.
func (d *diskTier) usedBytes() int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.used
}

// appendHeader appends the fields both formats start with, up to and
// including the volume id.
func appendHeader(b []byte, magic string, k Key, win int64, n int) []byte {
	b = append(b, magic...)
	b = binary.LittleEndian.AppendUint32(b, uint32(win))
	b = binary.LittleEndian.AppendUint32(b, uint32(n))
	b = binary.LittleEndian.AppendUint64(b, uint64(k.Object))
	b = binary.LittleEndian.AppendUint64(b, uint64(k.Window))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(k.Volume)))
	return append(b, k.Volume...)
}

// sealWindowTo appends to dst (which must not overlap data) the
// encrypted record of window k: the header, then the data sealed with the
// header as associated data.
func sealWindowTo(dst []byte, s Sealer, k Key, win int64, data []byte) ([]byte, error) {
	start := len(dst)
	hdr := appendHeader(dst, sealedMagic, k, win, len(data))
	return s.Seal(hdr, data, hdr[start:len(hdr):len(hdr)])
}

// openWindow checks an encrypted file against the key it was looked up by
// and appends its data to dst (which must not overlap raw).
func openWindow(s Sealer, raw []byte, k Key, win int64, dst []byte) ([]byte, error) {
	if len(raw) < headerFixed || string(raw[:8]) != sealedMagic {
		return nil, errors.New("not an encrypted cache file (bad magic or too short)")
	}
	le := binary.LittleEndian
	length := int64(le.Uint32(raw[12:]))
	if length <= 0 || length > win {
		return nil, fmt.Errorf("length %d: not a window of %d bytes", length, win)
	}
	// The header must be the one this key's file would carry; the AEAD
	// then proves the rest.
	want := appendHeader(make([]byte, 0, headerFixed+len(k.Volume)), sealedMagic, k, win, int(length))
	if len(raw) < len(want) || string(raw[:len(want)]) != string(want) {
		return nil, fmt.Errorf("header does not name volume %s key %d window %d with window size %d", k.Volume, k.Object, k.Window, win)
	}
	if got := int64(len(raw) - len(want) - s.Overhead()); got != length {
		return nil, fmt.Errorf("file holds %d bytes of data, header says %d", got, length)
	}
	data, err := s.Open(dst, raw[len(want):], want)
	if err != nil {
		return nil, err
	}
	return data, nil
}

// headerFixed is the size of the header fields before the volume id.
const headerFixed = 8 + 4 + 4 + 8 + 8 + 2

// windowHeader is the header of a plaintext record of window k: the
// fields, a CRC32C per 4 KiB block of data and the header's own CRC32C.
func windowHeader(k Key, win int64, data []byte) []byte {
	nCRC := (len(data) + crcBlock - 1) / crcBlock
	b := appendHeader(make([]byte, 0, headerFixed+len(k.Volume)+4*nCRC+4), diskMagic, k, win, len(data))
	for off := 0; off < len(data); off += crcBlock {
		b = binary.LittleEndian.AppendUint32(b, crc32c.Checksum(data[off:min(off+crcBlock, len(data))]))
	}
	return binary.LittleEndian.AppendUint32(b, crc32c.Checksum(b))
}

// checkWindow checks a plaintext record, read as its header hdr and its
// data, against the key it was looked up by: the fields, the header's
// CRC32C and every block's.
func checkWindow(hdr, data []byte, k Key, win int64) error {
	const fixed = headerFixed
	if len(hdr) < fixed || string(hdr[:8]) != diskMagic {
		return errors.New("not a cache file (bad magic or too short)")
	}
	le := binary.LittleEndian
	fwin, length := int64(le.Uint32(hdr[8:])), int64(le.Uint32(hdr[12:]))
	key, w := int64(le.Uint64(hdr[16:])), int64(le.Uint64(hdr[24:]))
	idLen := int(le.Uint16(hdr[32:]))
	if fwin != win || length <= 0 || length > win {
		return fmt.Errorf("window size %d, length %d: written with another window size or garbled", fwin, length)
	}
	nCRC := int((length + crcBlock - 1) / crcBlock)
	h := fixed + idLen + 4*nCRC
	if len(hdr) != h+4 || int64(len(data)) != length {
		return fmt.Errorf("record is %d+%d bytes, header says %d+%d", len(hdr), len(data), h+4, length)
	}
	if crc32c.Checksum(hdr[:h]) != le.Uint32(hdr[h:]) {
		return errors.New("header CRC32C mismatch")
	}
	if id := string(hdr[fixed : fixed+idLen]); id != k.Volume || key != k.Object || w != k.Window {
		return fmt.Errorf("holds volume %s key %d window %d, not volume %s key %d window %d", id, key, w, k.Volume, k.Object, k.Window)
	}
	for i := range nCRC {
		blk := data[i*crcBlock : min((i+1)*crcBlock, len(data))]
		if crc32c.Checksum(blk) != le.Uint32(hdr[fixed+idLen+4*i:]) {
			return fmt.Errorf("CRC32C mismatch in block %d of the data", i)
		}
	}
	return nil
}
