package gc

import (
	"sync/atomic"
	"time"
)

// Kind names a kind of GC run in Totals.
type Kind int

// The kinds of run; NumKinds bounds them.
const (
	KindDead Kind = iota
	KindThreshold
	KindDefrag
	NumKinds = int(KindDefrag) + 1
)

func (k Kind) String() string {
	switch k {
	case KindDead:
		return "dead"
	case KindThreshold:
		return "threshold"
	case KindDefrag:
		return "defrag"
	}
	return "unknown"
}

// RunTotals counts the runs of one kind since the collector was made.
type RunTotals struct {
	Runs, Failed int64 // runs finished, and those that ended in an error
	Seconds      float64
}

// Totals are the collector's cumulative counters, for the metrics export.
// Each dead pass counts its own reclaiming, including the one that ends a
// threshold or defragmentation run; those runs count their copying.
type Totals struct {
	Runs [NumKinds]RunTotals
	// Reclaimed: objects deleted; Placeholders: dead objects emptied
	// (written as placeholders); BytesFreed: the bytes those held.
	Reclaimed, Placeholders, BytesFreed int64
	// Compacted: objects whose live data was copied; BytesRead and
	// BytesCopied: data read for it and written into new objects.
	Compacted, BytesRead, BytesCopied int64
	// Running: a threshold or defragmentation run is going.
	Running bool
}

type totals struct {
	runs   [NumKinds]struct{ n, failed, nanos atomic.Int64 }
	counts [6]atomic.Int64 // indexed by the t* constants below
}

const (
	tReclaimed = iota
	tPlaceholders
	tBytesFreed
	tCompacted
	tBytesRead
	tBytesCopied
)

// record counts a finished run of kind k. Of a threshold or
// defragmentation run only the copying counts: its final dead pass was
// counted by CollectDead.
func (t *totals) record(k Kind, st Stats, err error) {
	r := &t.runs[k]
	r.n.Add(1)
	if err != nil {
		r.failed.Add(1)
	}
	r.nanos.Add(int64(st.Duration))
	if k == KindDead {
		t.counts[tReclaimed].Add(st.Reclaimed)
		t.counts[tPlaceholders].Add(st.Placeholders)
		t.counts[tBytesFreed].Add(st.BytesFreed)
		return
	}
	t.counts[tCompacted].Add(st.Compacted)
	t.counts[tBytesRead].Add(st.BytesRead)
	t.counts[tBytesCopied].Add(st.BytesWritten)
}

// Totals returns the cumulative counters of the collector's runs.
func (c *Collector) Totals() Totals {
	t := &c.totals
	var out Totals
	for k := range out.Runs {
		r := &t.runs[k]
		out.Runs[k] = RunTotals{Runs: r.n.Load(), Failed: r.failed.Load(), Seconds: time.Duration(r.nanos.Load()).Seconds()}
	}
	out.Reclaimed = t.counts[tReclaimed].Load()
	out.Placeholders = t.counts[tPlaceholders].Load()
	out.BytesFreed = t.counts[tBytesFreed].Load()
	out.Compacted = t.counts[tCompacted].Load()
	out.BytesRead = t.counts[tBytesRead].Load()
	out.BytesCopied = t.counts[tBytesCopied].Load()
	out.Running = c.Running()
	return out
}
