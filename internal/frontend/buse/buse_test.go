package buse

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/bs3/bs3/internal/null"
)

// Without the module, Start must refuse with a message naming the
// alternatives instead of panicking inside the library.
func TestStartWithoutModule(t *testing.T) {
	if _, err := os.Stat(configfsRoot); err == nil {
		t.Skip("the BUSE module is loaded here; this test checks the error when it is not")
	}
	_, err := Start(NewAdapter(null.New(1<<30, 4096)), Options{BlockSize: 4096, Size: 1 << 30, WriteChunkSize: 4 << 20, WriteShmSize: 32 << 20, ReadShmSize: 32 << 20}, zerolog.Nop())
	if !errors.Is(err, ErrNoModule) {
		t.Fatalf("Start without module: %v, want ErrNoModule", err)
	}
	for _, want := range []string{"nbd", "fuse", "modprobe buse"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}
