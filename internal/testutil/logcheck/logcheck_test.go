package logcheck

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

func TestDuplicateKeys(t *testing.T) {
	cases := []struct {
		line string
		want []string
	}{
		{`{"level":"info","component":"nbd","message":"x"}`, nil},
		{`{"component":"nbd","component":"nbd","a":{"b":1,"b":2}}`, []string{"component"}},
		{`{"a":[1,{"a":2}],"b":"a","a":null,"b":true,"a":3}`, []string{"a", "b"}},
	}
	for _, c := range cases {
		got, err := DuplicateKeys([]byte(c.line))
		if err != nil {
			t.Errorf("%s: %v", c.line, err)
			continue
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: got %q, want %q", c.line, got, c.want)
		}
	}
	for _, bad := range []string{`[1]`, `{"a":`, `not json`} {
		if _, err := DuplicateKeys([]byte(bad)); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
}

// The trap this package exists for: zerolog writes a context field twice
// when two layers add it.
func TestZerologRepeatsContextFields(t *testing.T) {
	var buf bytes.Buffer
	log := zerolog.New(&buf).With().Str("component", "nbd").Logger()
	sub := log.With().Str("component", "nbd").Logger()
	sub.Info().Msg("listening")
	problems := Lines(&buf)
	if len(problems) != 1 || !strings.Contains(problems[0], `"component"`) {
		t.Fatalf("Lines = %q, want one problem naming component", problems)
	}
}
