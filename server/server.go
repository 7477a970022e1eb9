// Package server implements the gRPC services (DataService, AdminService) on
// top of the router, the shards and the catalog, and maps every error to its
// gRPC code in one place.
package server

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/rueidis"
	"github.com/santhosh-tekuri/jsonschema/v6"
	"go.opentelemetry.io/otel/trace"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/events"
	"github.com/shardgate/shardgate/mover"
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
	// is frozen mid-move: the retries wake on the move's flip or back off
	// up to 10ms apart.
	MoveWait time.Duration
	// Cache, if set, answers GetSession, GetConfig and ListConfig and is
	// invalidated by every write to them; nil reads the databases always.
	// The relays invalidate it again for every session and config event.
	Cache  *cache.Cache
	Logger *slog.Logger

	// Redis, if set, is where change events are published and read (Watch).
	// Without it Watch answers FAILED_PRECONDITION and no relay runs.
	Redis rueidis.Client
	// EventsPrefix starts every Redis key of the event streams (default
	// events.DefaultPrefix).
	EventsPrefix string
	// StreamMaxLen is the approximate number of events each stream keeps
	// (default 100000); Watch serves older cursors from the outbox.
	StreamMaxLen int64
	// EventRetention is how long delivered events stay in the outboxes
	// (default events.DefaultRetention; negative: for good): a stream
	// Redis lost is published again from them, and Watch serves a cursor
	// older than its stream from them. Only an older cursor is
	// OUT_OF_RANGE.
	EventRetention time.Duration
	// RunRelays runs the outbox relays (one per shard, following the
	// topology, and one for config). Every instance may run them: one per
	// database is active at a time.
	RunRelays bool
	// Invalidate, if set, is called by the relays with each batch of
	// published events (see events.RelayOptions.Invalidate).
	Invalidate func(ctx context.Context, evs []events.Event) error
	// WatchHeartbeat is how long a Watch stream may stay silent before it
	// gets a heartbeat (default 5s).
	WatchHeartbeat time.Duration
	// MaxWatchers caps concurrent Watch streams on this instance (default
	// 1000); more get RESOURCE_EXHAUSTED. Each waits on a Redis connection
	// of its own (a blocking XREAD), and the client's blocking pool should
	// be at least this large (rueidis: BlockingPoolSize, default 1024).
	MaxWatchers int
	// SweepInterval is how often expired sessions are deleted, with a
	// delete event each, from every shard the server has open (default 1
	// minute; negative turns the sweeper off). Each round sweeps a shard in
	// batches of shards.DefaultSweepLimit until one comes back short; every
	// instance may sweep, one per shard at a time (an advisory lock). The
	// sweeper runs until the ctx given to New ends or Close.
	SweepInterval time.Duration
	// TombstoneRetention is how long the tombstones of deleted users, items
	// and config values are kept (default 7 days; negative keeps them for
	// good). Each sweeper round also prunes older ones, on every open shard
	// (shards.PruneTombstones) and in the catalog
	// (catalog.PruneConfigTombstones), in batches of
	// versioning.DefaultPruneLimit until one comes back short; so with the
	// sweeper off nothing is pruned either. A key created again after its
	// tombstone was pruned continues above its partition's version floor.
	TombstoneRetention time.Duration
	// RunMover runs the rebalancing executor on this instance: every
	// instance may, one leads cluster-wide at a time (package mover).
	RunMover bool
	// Mover tunes the executor; its CatalogDSN and Logger are the
	// server's.
	Mover mover.ExecutorOptions

	// UserSessionMaxTTL caps the ttl_seconds a user principal may give
	// CreateSession and TouchSession (default DefaultUserSessionMaxTTL),
	// so a short-lived token cannot become a long-lived session. Services
	// and admins keep the API's limit of a year.
	UserSessionMaxTTL time.Duration
	// UserSessionSchema, if set, is a JSON Schema (draft 2020-12, no
	// external references) that the data_json of a session created by a
	// user principal must match, so a user cannot write attributes other
	// services trust. Services and admins write any JSON object.
	UserSessionSchema string

	// TracerProvider, if set, traces calls (otelgrpc), cache lookups and
	// loads, shard queries and relay publishes; nil traces nothing, at no
	// cost.
	TracerProvider trace.TracerProvider
}

