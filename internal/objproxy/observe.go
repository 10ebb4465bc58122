package objproxy

import (
	"context"
	"errors"
	"time"

	"github.com/bs3/bs3/internal/store"
)

// Op is a store operation as an Observer sees it. It is an alias, so the
// proxy's internals keep their short unexported name.
type Op = op

// The operations reported to an Observer; NumOps bounds their values, so
// an observer can index arrays by them.
const (
	OpPut    = opPut
	OpGet    = opGet
	OpDelete = opDelete
	OpSize   = opSize
	OpList   = opList
	NumOps   = int(numOps)
)

// Outcome is how one store call (attempt) ended.
type Outcome uint8

// The outcomes of a store call; NumOutcomes bounds their values.
const (
	// OutcomeOK: the call succeeded.
	OutcomeOK Outcome = iota
	// OutcomeNotFound: the object does not exist (a final answer).
	OutcomeNotFound
	// OutcomeExists: a conditional put found the name taken (final).
	OutcomeExists
	// OutcomeError: any other error; the proxy retries it.
	OutcomeError
	// OutcomeCanceled: the caller's context ended during the call.
	OutcomeCanceled
	NumOutcomes = int(OutcomeCanceled) + 1
)

func (o Outcome) String() string {
	switch o {
	case OutcomeOK:
		return "ok"
	case OutcomeNotFound:
		return "not_found"
	case OutcomeExists:
		return "exists"
	case OutcomeError:
		return "error"
	case OutcomeCanceled:
		return "canceled"
	}
	return "unknown"
}

// Observer hears of every store call the proxy makes (each attempt of a
// request, retries included), for the metrics export. It is called on the
// proxy's workers, so it must be cheap and never block.
type Observer interface {
	// StoreCall reports one call: its operation and outcome, the bytes
	// it moved when it succeeded (the body of a put, the bytes a ranged
	// get read; 0 otherwise) and how long it took.
	StoreCall(op Op, outcome Outcome, bytes int, took time.Duration)
}

// outcomeOf classifies the error of one call made for a request whose
// context is ctx.
func outcomeOf(ctx context.Context, err error) Outcome {
	switch {
	case err == nil:
		return OutcomeOK
	case errors.Is(err, store.ErrNotFound):
		return OutcomeNotFound
	case errors.Is(err, store.ErrExists):
		return OutcomeExists
	case ctx.Err() != nil:
		return OutcomeCanceled
	}
	return OutcomeError
}

// observe reports the call just made for r, if an Observer is set.
func (p *Proxy) observe(r *request, err error, took time.Duration) {
	if p.o.Observer == nil {
		return
	}
	n := 0
	if err == nil {
		switch r.op {
		case opPut:
			n = r.putLen()
		case opGet:
			n = r.n
		}
	}
	p.o.Observer.StoreCall(r.op, outcomeOf(r.ctx, err), n, took)
}

// PoolStats is the state of one worker pool at one moment.
type PoolStats struct {
	// Workers is the pool size; Running the store calls in progress.
	Workers, Running int
	// QueuedHigh and QueuedLow are the requests waiting for a worker,
	// by priority (requests whose caller gave up are not counted).
	QueuedHigh, QueuedLow int
	// RetryWaiting is the requests waiting out a backoff before a retry.
	RetryWaiting int
}

// Pools returns the state of the uploader pool (Put, Delete) and the
// downloader pool (GetRange, Size, List).
func (p *Proxy) Pools() (upload, download PoolStats) {
	return p.up.stats(), p.down.stats()
}

func (pl *pool) stats() PoolStats {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return PoolStats{
		Workers:      pl.workers,
		Running:      int(pl.running.Load()),
		QueuedHigh:   pl.high.len() - pl.stale[High],
		QueuedLow:    pl.low.len() - pl.stale[Low],
		RetryWaiting: len(pl.waiting),
	}
}
