package cache

import (
	"bytes"
	"container/list"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/rs/zerolog"
)

// The disk tier keeps one file per window, dir/<volume id>/<key>-<window>,
// so that it survives a restart. Nothing in a file is trusted: before a
// window is served, the header must name the same volume, key, window and
// window size, and the CRC32C of the header and of every 4 KiB block must
// match; otherwise the file is removed and the window fetched again.
//
// File layout (little-endian):
//
//	magic "BS3CWIN1" | window size u32 | length u32 | key i64 | window i64
//	| id length u16 | volume id | CRC32C per 4 KiB block of data (u32 each)
//	| CRC32C of everything before it (u32) | data (length bytes)
//
// An encrypted volume's files (a Sealer is set) hold no plaintext and no
// CRC: the AEAD tag authenticates everything (docs/ARCHITECTURE.md §16.5):
//
//	magic "BS3CENC1" | window size u32 | length u32 | key i64 | window i64
//	| id length u16 | volume id | sealed data (Sealer.Seal of the window,
//	with everything before it as associated data)
//
// so a file whose header was edited, that was moved to another key, window
// or volume directory, or was written under another data key or volume
// fails to open and is dropped like a damaged one. Each tier reads only its
// own magic: a plaintext file is never served by an encrypted tier, nor
// the reverse.
//
// Files are written by one background goroutine to a temporary name and
// renamed, so a reader never sees half a file; a full queue drops the
// write (it is only a cache).

const (
	diskMagic     = "BS3CWIN1"
	sealedMagic   = "BS3CENC1"
	crcBlock      = 4 << 10
	diskQueue     = 256
	tmpPrefix     = ".tmp-"
	diskFileSlack = 4 << 10 // header and directory entry, counted per file
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// diskIDRe is the volume ids whose windows go to disk: the 32 hex digits
// bs3 generates. Anything else (a hand-edited superblock, the "unknown"
// fallback) could name another volume's directory, so it is kept in
// memory only.
var diskIDRe = regexp.MustCompile(`^[0-9a-f]{16,64}$`)

type diskTier struct {
	dir   string
	limit int64
	win   int64
	seal  Sealer // nil: plaintext files with CRC32C
	log   zerolog.Logger

	mu    sync.Mutex
	used  int64
	lru   *list.List               // of *diskFile, front = most recent
	files map[string]*list.Element // by path relative to dir

	qmu    sync.RWMutex // guards closed against sends on a closed queue
	closed bool
	queue  chan diskWrite
	done   chan struct{}

	hits, dropped, written, evicted atomic.Int64
}

type diskFile struct {
	rel  string
	size int64
}

type diskWrite struct {
	k    Key
	data []byte
	sync chan struct{} // a marker: closed when reached, nothing written
}

// openDisk indexes the files already in dir (oldest first by modification
// time), removes temporary files left by a crash, trims the tier to limit
// and starts the writer.
func openDisk(dir string, limit, win int64, seal Sealer, log zerolog.Logger) (*diskTier, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create the cache directory %s: %w", dir, err)
	}
	d := &diskTier{dir: dir, limit: limit, win: win, seal: seal, log: log, lru: list.New(), files: make(map[string]*list.Element),
		queue: make(chan diskWrite, diskQueue), done: make(chan struct{})}
	type found struct {
		rel  string
		size int64
		mod  int64
	}
	var all []found
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			return os.Remove(p)
		}
		info, err := e.Info()
		if err != nil {
			return err
		}
		all = append(all, found{rel, info.Size(), info.ModTime().UnixNano()})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index the cache directory %s: %w", dir, err)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].mod < all[j].mod })
	for _, f := range all {
		d.files[f.rel] = d.lru.PushFront(&diskFile{f.rel, f.size + diskFileSlack})
		d.used += f.size + diskFileSlack
	}
	d.mu.Lock()
	d.evictLocked(0)
	d.mu.Unlock()
	log.Debug().Str("dir", dir).Int("files", len(all)).Int64("bytes", d.used).Msg("read cache directory indexed")
	go d.writer()
	return d, nil
}

func (d *diskTier) rel(k Key) (string, bool) {
	if !diskIDRe.MatchString(k.Volume) {
		return "", false
	}
	return filepath.Join(k.Volume, fmt.Sprintf("%016x-%x", k.Object, k.Window)), true
}

