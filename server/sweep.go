package server

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shardgate/shardgate/internal/versioning"
	"github.com/shardgate/shardgate/shards"
)

// sweepBatchTimeout bounds one sweep or prune batch, so a shard that hangs
// (say its host vanished) holds up its own sweep only, and only until then.
const sweepBatchTimeout = 30 * time.Second

// DefaultTombstoneRetention is Options.TombstoneRetention's default.
const DefaultTombstoneRetention = 7 * 24 * time.Hour

// startSweeper runs the session sweeper, and the tombstone pruner with it,
// every SweepInterval until ctx ends or Close stops it. Called once, by New.
func (s *Server) startSweeper(ctx context.Context) {
	if s.opts.SweepInterval <= 0 {
		return
	}
	ctx, s.stopSweep = context.WithCancel(ctx)
	s.sweepDone = make(chan struct{})
	go func() {
		defer close(s.sweepDone)
		t := time.NewTicker(s.opts.SweepInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			s.sweepShards(ctx)
		}
	}()
}

// stopSweeper stops the sweeper and waits for it to be gone.
func (s *Server) stopSweeper() {
	if s.stopSweep != nil {
		s.stopSweep()
		<-s.sweepDone
	}
}

// sweepShards sweeps every shard the server has open, and prunes their
// tombstones and the catalog's, all at once, so a database that is down or
// slow delays only its own sweep.
func (s *Server) sweepShards(ctx context.Context) {
	s.mu.RLock()
	pools := make(map[string]*shards.Shard, len(s.shards))
	for name, p := range s.shards {
		pools[name] = p.sh
	}
	s.mu.RUnlock()
	var wg sync.WaitGroup
	for name, sh := range pools {
		wg.Go(func() {
			s.sweepShard(ctx, name, sh)
			s.pruneShard(ctx, name, sh)
		})
	}
	wg.Go(func() { s.pruneCatalog(ctx) })
	wg.Wait()
}

// sweepShard deletes the shard's expired sessions.
func (s *Server) sweepShard(ctx context.Context, name string, sh *shards.Shard) {
	s.drain(ctx, batchJob{
		what: "session sweep", rows: "sessions", db: []any{"shard", name}, limit: shards.DefaultSweepLimit,
		batch: func(ctx context.Context) (int, error) {
			n, err := sh.SweepExpiredSessions(ctx, shards.DefaultSweepLimit)
			if n > 0 {
				s.wake(name) // each swept session has its delete event
			}
			return n, err
		},
		done: &s.sessionsSwept, failed: &s.sweepErrors,
	})
}

// pruneShard deletes the shard's tombstones older than TombstoneRetention.
func (s *Server) pruneShard(ctx context.Context, name string, sh *shards.Shard) {
	s.prune(ctx, []any{"shard", name}, func(ctx context.Context) (int, error) {
		return sh.PruneTombstones(ctx, s.opts.TombstoneRetention, versioning.DefaultPruneLimit)
	})
}

// pruneCatalog deletes the config tombstones older than TombstoneRetention.
func (s *Server) pruneCatalog(ctx context.Context) {
	s.prune(ctx, []any{"catalog", "catalog"}, func(ctx context.Context) (int, error) {
		return s.catalog.PruneConfigTombstones(ctx, s.opts.TombstoneRetention, versioning.DefaultPruneLimit)
	})
}

func (s *Server) prune(ctx context.Context, db []any, batch func(context.Context) (int, error)) {
	if s.opts.TombstoneRetention < 0 {
		return
	}
	s.drain(ctx, batchJob{
		what: "tombstone prune", rows: "tombstones", db: db, limit: versioning.DefaultPruneLimit,
		batch: batch, done: &s.tombstonesPruned, failed: &s.pruneErrors,
	})
}

// batchJob is a sweep or a prune of one database, in batches of up to
// limit rows.
type batchJob struct {
	what, rows   string // for the logs: "session sweep", "sessions"
	db           []any  // log attributes naming the database
	limit        int
	batch        func(context.Context) (int, error)
	done, failed *atomic.Int64 // rows deleted, batches failed
}

// drain runs j's batches while they come back full, a pause apart. A failed
// batch is logged and counted, and the database is tried again next round.
// A batch that finds another instance at work comes back empty: that
// instance finishes the job.
func (s *Server) drain(ctx context.Context, j batchJob) {
	total := 0
	defer func() {
		if total > 0 {
			s.opts.Logger.Debug(j.what+" done", slices.Concat(j.db, []any{j.rows, total})...)
		}
	}()
	for ctx.Err() == nil {
		bctx, cancel := context.WithTimeout(ctx, sweepBatchTimeout)
		n, err := j.batch(bctx)
		cancel()
		total += n
		j.done.Add(int64(n))
		switch {
		case err != nil && (ctx.Err() != nil || shards.IsClosed(err)):
			// Stopping, or the pool was replaced (its successor is swept
			// next round): nothing went wrong.
			return
		case err != nil:
			j.failed.Add(1)
			// The error names the database and the cause, never a password.
			s.opts.Logger.Warn(j.what+" failed; retrying next round", slices.Concat(j.db, []any{"err", err})...)
			return
		case n < j.limit:
			return
		}
		batchPause(ctx)
	}
}

// batchPauseTime separates full sweep and prune batches. A batch holds the
// outbox clocks of every partition it touched until it commits, so writers
// of those partitions queue behind it, and with batches back to back a
// create that had to retry behind one would queue behind the next (about 1%
// of creates fail while a 200,000-tombstone backlog is pruned that way).
// The pause gives them their turn; a backlog still clears at up to 1000
// rows per pause.
const batchPauseTime = 50 * time.Millisecond

func batchPause(ctx context.Context) {
	select {
	case <-ctx.Done():
	case <-time.After(batchPauseTime):
	}
}
