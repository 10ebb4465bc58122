package nbd

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
)

// A unix socket is created with its final mode before anyone can reach
// it: it is bound inside a fresh directory only we can enter, given mode
// 0600 (0660 and the group when one is configured), and only then renamed
// to the configured path. A plain bind followed by a chmod would leave a
// moment in which any local user could connect and read the device.

// unixListener removes the configured path on Close (the socket was bound
// under another name, which Go would unlink instead) and reports the
// configured path as its address.
type unixListener struct {
	*net.UnixListener
	path string
}

func (l unixListener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

func (l unixListener) Close() error {
	err := l.UnixListener.Close()
	if rerr := os.Remove(l.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = fmt.Errorf("remove unix socket %s: %w", l.path, rerr)
	}
	return err
}

// listenUnixPrivate listens on path with mode 0600, or 0660 owned by
// group when group is not empty.
func listenUnixPrivate(path, group string) (net.Listener, error) {
	gid := -1
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			return nil, fmt.Errorf("nbd: socket group %q: %w", group, err)
		}
		if gid, err = strconv.Atoi(g.Gid); err != nil {
			return nil, fmt.Errorf("nbd: socket group %q has a non-numeric id %q", group, g.Gid)
		}
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".bs3-nbd-")
	if err != nil {
		return nil, fmt.Errorf("nbd: create a private directory next to unix socket %s: %w", path, err)
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("nbd: listen on unix socket %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	mode := os.FileMode(0o600)
	if gid >= 0 {
		mode = 0o660
		if err := os.Chown(tmp, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("nbd: give unix socket %s to group %s: %w", path, group, err)
		}
	}
	if err := os.Chmod(tmp, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("nbd: set the mode of unix socket %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		return nil, fmt.Errorf("nbd: put unix socket %s in place: %w", path, err)
	}
	return unixListener{UnixListener: ln, path: path}, nil
}