// get returns the verified window k from disk. A file that fails any check
// is removed.
func (d *diskTier) get(k Key) ([]byte, bool) {
	rel, ok := d.rel(k)
	if !ok {
		return nil, false
	}
	d.mu.Lock()
	el, ok := d.files[rel]
	if ok {
		d.lru.MoveToFront(el)
	}
	d.mu.Unlock()
	if !ok {
		return nil, false
	}
	raw, err := os.ReadFile(filepath.Join(d.dir, rel))
	if err != nil {
		d.drop(rel, err)
		return nil, false
	}
	var data []byte
	if d.seal != nil {
		data, err = openWindow(d.seal, raw, k, d.win)
	} else {
		data, err = decodeWindow(raw, k, d.win)
	}
	if err != nil {
		d.drop(rel, err)
		return nil, false
	}
	d.hits.Add(1)
	return data, true
}

// drop removes a file that cannot be served.
func (d *diskTier) drop(rel string, why error) {
	d.dropped.Add(1)
	d.log.Warn().Str("file", rel).Err(why).Msg("dropping a read cache file that fails its checks; the window is fetched again")
	d.mu.Lock()
	d.removeLocked(rel)
	d.mu.Unlock()
}

func (d *diskTier) removeLocked(rel string) {
	if el, ok := d.files[rel]; ok {
		d.used -= el.Value.(*diskFile).size
		d.lru.Remove(el)
		delete(d.files, rel)
	}
	if err := os.Remove(filepath.Join(d.dir, rel)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		d.log.Warn().Str("file", rel).Err(err).Msg("could not remove a read cache file")
	}
}

// evictLocked removes the least recently used files until need more bytes
// fit under the limit.
func (d *diskTier) evictLocked(need int64) {
	for d.used+need > d.limit && d.lru.Len() > 0 {
		f := d.lru.Back().Value.(*diskFile)
		d.removeLocked(f.rel)
		d.evicted.Add(1)
	}
}

// put queues window k for writing; data must not change afterwards.
func (d *diskTier) put(k Key, data []byte) {
	if _, ok := d.rel(k); !ok {
		return
	}
	d.qmu.RLock()
	defer d.qmu.RUnlock()
	if d.closed {
		return
	}
	select {
	case d.queue <- diskWrite{k: k, data: data}:
	default: // busy disk: skip, it is only a cache
	}
}

func (d *diskTier) writer() {
	defer close(d.done)
	for w := range d.queue {
		if w.sync != nil {
			close(w.sync)
			continue
		}
		if err := d.write(w.k, w.data); err != nil {
			d.log.Warn().Err(err).Msg("could not write a read cache file")
		}
	}
}

func (d *diskTier) write(k Key, data []byte) error {
	rel, _ := d.rel(k)
	var file []byte
	if d.seal != nil {
		var err error
		if file, err = sealWindow(d.seal, k, d.win, data); err != nil {
			return fmt.Errorf("seal window %d of key %d: %w", k.Window, k.Object, err)
		}
	} else {
		file = encodeWindow(k, d.win, data)
	}
	size := int64(len(file)) + diskFileSlack
	if size > d.limit {
		return nil
	}
	d.mu.Lock()
	if _, ok := d.files[rel]; ok {
		d.mu.Unlock()
		return nil // immutable content: already there
	}
	d.evictLocked(size)
	d.used += size // reserved before the write, so the limit holds meanwhile
	d.mu.Unlock()
	err := d.writeFile(rel, file)
	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		d.used -= size
		return err
	}
	d.files[rel] = d.lru.PushFront(&diskFile{rel, size})
	d.written.Add(1)
	return nil
}

func (d *diskTier) writeFile(rel string, file []byte) error {
	p := filepath.Join(d.dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(p), err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), tmpPrefix)
	if err != nil {
		return fmt.Errorf("create a temporary file for %s: %w", rel, err)
	}
	_, werr := tmp.Write(file)
	cerr := tmp.Close()
	if werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp.Name(), p)
	}
	if werr != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", rel, werr)
	}
	return nil
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

