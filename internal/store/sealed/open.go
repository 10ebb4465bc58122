package sealed

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/bs3/bs3/internal/store"
)

// Open checks the configured key against the volume in raw (the store as
// main builds it, under its prefix) and returns the store the engine must
// use: raw itself for a plaintext volume, a sealed store otherwise. It
// reads the superblock and writes nothing, so a refusal leaves the volume
// as it was (docs/ARCHITECTURE.md §16.3).
//
// The record is nil for a plaintext volume without checksums; for an
// encrypted or checksummed one (new or existing) it is what
// volume.Options.Encryption must carry, so that a new volume's superblock
// records it and an existing one is checked against it again. With no key
// configured, a new volume gets checksummed objects when cfg.Checksums is
// set (docs/ARCHITECTURE.md §16.6).
func Open(ctx context.Context, raw store.Store, cfg KeyConfig) (store.Store, *Record, error) {
	var src *keySource
	if cfg.Enabled() {
		// The files first: a bad key file is reported without any I/O.
		var err error
		if src, err = loadKeySource(cfg); err != nil {
			return nil, nil, err
		}
	}
	rec, found, err := ReadRecord(ctx, raw)
	if err != nil {
		return nil, nil, err
	}
	if !rec.Encrypted() {
		switch {
		case src != nil && found:
			return nil, nil, errors.New("this volume is not encrypted; remove [encryption] or use a new bucket/prefix")
		case src == nil && rec != nil:
			if rec.Cipher != CipherChecksum || len(rec.SealID) != 16 {
				return nil, nil, errors.New("superblock's checksum record is damaged (no valid seal_id): refusing to attach")
			}
			st, err := NewChecksummed(raw, rec.SealID)
			if err != nil {
				return nil, nil, err
			}
			return st, rec, nil
		case src == nil && !found && cfg.Checksums:
			if rec, err = newChecksumRecord(); err != nil {
				return nil, nil, fmt.Errorf("new volume's checksums: %w", err)
			}
			st, err := NewChecksummed(raw, rec.SealID)
			if err != nil {
				return nil, nil, err
			}
			return st, rec, nil
		case src == nil:
			return raw, nil, nil // a plaintext volume without checksums (older), or a new one by choice
		}
	}
	var dk []byte
	switch {
	case src == nil:
		return nil, nil, errors.New("volume is encrypted: set [encryption] key_file or passphrase_file")
	case !found:
		if rec, dk, err = src.newRecord(); err != nil {
			return nil, nil, fmt.Errorf("new volume's encryption: %w", err)
		}
	default:
		if dk, err = src.unwrap(rec); err != nil {
			return nil, nil, err
		}
	}
	st, err := New(raw, dk, rec.SealID)
	if err != nil {
		return nil, nil, err
	}
	return st, rec, nil
}

// superblockEncryption is the part of the superblock this package reads;
// volume.Superblock owns the rest.
type superblockEncryption struct {
	Encryption *Record `json:"encryption"`
}

// ReadRecord reads the superblock from raw and returns its encryption
// record (nil for a plaintext volume) and whether a superblock exists.
func ReadRecord(ctx context.Context, raw store.Store) (*Record, bool, error) {
	body, err := readSmall(ctx, raw, store.SuperblockName)
	if errors.Is(err, store.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read superblock: %w", err)
	}
	var sb superblockEncryption
	if err := json.Unmarshal(body, &sb); err != nil {
		return nil, true, fmt.Errorf("superblock is corrupt (%v): refusing to attach; inspect the %q object", err, store.SuperblockName)
	}
	return sb.Encryption, true, nil
}

// readSmall reads a small object that may be replaced while it is read
// (as volume's readWhole does): a GET with room to spare returns one
// whole version.
func readSmall(ctx context.Context, st store.Store, name string) ([]byte, error) {
	size, err := st.Size(ctx, name)
	if err != nil {
		return nil, err
	}
	room := size + size/4 + 4096
	for range 8 {
		buf := make([]byte, room)
		n, err := st.GetRange(ctx, name, 0, buf)
		if err != nil {
			return nil, err
		}
		if int64(n) < room {
			return buf[:n], nil
		}
		room *= 2
	}
	return nil, fmt.Errorf("read %s: the object kept growing while it was read", name)
}

// Passwd rewraps the volume's data key from oldCfg to newCfg and rewrites
// the superblock in raw with only its "encryption" field changed; every
// sealed object stays as it is. It then reads the superblock back and
// checks that the new key opens it and the old one no longer does, so a
// superblock rewritten meanwhile by an attaching daemon is reported
// rather than silently undone. Run it while the volume is detached.
func Passwd(ctx context.Context, raw store.Store, oldCfg, newCfg KeyConfig) error {
	body, err := readSmall(ctx, raw, store.SuperblockName)
	if errors.Is(err, store.ErrNotFound) {
		return errors.New("there is no volume here (no superblock): nothing to change")
	}
	if err != nil {
		return fmt.Errorf("read superblock: %w", err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return fmt.Errorf("superblock is corrupt (%v): inspect the %q object", err, store.SuperblockName)
	}
	var rec *Record
	if e, ok := fields["encryption"]; ok && !bytes.Equal(e, []byte("null")) {
		if err := json.Unmarshal(e, &rec); err != nil {
			return fmt.Errorf("superblock's encryption record is corrupt: %w", err)
		}
	}
	if !rec.Encrypted() {
		return errors.New("this volume is not encrypted: there is no key to change")
	}
	next, err := Rewrap(rec, oldCfg, newCfg)
	if err != nil {
		return err
	}
	enc, err := json.Marshal(next)
	if err != nil {
		return fmt.Errorf("encode encryption record: %w", err)
	}
	fields["encryption"] = enc
	out, err := json.MarshalIndent(fields, "", "  ")
	if err != nil {
		return fmt.Errorf("encode superblock: %w", err)
	}
	if err := raw.Put(ctx, store.SuperblockName, out, false); err != nil {
		return fmt.Errorf("write superblock: %w", err)
	}
	back, _, err := ReadRecord(ctx, raw)
	if err != nil {
		return fmt.Errorf("read the superblock back: %w", err)
	}
	src, err := loadKeySource(newCfg)
	if err != nil {
		return err
	}
	if back == nil || !bytes.Equal(back.WrappedKey, next.WrappedKey) {
		return errors.New("the superblock was rewritten by someone else during the change (a daemon attaching?): the old key may still be in force; stop every bs3 on this volume and run passwd again")
	}
	if _, err := src.unwrap(back); err != nil {
		return fmt.Errorf("the rewritten superblock does not open with the new key: %w", err)
	}
	return nil
}
