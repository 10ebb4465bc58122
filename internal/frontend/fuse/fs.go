package fuse

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/bs3/bs3/internal/frontend"
)

// The file system is static: the root directory and one file. It is served
// through go-fuse's raw protocol API rather than its node API because only
// the raw requests carry the per-write O_DSYNC flag and the fsync flags.
const (
	rootIno = gofuse.FUSE_ROOT_ID
	fileIno = rootIno + 1

	// Nothing about the file changes behind the kernel's back (size and
	// owner are fixed for the life of the mount), so attributes and the
	// directory entry may be cached for long.
	attrTTL = time.Hour
)

// openFlags are returned for every open of the file. FOPEN_DIRECT_IO keeps
// the kernel page cache out of the way so every read and write reaches the
// Device (which is the only cache, and must see FUA/flush ordering);
// FOPEN_PARALLEL_DIRECT_WRITES lets the kernel send concurrent writes
// instead of serialising them on the inode lock.
const openFlags = gofuse.FOPEN_DIRECT_IO | gofuse.FOPEN_PARALLEL_DIRECT_WRITES

// handle is the state of one open file description.
type handle struct {
	sync bool // opened with O_SYNC or O_DSYNC
	// dirty is set by writes and cleared by a successful Device.Flush on
	// behalf of this handle, so close(2) only flushes after writes.
	dirty atomic.Bool
}

type fileSystem struct {
	gofuse.RawFileSystem // ENOSYS for every operation not below

	io    *blockIO
	name  string
	log   zerolog.Logger
	mtime time.Time

	mu      sync.Mutex
	handles map[uint64]*handle
	nextFh  uint64
}

func newFileSystem(dev frontend.Device, name string, log zerolog.Logger) *fileSystem {
	return &fileSystem{
		RawFileSystem: gofuse.NewDefaultRawFileSystem(),
		io:            newBlockIO(dev),
		name:          name,
		log:           log,
		mtime:         time.Now(),
		handles:       make(map[uint64]*handle),
	}
}

func (fs *fileSystem) String() string { return "bs3" }

// reqContext is the context of one FUSE request: it is cancelled when the
// kernel interrupts the request (the caller got a signal). A nil channel
// means the request cannot be interrupted.
type reqContext struct{ cancel <-chan struct{} }

func (c reqContext) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c reqContext) Done() <-chan struct{}       { return c.cancel }
func (c reqContext) Value(any) any               { return nil }
func (c reqContext) Err() error {
	select {
	case <-c.cancel:
		return context.Canceled
	default:
		return nil
	}
}

// status maps an error from the block layer to the errno the caller of the
// system call sees, logging the ones that are the device's fault.
func (fs *fileSystem) status(op string, off, length int64, err error) gofuse.Status {
	var errno syscall.Errno
	switch {
	case err == nil:
		return gofuse.OK
	case errors.As(err, &errno):
		return gofuse.Status(errno)
	case errors.Is(err, frontend.ErrInvalid):
		fs.log.Debug().Err(err).Str("op", op).Int64("off", off).Int64("len", length).Msg("invalid request")
		return gofuse.EINVAL
	case errors.Is(err, context.Canceled):
		return gofuse.EINTR
	default:
		fs.log.Error().Err(err).Str("op", op).Int64("off", off).Int64("len", length).Msg("device request failed")
		return gofuse.EIO
	}
}

func (fs *fileSystem) fileAttr(a *gofuse.Attr) {
	*a = gofuse.Attr{
		Ino:     fileIno,
		Size:    uint64(fs.io.size),
		Blocks:  uint64(fs.io.size / 512),
		Mode:    syscall.S_IFREG | 0o600,
		Nlink:   1,
		Blksize: uint32(fs.io.bs),
	}
	fs.setTimes(a)
}

func (fs *fileSystem) rootAttr(a *gofuse.Attr) {
	*a = gofuse.Attr{Ino: rootIno, Mode: syscall.S_IFDIR | 0o755, Nlink: 2}
	fs.setTimes(a)
}

func (fs *fileSystem) setTimes(a *gofuse.Attr) {
	t := fs.mtime
	a.SetTimes(&t, &t, &t)
}

func (fs *fileSystem) handle(fh uint64) *handle {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.handles[fh]
}

func (fs *fileSystem) Lookup(cancel <-chan struct{}, header *gofuse.InHeader, name string, out *gofuse.EntryOut) gofuse.Status {
	if header.NodeId != rootIno {
		return gofuse.Status(syscall.ENOTDIR)
	}
	if name != fs.name {
		return gofuse.ENOENT
	}
	out.NodeId = fileIno
	out.Generation = 1
	out.SetEntryTimeout(attrTTL)
	out.SetAttrTimeout(attrTTL)
	fs.fileAttr(&out.Attr)
	return gofuse.OK
}

// Forget needs no bookkeeping: both inodes live as long as the mount.
func (fs *fileSystem) Forget(nodeID, nlookup uint64) {}

