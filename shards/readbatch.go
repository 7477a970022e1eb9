package shards

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Read batching. A point read (GetUser, GetItem) is one index lookup, and on
// a busy shard most of its cost is around it: a round trip, a statement's
// bind and execute, a backend woken up, a pooled connection handed over.
// So concurrent point reads of one kind queue per shard, and flushers
// each take what is queued and answer it with one statement over arrays of
// keys. Like group commit (groupcommit.go) nobody waits for a batch to
// fill: a flusher takes what is queued when it is free, so a lone read runs
// at once, alone, with the single-key statement, and batches grow only
// while every flusher is busy.
//
// A batched read keeps the single read's guarantee: one statement reads the
// partition's ownership state and the row under one snapshot, for every key
// of the batch, so a key is answered only from a partition that was owned or
// frozen when its row was read (see doc.go, Fencing).
//
// The queue and its flushers are group commit's (flushQueue): one flusher
// per kind runs while it keeps up, which measured best (get-user 18% faster
// than with two in three alternating rounds), and another starts when
// reads queue past a batch or a statement is held up (flushStall).

// Defaults of PoolOptions' read-batching settings.
const defaultMaxReadBatch = 32

// defaultReadFlushers caps a kind's flushers at half the pool, like the
// write flushers, and at least two, so that one statement held up does not
// hold up every read of the shard.
func defaultReadFlushers(maxConns int32) int { return max(2, int(maxConns)/2) }

// pendingRead is one caller's point read waiting for a flusher.
type pendingRead[K, R any] struct {
	waiter
	key K
	res R
}

// readGroup queues one kind of point read for a shard's read flushers.
type readGroup[K, R any] struct {
	flushQueue[*pendingRead[K, R]]
	s  *Shard
	op string // for errors: "get user"
	// one answers a single read; many answers a batch of two or more,
	// setting each read's res and err. Either may return an error that
	// then goes to every read it was given.
	one  func(ctx context.Context, c *pgxpool.Conn, r *pendingRead[K, R]) error
	many func(ctx context.Context, c *pgxpool.Conn, batch []*pendingRead[K, R]) error

	stats *readStats
}

// newReadGroup makes one kind's read queue on s.
func newReadGroup[K, R any](s *Shard, op string, maxBatch, maxFlushers int,
	one func(context.Context, *pgxpool.Conn, *pendingRead[K, R]) error,
	many func(context.Context, *pgxpool.Conn, []*pendingRead[K, R]) error) *readGroup[K, R] {
	g := &readGroup[K, R]{s: s, op: op, one: one, many: many, stats: s.reads}
	g.flushQueue = flushQueue[*pendingRead[K, R]]{
		maxBatch: maxBatch, maxFlushers: maxFlushers,
		run:    g.flush,
		gaveUp: func(err error) error { return s.wrap(op, err) },
	}
	return g
}

// readStats counts what read batching did on a shard, over all kinds.
type readStats struct{ batches, reads atomic.Int64 }

// ReadBatchStats counts read batching's statements on a shard.
type ReadBatchStats struct {
	// Batches is the number of statements that answered two or more point
	// reads, Reads the reads they answered.
	Batches, Reads int64
}

// ReadBatchStats reports read batching's counters (zero when it is off).
func (s *Shard) ReadBatchStats() ReadBatchStats {
	if s == nil || s.reads == nil {
		return ReadBatchStats{}
	}
	return ReadBatchStats{Batches: s.reads.batches.Load(), Reads: s.reads.reads.Load()}
}

// read queues a point read and waits for its answer, or for ctx.
func (g *readGroup[K, R]) read(ctx context.Context, key K) (R, error) {
	r := &pendingRead[K, R]{waiter: newWaiter(ctx), key: key}
	err := g.submit(r)
	return r.res, err
}

// flush answers one batch.
func (g *readGroup[K, R]) flush(batch []*pendingRead[K, R]) {
	ctx, cancel := batchContext(batch)
	defer cancel()
	c, err := g.s.acquire(ctx)
	if err == nil {
		if len(batch) == 1 {
			err = g.one(ctx, c, batch[0])
		} else {
			g.stats.batches.Add(1)
			g.stats.reads.Add(int64(len(batch)))
			err = g.many(ctx, c, batch)
		}
		c.Release()
	}
	if err != nil {
		for _, r := range batch {
			r.err = g.s.wrap(g.op, err)
		}
	}
}

// answerRows reads a batched statement's rows: each is scanned into dest,
// whose first element is the *int64 the key's number (from 1) goes to, and
// answer is called with that key's index in the batch. Every key must be
// answered exactly once.
func answerRows(rows pgx.Rows, n int, dest []any, answer func(k int)) error {
	defer rows.Close()
	seen := make([]bool, n)
	answered := 0
	for rows.Next() {
		if err := rows.Scan(dest...); err != nil {
			return err
		}
		i := *dest[0].(*int64)
		if i < 1 || i > int64(n) || seen[i-1] {
			return fmt.Errorf("batched read: key %d of %d answered twice or out of range", i, n)
		}
		seen[i-1] = true
		answered++
		answer(int(i - 1))
	}
	if err := rows.Err(); err != nil {
		return err
	}
	if answered != n {
		return fmt.Errorf("batched read answered %d of %d keys", answered, n)
	}
	return nil
}

// noOwnerRow is the error fencedRead expects when a partition has no
// ownership row: a batched read sees a NULL state where a single read sees
// no row.
func noOwnerRow(state pgtype.Text) error {
	if !state.Valid {
		return pgx.ErrNoRows
	}
	return nil
}