// DefaultUserSessionMaxTTL is Options.UserSessionMaxTTL's default.
const DefaultUserSessionMaxTTL = 24 * time.Hour

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
	if o.MaxWatchers <= 0 {
		o.MaxWatchers = 1000
	}
	if o.SweepInterval == 0 {
		o.SweepInterval = time.Minute
	}
	if o.TombstoneRetention == 0 {
		o.TombstoneRetention = DefaultTombstoneRetention
	}
	if o.UserSessionMaxTTL <= 0 {
		o.UserSessionMaxTTL = DefaultUserSessionMaxTTL
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

	mu       sync.RWMutex
	shards   map[string]shardPool
	retiring []*shards.Shard // replaced or removed pools, closing soon
	closed   bool

	// wrongShardRetries counts calls retried after a "wrong shard" answer.
	wrongShardRetries atomic.Int64

	metrics     *prometheus.Registry
	grpcMetrics *grpcMetrics
	observer    *observer    // the operator's view (observe.go)
	tracer      trace.Tracer // nil: tracing off (tracing.go)

	relays    *events.Manager                 // under mu; nil until events are attached, or without Options.RunRelays
	relayDSNs map[string]string               // under mu; the expanded DSN each shard's relay uses
	follower  atomic.Pointer[events.Follower] // nil until events are attached
	waker     atomic.Pointer[events.Waker]    // nil until events are attached
	watchers  atomic.Int64                    // open Watch streams
	// droppedEntries counts stream entries Watch dropped as no event of
	// their stream; droppedLog rate-limits their WARN.
	droppedEntries atomic.Int64
	droppedLog     logLimiter
	// userWatches counts open Watch streams per user principal.
	userWatches watchCounts
	// endWatches ends every Watch stream (shutdown), with its cause.
	watchesCtx context.Context
	endWatches context.CancelCauseFunc
	schemas    schemaCache // compiled config schemas
	// userSessionSchema is Options.UserSessionSchema compiled; nil: none.
	userSessionSchema *jsonschema.Schema

	// The session sweeper (sweep.go): set by New, nil when it is off.
	stopSweep     context.CancelFunc
	sweepDone     chan struct{}
	sessionsSwept atomic.Int64 // sessions the sweeper deleted
	sweepErrors   atomic.Int64 // sweep batches that failed
	// tombstonesPruned counts the tombstones the sweeper pruned (shards
	// and catalog), pruneErrors the prune batches that failed.
	tombstonesPruned atomic.Int64
	pruneErrors      atomic.Int64

	// The rebalancing executor: set by New with Options.RunMover.
	mover     *mover.Executor
	stopMover context.CancelFunc
	moverDone chan struct{}
}

// New opens the catalog at catalogDSN, loads the topology and opens a pool
// per shard (lazily: a shard that is down does not stop the start). It fails
// if the catalog is unreachable or holds no cluster. Unless
// Options.SweepInterval turns it off, it starts the session sweeper (which
// also prunes tombstones), which runs until ctx ends or Close.
func New(ctx context.Context, catalogDSN string, opts Options) (*Server, error) {
	opts = opts.withDefaults()
	var userSchema *jsonschema.Schema
	if opts.UserSessionSchema != "" {
		var err error
		if userSchema, err = compileSchema(opts.UserSessionSchema); err != nil {
			return nil, fmt.Errorf("user session schema: not a valid JSON Schema: %s", schemaCompileReason(err))
		}
	}
	cat, err := catalog.Open(ctx, catalogDSN)
	if err != nil {
		return nil, err
	}
	s := &Server{
		opts:       opts,
		catalog:    cat,
		catalogDSN: catalogDSN,
		router:     &router.Router{},
		shards:     make(map[string]shardPool),

		userSessionSchema: userSchema,
		observer:          newObserver(),
	}
	if opts.TracerProvider != nil {
		s.tracer = opts.TracerProvider.Tracer(tracerName)
	}
	s.metrics = s.newRegistry()
	s.watchesCtx, s.endWatches = context.WithCancelCause(context.Background())
	if opts.Redis != nil {
		s.AttachRedis(opts.Redis)
	}
	s.watcher = &catalog.Watcher{
		Catalog:  cat,
		Router:   s.router,
		DSN:      catalogDSN,
		Interval: opts.TopologyInterval,
		OnLoad:   s.syncPools,
		Logger:   opts.Logger,
	}
	if err := s.watcher.Refresh(ctx); err != nil {
		s.Close()
		return nil, err
	}
	s.startSweeper(ctx)
	s.startMover(ctx)
	return s, nil
}