// close stops the writer after the queued writes.
func (d *diskTier) close() {
	d.qmu.Lock()
	if !d.closed {
		d.closed = true
		close(d.queue)
	}
	d.qmu.Unlock()
	<-d.done
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

// sealWindow is the encrypted file of window k: the header, then the
// data sealed with the header as associated data.
func sealWindow(s Sealer, k Key, win int64, data []byte) ([]byte, error) {
	hdr := appendHeader(make([]byte, 0, headerFixed+len(k.Volume)+len(data)+s.Overhead()), sealedMagic, k, win, len(data))
	return s.Seal(hdr, data, hdr[:len(hdr):len(hdr)])
}

// openWindow checks an encrypted file against the key it was looked up by
// and returns its data (decrypted in place in raw).
func openWindow(s Sealer, raw []byte, k Key, win int64) ([]byte, error) {
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
	data, err := s.Open(raw[len(want):], want)
	if err != nil {
		return nil, err
	}
	return data, nil
}

// headerFixed is the size of the header fields before the volume id.
const headerFixed = 8 + 4 + 4 + 8 + 8 + 2

func encodeWindow(k Key, win int64, data []byte) []byte {
	var b bytes.Buffer
	b.WriteString(diskMagic)
	var u [8]byte
	binary.LittleEndian.PutUint32(u[:4], uint32(win))
	b.Write(u[:4])
	binary.LittleEndian.PutUint32(u[:4], uint32(len(data)))
	b.Write(u[:4])
	binary.LittleEndian.PutUint64(u[:], uint64(k.Object))
	b.Write(u[:])
	binary.LittleEndian.PutUint64(u[:], uint64(k.Window))
	b.Write(u[:])
	binary.LittleEndian.PutUint16(u[:2], uint16(len(k.Volume)))
	b.Write(u[:2])
	b.WriteString(k.Volume)
	for off := 0; off < len(data); off += crcBlock {
		binary.LittleEndian.PutUint32(u[:4], crc32.Checksum(data[off:min(off+crcBlock, len(data))], castagnoli))
		b.Write(u[:4])
	}
	binary.LittleEndian.PutUint32(u[:4], crc32.Checksum(b.Bytes(), castagnoli))
	b.Write(u[:4])
	b.Write(data)
	return b.Bytes()
}

// decodeWindow checks a file against the key it was looked up by and
// returns its data.
func decodeWindow(raw []byte, k Key, win int64) ([]byte, error) {
	const fixed = 8 + 4 + 4 + 8 + 8 + 2
	if len(raw) < fixed || string(raw[:8]) != diskMagic {
		return nil, errors.New("not a cache file (bad magic or too short)")
	}
	le := binary.LittleEndian
	fwin, length := int64(le.Uint32(raw[8:])), int64(le.Uint32(raw[12:]))
	key, w := int64(le.Uint64(raw[16:])), int64(le.Uint64(raw[24:]))
	idLen := int(le.Uint16(raw[32:]))
	if fwin != win || length <= 0 || length > win {
		return nil, fmt.Errorf("window size %d, length %d: written with another window size or garbled", fwin, length)
	}
	nCRC := int((length + crcBlock - 1) / crcBlock)
	hdr := fixed + idLen + 4*nCRC
	if int64(len(raw)) != int64(hdr+4)+length {
		return nil, fmt.Errorf("file is %d bytes, header says %d", len(raw), int64(hdr+4)+length)
	}
	if crc32.Checksum(raw[:hdr], castagnoli) != le.Uint32(raw[hdr:]) {
		return nil, errors.New("header CRC32C mismatch")
	}
	if id := string(raw[fixed : fixed+idLen]); id != k.Volume || key != k.Object || w != k.Window {
		return nil, fmt.Errorf("holds volume %s key %d window %d, not volume %s key %d window %d", id, key, w, k.Volume, k.Object, k.Window)
	}
	data := raw[hdr+4:]
	for i := range nCRC {
		blk := data[i*crcBlock : min((i+1)*crcBlock, len(data))]
		if crc32.Checksum(blk, castagnoli) != le.Uint32(raw[fixed+idLen+4*i:]) {
			return nil, fmt.Errorf("CRC32C mismatch in block %d of the data", i)
		}
	}
	return data, nil
}
