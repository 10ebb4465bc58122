package dir

import (
	"fmt"
	"os"
	"path/filepath"
)

// OpenExisting opens the store at path for inspection (`bs3 status`,
// `bs3 check`): unlike New it creates nothing and leaves temporary files
// alone, since a daemon may be writing them right now.
func OpenExisting(path string) (*Store, error) {
	root, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("dir store %q: %w", path, err)
	}
	fi, err := os.Stat(root)
	if err != nil {
		return nil, fmt.Errorf("dir store %q: %w (is dir.path right?)", root, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("dir store %q is not a directory", root)
	}
	return &Store{root: root}, nil
}
