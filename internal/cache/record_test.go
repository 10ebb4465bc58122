package cache

import "fmt"

// Whole-record forms of the disk tier's record codec, for tests and
// benchmarks: the tier itself writes a record's header and data into its
// stage separately and reads them with one preadv (disk.go).

// sealWindow is the encrypted record of window k: the header, then the
// data sealed with the header as associated data.
func sealWindow(s Sealer, k Key, win int64, data []byte) ([]byte, error) {
	return sealWindowTo(make([]byte, 0, headerFixed+len(k.Volume)+len(data)+s.Overhead()), s, k, win, data)
}

// encodeWindow is the plaintext record of window k.
func encodeWindow(k Key, win int64, data []byte) []byte {
	return append(windowHeader(k, win, data), data...)
}

// decodeWindow checks a whole plaintext record against the key it was
// looked up by and returns its data.
func decodeWindow(raw []byte, k Key, win int64) ([]byte, error) {
	_, h, ok := plainSplit(int64(len(raw)), len(k.Volume), win)
	if !ok {
		return nil, fmt.Errorf("record of %d bytes cannot hold a window of volume %s (window size %d)", len(raw), k.Volume, win)
	}
	if err := checkWindow(raw[:h], raw[h:], k, win); err != nil {
		return nil, err
	}
	return raw[h:], nil
}
