package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// Routing execution: the shard pools that follow the topology, and running
// a call on the shard that owns its partition, retrying on the new owner
// when a shard answers "wrong shard".

// shardPool is an open shard and the catalog DSN it was opened from.
type shardPool struct {
	dsn   string
	sh    *shards.Shard
	query prometheus.Observer // the shard's query latencies
}

// poolRetireDelay is how long a replaced or removed pool stays open, so
// calls that picked it just before the switch still finish on it.
const poolRetireDelay = 30 * time.Second

// retire closes sh after poolRetireDelay. Called with s.mu held.
func (s *Server) retire(sh *shards.Shard) {
	s.retiring = append(s.retiring, sh)
	time.AfterFunc(poolRetireDelay, func() {
		sh.Close()
		s.mu.Lock()
		defer s.mu.Unlock()
		s.retiring = slices.DeleteFunc(s.retiring, func(r *shards.Shard) bool { return r == sh })
	})
}

// syncPools makes the pools match topo before the router switches to it:
// it opens a pool for each new shard, reopens one whose DSN changed (a
// failover to a new primary) and closes those of shards that left. A shard
// whose pool cannot be opened (its DSN references an unset variable) is
// logged and left out: its partitions answer Unavailable, the rest of the
// new map still takes effect.
func (s *Server) syncPools(ctx context.Context, topo catalog.Topology) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("server is closed")
	}
	keep := make(map[string]bool, len(topo.Shards))
	relayDSNs := make(map[string]string, len(topo.Shards))
	defer func() {
		s.relayDSNs = relayDSNs
		if s.relays != nil {
			s.relays.Sync(maps.Clone(relayDSNs))
		}
	}()
	for _, rec := range topo.Shards {
		keep[rec.Name] = true
		dsn, err := catalog.ExpandDSN(rec.DSN)
		if err == nil {
			relayDSNs[rec.Name] = dsn
		} else if prev, ok := s.relayDSNs[rec.Name]; ok {
			// Like the pool below, the relay keeps the DSN that worked:
			// stopping it would leave the outbox filling unpublished.
			relayDSNs[rec.Name] = prev
		}
		old, ok := s.shards[rec.Name]
		if ok && old.dsn == rec.DSN {
			continue
		}
		var sh *shards.Shard
		if err == nil {
			sh, err = shards.Open(ctx, rec.Name, dsn, s.opts.ShardPool)
		}
		if err != nil {
			// With an old pool, keep it rather than none.
			s.opts.Logger.Error("cannot open shard pool", "shard", rec.Name, "kept_old_pool", ok, "err", err)
			continue
		}
		s.shards[rec.Name] = shardPool{dsn: rec.DSN, sh: sh, query: s.observer.shardQuery.WithLabelValues(rec.Name)}
		if ok {
			s.opts.Logger.Info("shard DSN changed; pool reopened", "shard", rec.Name)
			s.retire(old.sh)
		}
	}
	for name, p := range s.shards {
		if !keep[name] {
			delete(s.shards, name)
			s.shardRemoved(name)
			s.retire(p.sh)
		}
	}
	return nil
}

func (s *Server) shard(name string) (*shards.Shard, bool) {
	p, ok := s.pool(name)
	return p.sh, ok
}

func (s *Server) pool(name string) (shardPool, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	p, ok := s.shards[name]
	return p, ok
}

// errNoTable is returned before the first topology load (never after New).
var errNoTable = errors.New("no routing table loaded")

// maxMoveBackoff caps the pause between retries of a call that found its
// partition frozen. Each retry costs the shard a refused statement and
// (shared among waiting calls) a topology version check.
const maxMoveBackoff = 10 * time.Millisecond

// onPartition runs fn on the shard that owns partition p. When the shard
// answers ErrWrongShard (this router's map is stale, or the partition is
// frozen for a move), it reloads the map and retries on the owner, backing
// off a little more each time, for at most MoveWait.
func (s *Server) onPartition(ctx context.Context, p int32, fn func(*shards.Shard) error) error {
	_, err := s.onOwner(ctx, p, fn)
	return err
}

