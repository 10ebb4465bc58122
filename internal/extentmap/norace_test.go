//go:build !race

package extentmap

const raceEnabled = false
