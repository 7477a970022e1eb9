package shards

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

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
// One flusher per kind runs while it keeps up: it makes the biggest
// batches, and measured best (get-user 18% faster than with two in three
// alternating rounds). Another starts only while more reads are queued
// than the running ones take in one batch each, or when no batch has
// finished for readStall (a statement held up must not hold up every read
// of the shard).

// Defaults of PoolOptions' read-batching settings.
const defaultMaxReadBatch = 32

// defaultReadFlushers caps a kind's flushers at half the pool, like the
// write flushers, and at least two, so that one statement held up does not
// hold up every read of the shard.
func defaultReadFlushers(maxConns int32) int { return max(2, int(maxConns)/2) }

// pendingRead is one caller's point read waiting for a flusher.
type pendingRead[K, R any] struct {
	ctx  context.Context
	key  K
	res  R
	err  error
	done chan struct{}
}

// readGroup queues one kind of point read for a shard's read flushers.
type readGroup[K, R any] struct {
	s                     *Shard
	op                    string // for errors: "get user"
	maxFlushers, maxBatch int
	// one answers a single read; many answers a batch of two or more,
	// setting each read's res and err. Either may return an error that
	// then goes to every read it was given.
	one  func(ctx context.Context, c *pgxpool.Conn, r *pendingRead[K, R]) error
	many func(ctx context.Context, c *pgxpool.Conn, batch []*pendingRead[K, R]) error

	mu       sync.Mutex
	queue    []*pendingRead[K, R]
	flushers int
	progress time.Time // when a flusher last started or finished a batch

	stats *readStats
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
	r := &pendingRead[K, R]{ctx: ctx, key: key, done: make(chan struct{})}
	g.mu.Lock()
	g.queue = append(g.queue, r)
	if g.flushers == 0 || (g.flushers < g.maxFlushers && len(g.queue) > g.flushers*g.maxBatch) {
		g.startFlusher()
	}
	g.mu.Unlock()
	stall := time.NewTimer(readStall)
	defer stall.Stop()
	for {
		select {
		case <-r.done:
			return r.res, r.err
		case <-ctx.Done():
			if g.remove(r) {
				var zero R
				return zero, g.s.wrap(g.op, ctx.Err())
			}
			<-r.done // a flusher has it: wait for its answer
			return r.res, r.err
		case <-stall.C:
			g.unstall(r)
			stall.Reset(readStall)
		}
	}
}

// readStall is how long the read flushers may go without finishing a batch
// while reads wait before another flusher starts.
const readStall = 20 * time.Millisecond

// startFlusher starts one more flusher; g.mu is held.
func (g *readGroup[K, R]) startFlusher() {
	g.flushers++
	g.progress = time.Now()
	go g.flushLoop()
}

// unstall starts another flusher if r is still queued and no batch has
// finished for readStall.
func (g *readGroup[K, R]) unstall(r *pendingRead[K, R]) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.flushers < g.maxFlushers && time.Since(g.progress) >= readStall && slices.Contains(g.queue, r) {
		g.startFlusher()
	}
}

// remove takes r out of the queue if no flusher has taken it yet.
func (g *readGroup[K, R]) remove(r *pendingRead[K, R]) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if i := slices.Index(g.queue, r); i >= 0 {
		g.queue = slices.Delete(g.queue, i, i+1)
		return true
	}
	return false
}

// flushLoop answers batches until the queue is empty.
func (g *readGroup[K, R]) flushLoop() {
	for {
		batch := g.take()
		if batch == nil {
			return
		}
		g.flush(batch)
		g.mu.Lock()
		g.progress = time.Now()
		g.mu.Unlock()
	}
}

// take removes up to maxBatch of the oldest reads from the queue, finishing
// those whose caller gave up. nil when the queue is empty, in which case the
// calling flusher is done.
func (g *readGroup[K, R]) take() []*pendingRead[K, R] {
	g.mu.Lock()
	defer g.mu.Unlock()
	var batch []*pendingRead[K, R]
	n := 0
	for _, r := range g.queue {
		if len(batch) == g.maxBatch {
			break
		}
		n++
		if err := r.ctx.Err(); err != nil {
			r.err = g.s.wrap(g.op, err)
			close(r.done)
			continue
		}
		batch = append(batch, r)
	}
	rest := copy(g.queue, g.queue[n:])
	clear(g.queue[rest:])
	g.queue = g.queue[:rest]
	if len(batch) == 0 {
		g.flushers--
		return nil
	}
	return batch
}

// flush answers one batch and wakes its callers.
func (g *readGroup[K, R]) flush(batch []*pendingRead[K, R]) {
	defer func() {
		for _, r := range batch {
			close(r.done)
		}
	}()
	ctx, cancel := batchContext(batch, func(r *pendingRead[K, R]) context.Context { return r.ctx })
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