// onPartitionWrite is onPartition for a write: once fn succeeded, the
// relay of the shard it wrote to is woken for partition p (its event is in
// the outbox).
func (s *Server) onPartitionWrite(ctx context.Context, p int32, fn func(*shards.Shard) error) error {
	shard, err := s.onOwner(ctx, p, fn)
	if err == nil {
		if w := s.waker.Load(); w != nil {
			w.WakePartition(shard, p)
		}
	}
	return err
}

// onUserWrite is onUser for a write (see onPartitionWrite).
func (s *Server) onUserWrite(ctx context.Context, userID string, fn func(sh *shards.Shard, p int32) error) error {
	p, err := s.userPartition(userID)
	if err != nil {
		return err
	}
	return s.onPartitionWrite(ctx, p, func(sh *shards.Shard) error { return fn(sh, p) })
}

// userPartition is userID's partition.
func (s *Server) userPartition(userID string) (int32, error) {
	t := s.router.Table()
	if t == nil {
		return 0, errNoTable
	}
	return router.Partition(userID, t.PartitionCount()), nil
}

// onOwner is onPartition, also naming the shard fn ran on last.
func (s *Server) onOwner(ctx context.Context, p int32, fn func(*shards.Shard) error) (string, error) {
	backoff := time.Millisecond
	giveUp := time.Now().Add(s.opts.MoveWait)
	attempt := 0
	for {
		t := s.router.Table()
		if t == nil {
			return "", errNoTable
		}
		name := t.Owner(p)
		pool, ok := s.pool(name)
		if !ok {
			if s.router.Table() != t {
				continue // the map changed under us
			}
			return name, fmt.Errorf("shard %s: %w", name, errShardNotOpen)
		}
		sh := pool.sh
		attempt++
		var span trace.Span
		if s.tracer != nil {
			var traced bool
			if _, span, traced = s.startSpan(ctx, "shard.query"); traced {
				span.SetAttributes(attrShard.String(name), attrPartition.Int(int(p)), attrAttempt.Int(attempt))
			}
		}
		start := time.Now()
		err := fn(sh)
		pool.query.Observe(time.Since(start).Seconds())
		if span != nil {
			endSpan(span, err)
		}
		if shards.IsClosed(err) && time.Now().Before(giveUp) {
			if cur, ok := s.shard(name); ok && cur != sh {
				continue // its pool was replaced under us; nothing was sent
			}
		}
		if !errors.Is(err, shards.ErrWrongShard) || time.Now().After(giveUp) {
			return name, err
		}
		s.wrongShardRetries.Add(1)
		changed := s.watcher.Changed()
		if rerr := s.watcher.Refresh(ctx); rerr != nil {
			return name, fmt.Errorf("%w (reloading the map: %v)", err, rerr)
		}
		if s.router.Table().Version() != t.Version() {
			continue // the map changed: retry on the new owner now
		}
		// Same map: the partition is frozen for a move that has not flipped
		// yet. Wait for the flip to reach this router (LISTEN/NOTIFY), or
		// a moment in case the freeze ends without one.
		select {
		case <-ctx.Done():
			return name, err
		case <-changed:
		case <-time.After(backoff):
		}
		// At most 10 ms: a freeze that ends without a flip (a
		// verification's, or one over its budget) wakes nobody.
		backoff = min(2*backoff, maxMoveBackoff)
	}
}

// onUser runs fn on the shard that owns userID's partition; see onPartition.
func (s *Server) onUser(ctx context.Context, userID string, fn func(sh *shards.Shard, p int32) error) error {
	p, err := s.userPartition(userID)
	if err != nil {
		return err
	}
	return s.onPartition(ctx, p, func(sh *shards.Shard) error { return fn(sh, p) })
}

func (s *Server) partitionCount() int {
	if t := s.router.Table(); t != nil {
		return t.PartitionCount()
	}
	return 0
}

// wake tells the relay of database name (a shard, or events.ConfigWake)
// that a write committed there; see events.Waker.
func (s *Server) wake(name string) {
	if w := s.waker.Load(); w != nil {
		w.Wake(name)
	}
}
