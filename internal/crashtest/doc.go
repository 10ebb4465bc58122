// Package crashtest holds bs3's crash-safety tests: a writer process
// killed with SIGKILL at random moments against a real MinIO, MinIO
// outages, damaged checkpoints and two engines attached to one volume.
// Each test checks what the device must hold afterwards against a log of
// the writes issued, acknowledged and flushed (docs/ARCHITECTURE.md §4–§5).
//
// It owns nothing but tests: it has no exported API, must never be
// imported, and never changes the packages it exercises.
package crashtest
