package fuse

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// loopControl is the device through which free loop devices are found.
const loopControl = "/dev/loop-control"

// Preflight checks what Mount will need, without mounting anything: FUSE,
// a mountpoint that is (or can be made) an empty-of-mounts directory, and
// with o.Loop the loop devices. bs3 runs it before it attaches the volume,
// so that a frontend that cannot start fails the start before anything
// is claimed in the bucket.
func Preflight(o Options) error {
	if o.Mountpoint == "" {
		return errors.New("fuse: no mountpoint (set fuse.mountpoint)")
	}
	mp, err := filepath.Abs(o.Mountpoint)
	if err != nil {
		return fmt.Errorf("fuse: mountpoint %q: %w", o.Mountpoint, err)
	}
	if err := checkFUSE(); err != nil {
		return err
	}
	fi, err := os.Stat(mp)
	switch {
	case errors.Is(err, syscall.ENOTCONN):
		return fmt.Errorf("fuse: mountpoint %s is a FUSE mount whose daemon is gone (a bs3 that crashed?): unmount it with `fusermount -u %s` (or `umount -l %s`) and start again", mp, mp, mp)
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(mp, 0o755); err != nil {
			return fmt.Errorf("fuse: mountpoint %s does not exist and cannot be created: %w", mp, err)
		}
	case err != nil:
		return fmt.Errorf("fuse: mountpoint %s: %w", mp, err)
	case !fi.IsDir():
		return fmt.Errorf("fuse: mountpoint %s is not a directory", mp)
	}
	mounted, err := isMountpoint(mp)
	if err != nil {
		return err
	}
	if mounted {
		return fmt.Errorf("fuse: mountpoint %s is busy: something is already mounted there (another bs3? see `findmnt %s`); unmount it or set fuse.mountpoint to a free directory", mp, mp)
	}
	if o.Loop {
		f, err := os.OpenFile(loopControl, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("fuse: loop devices are not available (%w): load the loop module (modprobe loop), or set fuse.loop = false and use the file %s directly", err, filepath.Join(mp, DefaultFileName))
		}
		if err := f.Close(); err != nil {
			return fmt.Errorf("close %s: %w", loopControl, err)
		}
	}
	return nil
}

// isMountpoint reports whether a file system is mounted at the absolute
// path mp, from /proc/self/mountinfo.
func isMountpoint(mp string) (bool, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, fmt.Errorf("fuse: read the mount table: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && unescapeMount(fields[4]) == mp {
			return true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("fuse: read the mount table: %w", err)
	}
	return false, nil
}

// unescapeMount undoes the octal escapes (\040 for a space) of a path in
// the mount table.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
