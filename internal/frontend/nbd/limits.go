package nbd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	"golang.org/x/sync/semaphore"
)

// budget bounds the bytes of request payloads held in memory by all
// connections of a server. Waiters are served in arrival order, so a
// large request is not starved by a stream of small ones.
type budget struct {
	limit int64
	sem   *semaphore.Weighted
	// used and peak count the bytes really held, which exceed limit only
	// while a single request larger than the limit runs alone.
	used, peak atomic.Int64
}

func newBudget(limit int64) *budget {
	return &budget{limit: limit, sem: semaphore.NewWeighted(limit)}
}

// acquire takes n bytes, waiting while that would exceed the limit. A
// request larger than the whole limit takes all of it: it waits until
// nothing else is held and then runs alone, so it is served rather than
// deadlocked. It fails only when ctx ends.
func (b *budget) acquire(ctx context.Context, n int64) error {
	if err := b.sem.Acquire(ctx, min(n, b.limit)); err != nil {
		return fmt.Errorf("wait for %d bytes of payload budget: %w", n, err)
	}
	b.note(b.used.Add(n))
	return nil
}

// tryAcquire is acquire when the bytes are free now; it never waits.
func (b *budget) tryAcquire(n int64) bool {
	if !b.sem.TryAcquire(min(n, b.limit)) {
		return false
	}
	b.note(b.used.Add(n))
	return true
}

// note records u bytes held as the peak if it is one.
func (b *budget) note(u int64) {
	for {
		p := b.peak.Load()
		if u <= p || b.peak.CompareAndSwap(p, u) {
			return
		}
	}
}

// release returns n bytes taken by acquire or tryAcquire.
func (b *budget) release(n int64) {
	b.used.Add(-n)
	b.sem.Release(min(n, b.limit))
}

// errRefused ends the negotiation of a connection over the limit.
var errRefused = errors.New("connection refused: max_connections reached")

// maxRefusedOptions bounds how many options a refused client gets answers
// to before it is disconnected.
const maxRefusedOptions = 16

// refuse serves a connection over MaxConnections: every option that can
// carry an error gets NBD_REP_ERR_POLICY with a message a client can show
// (NBD_OPT_GO is the one that matters), NBD_OPT_EXPORT_NAME, which cannot
// carry one, is answered by closing, and the handshake deadline bounds
// the whole exchange.
func (c *conn) refuse() {
	defer c.s.untrack(c)
	defer c.closeConn()
	c.log.Warn().Int("max_connections", c.s.maxConns).Msg("connection refused: max_connections reached")
	err := c.refuseNegotiation()
	switch {
	case errors.Is(err, errAbort), errors.Is(err, errRefused):
		c.log.Debug().Err(err).Msg("refused connection ended")
	case errors.Is(err, os.ErrDeadlineExceeded) && !c.stopping.Load():
		c.log.Debug().Dur("handshake_timeout_ms", c.s.handshakeTimeout).Msg("refused connection timed out")
	default:
		c.log.Debug().Err(err).Msg("refused connection ended")
	}
}

func (c *conn) refuseNegotiation() error {
	msg := []byte(fmt.Sprintf("bs3: too many connections (max_connections = %d); try again later", c.s.maxConns))
	fixed, _, err := c.greet()
	if err != nil {
		return err
	}
	for range maxRefusedOptions {
		opt, _, err := c.readOption()
		if err != nil {
			return err
		}
		switch {
		case !fixed || opt == optExportName:
			// Neither can receive an error reply: closing is the answer.
			return errRefused
		case opt == optAbort:
			if err := c.optReply(opt, repAck, nil); err != nil {
				c.log.Debug().Err(err).Msg("ack abort")
			}
			return errAbort
		default:
			if err := c.optReply(opt, repErrPolicy, msg); err != nil {
				return err
			}
		}
	}
	return fmt.Errorf("%w; %d options answered, closing", errRefused, maxRefusedOptions)
}