// startMover runs the rebalancing executor until ctx ends or Close.
func (s *Server) startMover(ctx context.Context) {
	if !s.opts.RunMover {
		return
	}
	mo := s.opts.Mover
	mo.CatalogDSN, mo.Logger = s.catalogDSN, s.opts.Logger
	s.mover = mover.NewExecutor(s.catalog, mo)
	for _, c := range s.mover.Collectors() {
		s.metrics.MustRegister(c)
	}
	ctx, s.stopMover = context.WithCancel(ctx)
	s.moverDone = make(chan struct{})
	go func() {
		defer close(s.moverDone)
		s.mover.Run(ctx)
	}()
}

// AttachRedis turns change events on with rc: Watch is served and, with
// Options.RunRelays, the relays start and follow the topology. New calls it
// for Options.Redis; a caller whose Redis was unreachable at start calls it
// once a client connects. It reports false, and uses nothing, if events are
// already on or the server is closed.
func (s *Server) AttachRedis(rc rueidis.Client) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.follower.Load() != nil {
		return false
	}
	if s.opts.RunRelays {
		s.relays = events.NewManager(events.RelayOptions{
			Redis:      rc,
			Prefix:     s.opts.EventsPrefix,
			MaxLen:     s.opts.StreamMaxLen,
			Retention:  s.opts.EventRetention,
			Invalidate: s.invalidateEvents,
			Logger:     s.opts.Logger,
			Tracer:     s.relayTracer(),
		})
		s.relays.StartConfig(s.catalogDSN)
		s.relays.Sync(maps.Clone(s.relayDSNs))
	}
	s.follower.Store(&events.Follower{Redis: rc, Prefix: s.opts.EventsPrefix, Heartbeat: s.opts.WatchHeartbeat,
		Backlog: eventLog{s}, PartitionOf: s.partitionOf, Dropped: s.droppedEntry})
	var local func(string, []int32) bool
	if s.relays != nil {
		local = s.relays.WakeLocalStreams
	}
	s.waker.Store(events.NewWaker(rc, s.opts.EventsPrefix, local, s.opts.Logger))
	return true
}

// EndWatches ends every open Watch stream with Unavailable, telling the
// client to resume from its cursor elsewhere, and refuses new ones. Call it
// when shutdown starts: watches never end by themselves, so they would
// otherwise hold a graceful stop for its whole grace period.
func (s *Server) EndWatches() { s.endWatches(errShuttingDown) }

// WatchTopology keeps the routing table current until ctx ends.
func (s *Server) WatchTopology(ctx context.Context) error { return s.watcher.Run(ctx) }

// Router returns the server's router.
func (s *Server) Router() *router.Router { return s.router }

// Close closes every pool. A topology reload still in flight then opens
// none.
func (s *Server) Close() {
	s.EndWatches()
	s.mu.Lock()
	s.closed = true
	relays := s.relays
	s.mu.Unlock()
	s.stopSweeper() // before the pools it sweeps close
	if s.stopMover != nil {
		s.stopMover()
		<-s.moverDone
	}
	if relays != nil {
		relays.Close()
	}
	if w := s.waker.Load(); w != nil {
		w.Close()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, p := range s.shards {
		p.sh.Close()
		delete(s.shards, name)
	}
	for _, sh := range s.retiring {
		sh.Close()
	}
	s.retiring = nil
	s.catalog.Close()
}
