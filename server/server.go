// Package server implements the gRPC services (DataService, AdminService) on
// top of the router, the shards and the catalog, and maps every error to its
// gRPC code in one place.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// Options tune a Server. The zero value of a field means its default.
type Options struct {
	// MaxJSONBytes caps every *_json field (default 64 KiB).
	MaxJSONBytes int
	// ShardPool sizes the pool opened for each shard.
	ShardPool shards.PoolOptions
	// TopologyInterval is how often the topology version is checked besides
	// LISTEN/NOTIFY (default 5s).
	TopologyInterval time.Duration
	// MoveWait bounds how long a request keeps retrying when shards answer
	// "wrong shard" (default 2s, and never past the request's deadline).
	// Each retry reloads the map; while the map stays the same the partition
	// is frozen mid-move, and the retries back off up to 50ms apart.
	MoveWait time.Duration
	Logger   *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.MaxJSONBytes <= 0 {
		o.MaxJSONBytes = 64 << 10
	}
	if o.TopologyInterval <= 0 {
		o.TopologyInterval = 5 * time.Second
	}
	if o.MoveWait <= 0 {
		o.MoveWait = 2 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// Server holds what the services share: the routing table, the shard pools
// and the catalog.
type Server struct {
	opts       Options
	catalog    *catalog.Catalog
	catalogDSN string
	router     *router.Router
	watcher    *catalog.Watcher

	mu     sync.RWMutex
	shards map[string]*shards.Shard
}

// New opens the catalog at catalogDSN, loads the topology and opens a pool
// per shard (lazily: a shard that is down does not stop the start). It fails
// if the catalog is unreachable or holds no cluster.
func New(ctx context.Context, catalogDSN string, opts Options) (*Server, error) {
	opts = opts.withDefaults()
	cat, err := catalog.Open(ctx, catalogDSN)
	if err != nil {
		return nil, err
	}
	s := &Server{
		opts:       opts,
		catalog:    cat,
		catalogDSN: catalogDSN,
		router:     &router.Router{},
		shards:     make(map[string]*shards.Shard),
	}
	s.watcher = &catalog.Watcher{
		Catalog:  cat,
		Router:   s.router,
		DSN:      catalogDSN,
		Interval: opts.TopologyInterval,
		OnLoad:   s.openShards,
		Logger:   opts.Logger,
	}
	if err := s.watcher.Refresh(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Watch keeps the routing table current until ctx ends.
func (s *Server) Watch(ctx context.Context) error { return s.watcher.Run(ctx) }

// Router returns the server's router.
func (s *Server) Router() *router.Router { return s.router }

// Close closes every pool.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, sh := range s.shards {
		sh.Close()
		delete(s.shards, name)
	}
	s.catalog.Close()
}

// openShards opens a pool for every shard in topo that has none yet. Pools
// are opened before the router switches tables, so every shard a lookup can
// return has one.
func (s *Server) openShards(ctx context.Context, topo catalog.Topology) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rec := range topo.Shards {
		if _, ok := s.shards[rec.Name]; ok {
			continue
		}
		dsn, err := catalog.ExpandDSN(rec.DSN)
		if err != nil {
			return fmt.Errorf("shard %s: %w", rec.Name, err)
		}
		sh, err := shards.Open(ctx, rec.Name, dsn, s.opts.ShardPool)
		if err != nil {
			return err
		}
		s.shards[rec.Name] = sh
	}
	return nil
}

func (s *Server) shard(name string) (*shards.Shard, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	sh, ok := s.shards[name]
	return sh, ok
}

// errNoTable is returned before the first topology load (never after New).
var errNoTable = errors.New("no routing table loaded")

// onPartition runs fn on the shard that owns partition p. When the shard
// answers ErrWrongShard (this router's map is stale, or the partition is
// frozen for a move), it reloads the map and retries on the owner, backing
// off a little more each time, for at most MoveWait.
func (s *Server) onPartition(ctx context.Context, p int32, fn func(*shards.Shard) error) error {
	backoff := time.Millisecond
	giveUp := time.Now().Add(s.opts.MoveWait)
	for {
		name, ok := s.router.ShardOf(p)
		if !ok {
			return errNoTable
		}
		sh, ok := s.shard(name)
		if !ok {
			return fmt.Errorf("shard %s has no pool", name)
		}
		err := fn(sh)
		if !errors.Is(err, shards.ErrWrongShard) || time.Now().After(giveUp) {
			return err
		}
		before := s.router.Table().Version()
		if rerr := s.watcher.Refresh(ctx); rerr != nil {
			return fmt.Errorf("%w (reloading the map: %v)", err, rerr)
		}
		if s.router.Table().Version() != before {
			continue // the map changed: retry on the new owner now
		}
		// Same map: the partition is frozen for a move that has not flipped
		// yet. Wait a moment.
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 50*time.Millisecond)
	}
}

// onUser runs fn on the shard that owns userID's partition; see onPartition.
func (s *Server) onUser(ctx context.Context, userID string, fn func(sh *shards.Shard, p int32) error) error {
	t := s.router.Table()
	if t == nil {
		return errNoTable
	}
	p := router.Partition(userID, t.PartitionCount())
	return s.onPartition(ctx, p, func(sh *shards.Shard) error { return fn(sh, p) })
}

func (s *Server) partitionCount() int {
	if t := s.router.Table(); t != nil {
		return t.PartitionCount()
	}
	return 0
}
