// Package logcheck checks the hygiene of bs3's JSON log lines in tests: a
// line is one JSON object, and no key appears twice in it. zerolog
// appends context fields without looking at the ones already there, so a
// component logger that adds "component" over a logger that has it
// already writes it twice; encoding/json would silently keep the last
// one, which is why the keys are read token by token here.
package logcheck

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
)

// DuplicateKeys returns the top-level keys that occur more than once in
// the JSON object line, each once, in order of their second occurrence.
func DuplicateKeys(line []byte) ([]string, error) {
	dec := json.NewDecoder(bytes.NewReader(line))
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("log line %q: %w", line, err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("log line %q is not a JSON object", line)
	}
	seen := map[string]int{}
	var dups []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("log line %q: %w", line, err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("log line %q: key %v is not a string", line, tok)
		}
		seen[key]++
		if seen[key] == 2 {
			dups = append(dups, key)
		}
		var skip json.RawMessage // the value, whatever its shape
		if err := dec.Decode(&skip); err != nil {
			return nil, fmt.Errorf("log line %q: value of %q: %w", line, key, err)
		}
	}
	if _, err := dec.Token(); err != nil {
		return nil, fmt.Errorf("log line %q: %w", line, err)
	}
	return dups, nil
}

// Lines checks every non-empty line of r and returns one problem per line
// that is not a JSON object or repeats a key.
func Lines(r io.Reader) []string {
	var problems []string
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		dups, err := DuplicateKeys(line)
		switch {
		case err != nil:
			problems = append(problems, err.Error())
		case len(dups) > 0:
			problems = append(problems, fmt.Sprintf("keys %q repeated in %s", dups, line))
		}
	}
	if err := sc.Err(); err != nil {
		problems = append(problems, fmt.Sprintf("reading the log: %v", err))
	}
	return problems
}
