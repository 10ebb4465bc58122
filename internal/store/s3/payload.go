package s3

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"slices"

	"github.com/bs3/bs3/internal/crc32c"
)

// PayloadMode is how a Put body is protected between bs3 and the store
// (docs/ARCHITECTURE.md "Upload integrity and CPU"). SigV4 normally signs
// the SHA-256 of every body, the largest CPU cost of a PUT; a content
// checksum the store verifies gives the same protection against damage in
// transit for a fraction of the CPU.
type PayloadMode string

const (
	// PayloadAuto sends UNSIGNED-PAYLOAD with x-amz-checksum-crc32c when
	// the start-up probe finds that the store verifies it, else falls
	// back: signed over http, unsigned over https (TLS protects the body).
	PayloadAuto PayloadMode = "auto"
	// PayloadCRC32C sends UNSIGNED-PAYLOAD and x-amz-checksum-crc32c
	// (hardware-accelerated: ~16 GB/s per core).
	PayloadCRC32C PayloadMode = "crc32c"
	// PayloadMD5 sends UNSIGNED-PAYLOAD and Content-MD5, which every S3
	// store verifies; MD5 costs more CPU than SHA-256 on CPUs with SHA
	// extensions, so it is only for stores that need it.
	PayloadMD5 PayloadMode = "md5"
	// PayloadSigned signs the body's SHA-256 with SigV4.
	PayloadSigned PayloadMode = "signed"
	// PayloadUnsigned sends UNSIGNED-PAYLOAD and no checksum: only the
	// transport (TLS) protects the body.
	PayloadUnsigned PayloadMode = "unsigned"
)

// PayloadModes lists the accepted modes, for messages and configuration.
var PayloadModes = []PayloadMode{PayloadAuto, PayloadCRC32C, PayloadMD5, PayloadSigned, PayloadUnsigned}

// Check returns an error naming the accepted modes if m is not one.
func (m PayloadMode) Check() error {
	if slices.Contains(PayloadModes, m) {
		return nil
	}
	return fmt.Errorf("unknown payload checksum mode %q: use one of %q", string(m), PayloadModes)
}

// ErrChecksumMismatch: the store refused a Put because the body did not
// match its checksum or signed hash, i.e. it was damaged on the way.
// Resending the same bytes can succeed, so callers retry it.
var ErrChecksumMismatch = errors.New("the store found the body damaged in transit (checksum mismatch)")

// checksumMismatch reports whether err is the store's refusal of a body
// that does not match its Content-MD5, x-amz-checksum-* or signed SHA-256.
func checksumMismatch(err error) bool {
	switch errorCode(err) {
	case "BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch", "InvalidChecksum":
		return true
	}
	return false
}

// crc32cBase64 is the x-amz-checksum-crc32c value of body: the big-endian
// CRC32C, base64-encoded.
func crc32cBase64(body [][]byte) string {
	var crc uint32
	for _, p := range body {
		crc = crc32c.Update(crc, p)
	}
	return crc32cString(crc)
}

// crc32cString is the x-amz-checksum-crc32c value of a CRC32C.
func crc32cString(crc uint32) string {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], crc)
	return base64.StdEncoding.EncodeToString(b[:])
}

// md5Base64 is the Content-MD5 value of body.
func md5Base64(body [][]byte) string {
	h := md5.New()
	for _, p := range body {
		h.Write(p) // a hash.Hash never fails
	}
	return base64.StdEncoding.EncodeToString(h.Sum(nil))
}

// fallback is the mode of an auto store whose store does not verify
// CRC32C: over TLS the body is protected by the transport, so its SHA-256
// would be spent for nothing; over plain http the signature is then the
// only integrity check left.
func (s *Store) fallback() PayloadMode {
	if s.tls {
		return PayloadUnsigned
	}
	return PayloadSigned
}

// PayloadMode returns the mode Put uses now.
func (s *Store) PayloadMode() PayloadMode { return *s.payload.Load() }