func (fs *fileSystem) GetAttr(cancel <-chan struct{}, in *gofuse.GetAttrIn, out *gofuse.AttrOut) gofuse.Status {
	switch in.NodeId {
	case rootIno:
		fs.rootAttr(&out.Attr)
	case fileIno:
		fs.fileAttr(&out.Attr)
	default:
		return gofuse.ENOENT
	}
	out.SetTimeout(attrTTL)
	return gofuse.OK
}

// SetAttr refuses every change that would make the file differ from the
// device: size, mode and owner. Setting them to their current values and
// touching the times (which are not stored) succeed, so tools that do so
// routinely keep working.
func (fs *fileSystem) SetAttr(cancel <-chan struct{}, in *gofuse.SetAttrIn, out *gofuse.AttrOut) gofuse.Status {
	if in.NodeId != fileIno {
		return gofuse.EPERM
	}
	var cur gofuse.Attr
	fs.fileAttr(&cur)
	if size, ok := in.GetSize(); ok && size != cur.Size {
		return gofuse.EPERM
	}
	if mode, ok := in.GetMode(); ok && mode&0o7777 != cur.Mode&0o7777 {
		return gofuse.EPERM
	}
	if uid, ok := in.GetUID(); ok && uid != cur.Uid {
		return gofuse.EPERM
	}
	if gid, ok := in.GetGID(); ok && gid != cur.Gid {
		return gofuse.EPERM
	}
	out.Attr = cur
	out.SetTimeout(attrTTL)
	return gofuse.OK
}

func (fs *fileSystem) Open(cancel <-chan struct{}, in *gofuse.OpenIn, out *gofuse.OpenOut) gofuse.Status {
	switch in.NodeId {
	case fileIno:
	case rootIno:
		return gofuse.Status(syscall.EISDIR)
	default:
		return gofuse.ENOENT
	}
	h := &handle{sync: in.Flags&syscall.O_DSYNC != 0} // O_SYNC includes the O_DSYNC bit
	fs.mu.Lock()
	fs.nextFh++
	fh := fs.nextFh
	fs.handles[fh] = h
	fs.mu.Unlock()
	out.Fh = fh
	out.OpenFlags = openFlags
	return gofuse.OK
}

func (fs *fileSystem) Release(cancel <-chan struct{}, in *gofuse.ReleaseIn) {
	fs.mu.Lock()
	delete(fs.handles, in.Fh)
	fs.mu.Unlock()
}

func (fs *fileSystem) Read(cancel <-chan struct{}, in *gofuse.ReadIn, buf []byte) (gofuse.ReadResult, gofuse.Status) {
	if in.NodeId != fileIno {
		return nil, gofuse.Status(syscall.EISDIR)
	}
	if len(buf) < int(in.Size) {
		buf = make([]byte, in.Size)
	}
	n, err := fs.io.read(reqContext{cancel}, buf[:in.Size], int64(in.Offset))
	if err != nil {
		return nil, fs.status("read", int64(in.Offset), int64(in.Size), err)
	}
	return gofuse.ReadResultData(buf[:n]), gofuse.OK
}

func (fs *fileSystem) Write(cancel <-chan struct{}, in *gofuse.WriteIn, data []byte) (uint32, gofuse.Status) {
	if in.NodeId != fileIno {
		return 0, gofuse.Status(syscall.EISDIR)
	}
	// The kernel puts the file's open flags, plus O_DSYNC for RWF_DSYNC
	// and O_SYNC/O_DSYNC opens, into the write request.
	fua := in.Flags&syscall.O_DSYNC != 0
	h := fs.handle(in.Fh)
	if h != nil {
		fua = fua || h.sync
		h.dirty.Store(true)
	}
	n, err := fs.io.write(reqContext{cancel}, data, int64(in.Offset), fua)
	if err != nil {
		return 0, fs.status("write", int64(in.Offset), int64(len(data)), err)
	}
	return uint32(n), gofuse.OK
}

// flushDevice makes every acknowledged write durable (or ordered, per the
// device's write.durable setting).
func (fs *fileSystem) flushDevice(cancel <-chan struct{}, h *handle) gofuse.Status {
	wasDirty := h != nil && h.dirty.Swap(false)
	if err := fs.io.dev.Flush(reqContext{cancel}); err != nil {
		if wasDirty {
			h.dirty.Store(true)
		}
		return fs.status("flush", 0, 0, err)
	}
	return gofuse.OK
}

func (fs *fileSystem) Fsync(cancel <-chan struct{}, in *gofuse.FsyncIn) gofuse.Status {
	if in.NodeId != fileIno {
		return gofuse.OK
	}
	// fsync and fdatasync are the same here: there is no metadata.
	return fs.flushDevice(cancel, fs.handle(in.Fh))
}

// Flush is called on close(2). Writes through this handle are flushed then,
// so that "write, close" leaves data durable as with a block device's last
// close; handles that did not write skip the cost.
func (fs *fileSystem) Flush(cancel <-chan struct{}, in *gofuse.FlushIn) gofuse.Status {
	h := fs.handle(in.Fh)
	if in.NodeId != fileIno || h == nil || !h.dirty.Load() {
		return gofuse.OK
	}
	return fs.flushDevice(cancel, h)
}

