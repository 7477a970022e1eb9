package shards

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/shardgate/shardgate/internal/versioning"
)

// Group commit. A write here is one statement that commits on its own (its
// data row, its outbox row and its partition's clock tick), and on a busy
// shard most of its cost is the transaction around it, not the statement:
// the commit record and its WAL flush, the snapshot, the round trip. So
// concurrent writes to a shard queue up, and a few flushers each take what
// is queued and send it as one pipelined batch, which PostgreSQL runs as one
// implicit transaction. A caller's write is acknowledged only after that
// transaction committed.
//
// Nobody waits for a batch to fill: a flusher takes whatever is queued when
// it is free, so a lone write runs at once, alone, exactly as before, and
// batches grow only while the flusher is busy. One flusher per shard makes
// the biggest batches and measured best; more start only while more writes
// are queued than the running flushers take in one batch each.
//
// Each write keeps its own guarantees, because each statement still runs
// with its own snapshot (READ COMMITTED) and takes its own locks: ownership
// fencing, versions above tombstones and floors, the per-partition tick
// order. What a batch adds is that it holds its locks until the whole batch
// commits, across partitions, which no lone write did. So a batch holds at
// most one write per partition and runs them in partition order, the order
// in which every statement that spans partitions (tombstone pruning, the
// session sweep) takes partition clocks; and only writes that lock nothing
// such a statement may hold before its clocks join a batch: the upserts
// (PutUser, PutItem) and CreateSession, whose rows are new or not ones the
// sweep or the pruner lock. TouchSession, RevokeSession and DeleteItem lock
// a session or tombstone row the sweep or the pruner may hold while it
// waits for a clock a batch holds, so they run alone (writeAlone): batched,
// they deadlocked with the sweep.
//
// If any statement of a batch fails, PostgreSQL rolls the whole batch back,
// and each of its writes runs again alone, so one bad write (or a version
// refused below a tombstone, which is retried) never fails its neighbours.
// If the connection is lost instead, the outcome is unknown, as it is for a
// single statement, and every write of the batch gets the error.

// Defaults of PoolOptions' group-commit settings.
const (
	defaultMaxWriteBatch = 32
)

// defaultWriteFlushers leaves half of a shard's pool to reads, and allows at
// least two, so one batch waiting for a lock does not stop the shard's
// writes (see flushStall).
func defaultWriteFlushers(maxConns int32) int { return max(2, int(maxConns)/2) }

// groupWrite is one caller's write waiting to be flushed.
type groupWrite struct {
	waiter
	partition int32
	sql       string
	args      []any
	scan      func(pgx.Row) error
}

// writeGroup queues a shard's writes for its flushers.
type writeGroup struct {
	flushQueue[*groupWrite]
	batches, writes, reruns atomic.Int64
}

// newWriteGroup makes s's write queue: at most one write per partition in
// a batch (see above).
func newWriteGroup(s *Shard, maxBatch, maxFlushers int) *writeGroup {
	g := &writeGroup{}
	g.flushQueue = flushQueue[*groupWrite]{
		maxBatch: maxBatch, maxFlushers: maxFlushers,
		fits: func(batch []*groupWrite, w *groupWrite) bool {
			return !slices.ContainsFunc(batch, func(b *groupWrite) bool { return b.partition == w.partition })
		},
		run:    s.flush,
		gaveUp: func(err error) error { return err },
	}
	return g
}

// WriteGroupStats counts what group commit did on a shard.
type WriteGroupStats struct {
	// Batches is the number of transactions flushed, Writes the writes they
	// carried (Writes/Batches is the mean batch size).
	Batches, Writes int64
	// Reruns counts writes run again alone after their batch failed.
	Reruns int64
}

// WriteGroupStats reports group commit's counters (zero when it is off).
func (s *Shard) WriteGroupStats() WriteGroupStats {
	if s == nil || s.group == nil {
		return WriteGroupStats{}
	}
	g := s.group
	return WriteGroupStats{Batches: g.batches.Load(), Writes: g.writes.Load(), Reruns: g.reruns.Load()}
}

// write runs one single-statement write to partition (sql with args; scan
// reads its one result row) and returns once it has committed or failed.
// With group commit on, it may share its transaction with other callers'
// writes. The statement must be safe to run again after a rollback, and
// lock no row that a statement spanning partitions may hold while it waits
// for a partition clock.
func (s *Shard) write(ctx context.Context, partition int32, sql string, args []any, scan func(pgx.Row) error) error {
	if s == nil || s.pool == nil {
		return &unavailableError{err: errNotOpen}
	}
	g := s.group
	if g == nil {
		return s.writeAlone(ctx, sql, args, scan)
	}
	return g.submit(&groupWrite{waiter: newWaiter(ctx), partition: partition, sql: sql, args: args, scan: scan})
}

// writeAlone runs one single-statement write as its own transaction, never
// in a batch (see above for which writes must not be batched).
func (s *Shard) writeAlone(ctx context.Context, sql string, args []any, scan func(pgx.Row) error) error {
	c, err := s.acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	return runAlone(ctx, c, sql, args, scan)
}

// flush runs one batch and sets its writes' outcomes.
func (s *Shard) flush(batch []*groupWrite) {
	g := s.group
	g.batches.Add(1)
	g.writes.Add(int64(len(batch)))
	// Partition order: see above.
	slices.SortFunc(batch, func(a, b *groupWrite) int { return int(a.partition) - int(b.partition) })
	ctx, cancel := batchContext(batch)
	defer cancel()
	c, err := s.acquire(ctx)
	if err != nil {
		for _, w := range batch {
			w.err = err
		}
		return
	}
	defer c.Release()
	if len(batch) == 1 {
		w := batch[0]
		w.err = runAlone(w.ctx, c, w.sql, w.args, w.scan)
		return
	}
	if !runBatch(ctx, c, batch) {
		return
	}
	// PostgreSQL refused a statement and rolled the batch back: run each
	// write alone, so each gets its own outcome.
	g.reruns.Add(int64(len(batch)))
	for _, w := range batch {
		w.err = runAlone(w.ctx, c, w.sql, w.args, w.scan)
	}
}

// runBatch sends the batch as one pipeline (one implicit transaction) and
// sets each write's error. It reports whether PostgreSQL refused a
// statement, which means the batch was rolled back and may run again.
func runBatch(ctx context.Context, c *pgxpool.Conn, batch []*groupWrite) (rolledBack bool) {
	b := &pgx.Batch{}
	for _, w := range batch {
		b.Queue(w.sql, w.args...)
	}
	br := c.SendBatch(ctx, b)
	for _, w := range batch {
		w.err = w.scan(br.QueryRow())
	}
	closeErr := br.Close()
	var pg *pgconn.PgError
	for _, w := range batch {
		if errors.As(w.err, &pg) {
			rolledBack = true
		}
	}
	if errors.As(closeErr, &pg) {
		rolledBack = true
	}
	if rolledBack || closeErr == nil {
		return rolledBack
	}
	// The commit's outcome is unknown (the connection failed): say so to
	// every write, as a lone statement would.
	for _, w := range batch {
		if w.err == nil {
			w.err = closeErr
		}
	}
	return false
}

// runAlone runs one write as its own statement, again if it was refused
// below a tombstone that committed while it ran.
func runAlone(ctx context.Context, c *pgxpool.Conn, sql string, args []any, scan func(pgx.Row) error) error {
	return versioning.RetryBelowTombstone(func() error {
		return scan(c.QueryRow(ctx, sql, args...))
	})
}