// ProbePayloadChecksum decides the payload mode and returns it; call it
// once at start-up, before the store carries data (Puts made meanwhile use
// the safe fallback). For auto and for the forced checksum modes it writes
// probeName with a correct checksum, then with a deliberately wrong one,
// which a verifying store refuses, and deletes it. An auto store that does
// not verify CRC32C falls back (see PayloadAuto); a forced mode is kept
// whatever the probe finds, with a warning when the store does not verify.
// The error is for a probe that could not run (store unreachable, probe
// object not removable), not for a store that does not verify.
func (s *Store) ProbePayloadChecksum(ctx context.Context, probeName string) (PayloadMode, error) {
	var probe PayloadMode
	switch s.want {
	case PayloadAuto, PayloadCRC32C:
		probe = PayloadCRC32C
	case PayloadMD5:
		probe = PayloadMD5
	default:
		s.log.Info().Str("payload_mode", string(s.want)).Msg("upload payload mode set by configuration, not probed")
		return s.want, nil
	}
	verified, why, err := s.probeVerifies(ctx, probeName, probe)
	if err != nil {
		return s.PayloadMode(), err
	}
	mode := s.want
	switch {
	case verified && mode == PayloadAuto:
		mode = probe
		s.log.Info().Str("payload_mode", string(mode)).Msg("the store verifies x-amz-checksum-crc32c: uploads send UNSIGNED-PAYLOAD with a CRC32C instead of signing each body's SHA-256")
	case verified:
		s.log.Info().Str("payload_mode", string(mode)).Msg("the store verifies the upload checksum")
	case mode == PayloadAuto:
		mode = s.fallback()
		msg := "the store does not verify x-amz-checksum-crc32c: uploads sign each body's SHA-256 (set s3.payload_checksum = \"md5\" if the store verifies Content-MD5)"
		if mode == PayloadUnsigned {
			msg = "the store does not verify x-amz-checksum-crc32c: uploads are protected by TLS only"
		}
		s.log.Info().Str("payload_mode", string(mode)).Str("probe", why).Msg(msg)
	default:
		s.log.Warn().Str("payload_mode", string(mode)).Str("probe", why).Msg("the store does not verify the upload checksum of the configured s3.payload_checksum: a body damaged in transit would be stored as it arrives; use \"auto\" or \"signed\"")
	}
	s.payload.Store(&mode)
	return mode, nil
}

// refusal reports whether HTTP status st is a store's answer to the
// request itself (4xx, or 501 Not Implemented for a header it lacks), as
// opposed to a failure a later attempt might not meet.
func refusal(st int) bool {
	return (st >= 400 && st < 500) || st == http.StatusNotImplemented
}

// probeVerifies finds whether the store verifies the checksum of mode:
// a Put with the right checksum must succeed, one with a wrong checksum
// must be refused as a bad digest (HTTP 400) and leave the object as it
// was. why says what the store did when it does not verify.
func (s *Store) probeVerifies(ctx context.Context, probeName string, mode PayloadMode) (verified bool, why string, err error) {
	prefix := fmt.Sprintf("%s payload probe at %s", mode, s.endpoint)
	// A probe left by an earlier crash is simply overwritten, but delete
	// it first so the read-back below sees only this probe's object.
	if err := s.Delete(ctx, probeName); err != nil {
		return false, "", fmt.Errorf("%s: %w", prefix, err)
	}
	defer func() {
		if derr := s.Delete(ctx, probeName); derr != nil && err == nil {
			err = fmt.Errorf("%s: remove probe object: %w", prefix, derr)
		}
	}()
	good := []byte("bs3 payload checksum probe: this body carries its checksum")
	bad := []byte("bs3 payload checksum probe: this body does not match its checksum")
	if err := s.put(ctx, probeName, [][]byte{good}, false, mode, ""); err != nil {
		if st := httpStatus(err); refusal(st) {
			return false, fmt.Sprintf("a PUT with UNSIGNED-PAYLOAD and a correct checksum was refused with HTTP %d: %v", st, err), nil
		}
		return false, "", fmt.Errorf("%s: first write: %w", prefix, err)
	}
	wrong := crc32cBase64([][]byte{good})
	if mode == PayloadMD5 {
		wrong = md5Base64([][]byte{good})
	}
	perr := s.put(ctx, probeName, [][]byte{bad}, false, mode, wrong)
	switch st := httpStatus(perr); {
	case perr == nil:
		return false, "a PUT whose checksum did not match its body was accepted", nil
	case !refusal(st):
		return false, "", fmt.Errorf("%s: write with a wrong checksum: %w", prefix, perr)
	case st != http.StatusBadRequest && !errors.Is(perr, ErrChecksumMismatch):
		// Refused for another reason (throttled, forbidden, ...): that
		// proves nothing about verification, and the safe side is to
		// not rely on it.
		return false, fmt.Sprintf("a PUT whose checksum did not match its body was refused with HTTP %d, not as a bad digest (400): %v", st, perr), nil
	}
	buf := make([]byte, len(bad)+1)
	n, err := s.GetRange(ctx, probeName, 0, buf)
	if err != nil {
		return false, "", fmt.Errorf("%s: read back: %w", prefix, err)
	}
	if !bytes.Equal(buf[:n], good) {
		return false, "the store refused a PUT whose checksum did not match but changed the object anyway", nil
	}
	return true, "", nil
}
