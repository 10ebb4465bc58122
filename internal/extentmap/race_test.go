//go:build race

package extentmap

// raceEnabled trims the randomized tests: the map has no concurrency for
// the race detector to check, and it slows them tenfold.
const raceEnabled = true