// Fallocate maps hole punching to discard and range zeroing to
// write-zeroes. Plain allocation inside the file succeeds without doing
// anything (the whole device is always allocated); every other mode, and
// anything that would grow the file, is refused.
func (fs *fileSystem) Fallocate(cancel <-chan struct{}, in *gofuse.FallocateIn) gofuse.Status {
	if in.NodeId != fileIno {
		return gofuse.Status(syscall.ENODEV)
	}
	off, length := int64(in.Offset), int64(in.Length)
	if off < 0 || length <= 0 || off+length < off {
		return gofuse.EINVAL
	}
	size := fs.io.size
	keep := in.Mode&unix.FALLOC_FL_KEEP_SIZE != 0
	mode := in.Mode &^ unix.FALLOC_FL_KEEP_SIZE

	var discard bool
	switch mode {
	case 0:
		if !keep && off+length > size {
			return gofuse.Status(syscall.ENOSPC)
		}
		return gofuse.OK
	case unix.FALLOC_FL_PUNCH_HOLE:
		if !keep {
			return gofuse.Status(syscall.EOPNOTSUPP)
		}
		discard = true
	case unix.FALLOC_FL_ZERO_RANGE:
		if !keep && off+length > size {
			return gofuse.Status(syscall.ENOSPC)
		}
	default:
		return gofuse.Status(syscall.EOPNOTSUPP)
	}
	// With KEEP_SIZE the part beyond the end is a no-op, as on any file.
	if off >= size {
		return gofuse.OK
	}
	length = min(length, size-off)

	h := fs.handle(in.Fh)
	fua := h != nil && h.sync
	if h != nil {
		h.dirty.Store(true)
	}
	op := "zero-range"
	if discard {
		op = "punch-hole"
	}
	return fs.status(op, off, length, fs.io.zero(reqContext{cancel}, off, length, discard, fua))
}

func (fs *fileSystem) OpenDir(cancel <-chan struct{}, in *gofuse.OpenIn, out *gofuse.OpenOut) gofuse.Status {
	if in.NodeId != rootIno {
		return gofuse.Status(syscall.ENOTDIR)
	}
	return gofuse.OK
}

func (fs *fileSystem) ReadDir(cancel <-chan struct{}, in *gofuse.ReadIn, out *gofuse.DirEntryList) gofuse.Status {
	if in.NodeId != rootIno {
		return gofuse.Status(syscall.ENOTDIR)
	}
	entries := []gofuse.DirEntry{
		{Name: ".", Ino: rootIno, Mode: syscall.S_IFDIR},
		{Name: "..", Ino: rootIno, Mode: syscall.S_IFDIR},
		{Name: fs.name, Ino: fileIno, Mode: syscall.S_IFREG},
	}
	// The offset of an entry is its index + 1; the kernel resumes at the
	// offset of the last entry it received.
	for i := in.Offset; i < uint64(len(entries)); i++ {
		e := entries[i]
		e.Off = i + 1
		if !out.AddDirEntry(e) {
			break
		}
	}
	return gofuse.OK
}

func (fs *fileSystem) StatFs(cancel <-chan struct{}, header *gofuse.InHeader, out *gofuse.StatfsOut) gofuse.Status {
	*out = gofuse.StatfsOut{
		Blocks:  uint64(fs.io.size / fs.io.bs),
		Files:   2,
		Bsize:   uint32(fs.io.bs),
		Frsize:  uint32(fs.io.bs),
		NameLen: 255,
	}
	return gofuse.OK
}

// The namespace is fixed: nothing can be created, removed or renamed.

func (fs *fileSystem) Create(cancel <-chan struct{}, in *gofuse.CreateIn, name string, out *gofuse.CreateOut) gofuse.Status {
	return gofuse.EPERM
}

func (fs *fileSystem) Mknod(cancel <-chan struct{}, in *gofuse.MknodIn, name string, out *gofuse.EntryOut) gofuse.Status {
	return gofuse.EPERM
}

func (fs *fileSystem) Mkdir(cancel <-chan struct{}, in *gofuse.MkdirIn, name string, out *gofuse.EntryOut) gofuse.Status {
	return gofuse.EPERM
}

func (fs *fileSystem) Unlink(cancel <-chan struct{}, header *gofuse.InHeader, name string) gofuse.Status {
	return gofuse.EPERM
}

func (fs *fileSystem) Rmdir(cancel <-chan struct{}, header *gofuse.InHeader, name string) gofuse.Status {
	return gofuse.EPERM
}

func (fs *fileSystem) Rename(cancel <-chan struct{}, in *gofuse.RenameIn, oldName, newName string) gofuse.Status {
	return gofuse.EPERM
}

func (fs *fileSystem) Link(cancel <-chan struct{}, in *gofuse.LinkIn, name string, out *gofuse.EntryOut) gofuse.Status {
	return gofuse.EPERM
}

func (fs *fileSystem) Symlink(cancel <-chan struct{}, header *gofuse.InHeader, target, name string, out *gofuse.EntryOut) gofuse.Status {
	return gofuse.EPERM
}
