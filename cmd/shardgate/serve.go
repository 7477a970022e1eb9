package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/dashboard"
	"github.com/shardgate/shardgate/server"
	"github.com/shardgate/shardgate/shards"
)

// serveFlags are shared by serve and dev.
type serveFlags struct {
	MaxJSONBytes     int           `help:"Largest accepted *_json field, in bytes." default:"65536" env:"SHARDGATE_MAX_JSON_BYTES"`
	MaxRecvBytes     int           `help:"Largest accepted request message, in bytes." default:"1048576" env:"SHARDGATE_MAX_RECV_BYTES"`
	DefaultTimeout   time.Duration `help:"Deadline for calls that arrive without one." default:"10s" env:"SHARDGATE_DEFAULT_TIMEOUT"`
	ShardMaxConns    int32         `help:"Connections per shard pool (0: pgxpool's default, max(4, CPUs))." default:"0" env:"SHARDGATE_SHARD_MAX_CONNS"`
	ShardMinIdle     int32         `name:"shard-min-idle-conns" help:"Connections each shard pool keeps open and idle, so a burst of calls (a partition arriving with a move) does not wait for new ones; 0: none." default:"2" env:"SHARDGATE_SHARD_MIN_IDLE_CONNS"`
	ShardWriteBatch  int           `name:"shard-max-write-batch" help:"Most concurrent writes to one shard that share a transaction (group commit); 1 turns group commit off." default:"32" env:"SHARDGATE_SHARD_MAX_WRITE_BATCH"`
	ShardFlushers    int           `name:"shard-write-flushers" help:"Connections per shard that flush write batches at once (0: half the pool)." default:"0" env:"SHARDGATE_SHARD_WRITE_FLUSHERS"`
	ShardReadBatch   int           `name:"shard-max-read-batch" help:"Most concurrent point reads (GetUser, GetItem) of one shard that one statement answers (read batching); 1 turns read batching off." default:"32" env:"SHARDGATE_SHARD_MAX_READ_BATCH"`
	ShardReaders     int           `name:"shard-read-flushers" help:"Connections per shard and kind of read that may answer batched reads at once (0: half the pool)." default:"0" env:"SHARDGATE_SHARD_READ_FLUSHERS"`
	TopologyInterval time.Duration `help:"How often to check the topology version besides LISTEN/NOTIFY." default:"5s" env:"SHARDGATE_TOPOLOGY_INTERVAL"`
	Grace            time.Duration `help:"How long in-flight calls may run after SIGTERM." default:"15s" env:"SHARDGATE_GRACE"`
	MetricsListen    string        `help:"Address to serve Prometheus metrics on (HTTP, /metrics); empty turns them off." default:"127.0.0.1:9464" env:"SHARDGATE_METRICS_LISTEN"`
	Pprof            bool          `help:"Also serve Go's profiler (/debug/pprof/) on the metrics address; keep that address private." env:"SHARDGATE_PPROF"`
	Redis            string        `help:"Redis address (host:port, plaintext) for the session and config cache and the change events, unless --redis-url is given; empty (and no --redis-url) turns both off." default:"127.0.0.1:6379" env:"SHARDGATE_REDIS"`
	Events           bool          `help:"Publish change events to Redis Streams (outbox relays) and serve Watch; --no-events runs without Redis." default:"true" negatable:"" env:"SHARDGATE_EVENTS"`
	EventsPrefix     string        `name:"events-prefix" help:"Prefix of the event streams' Redis keys." default:"shardgate:" env:"SHARDGATE_EVENTS_PREFIX"`
	CachePrefix      string        `name:"cache-prefix" help:"Prefix of the cache's Redis keys, ending with ':'; clusters sharing one Redis need different ones." default:"shardgate:" env:"SHARDGATE_CACHE_PREFIX"`
	StreamMaxLen     int64         `name:"stream-maxlen" help:"Events each stream keeps, approximately (XADD MAXLEN ~); Watch serves older cursors from the outbox (see --event-retention)." default:"100000" env:"SHARDGATE_STREAM_MAXLEN"`
	EventRetention   time.Duration `name:"event-retention" help:"How long delivered change events stay in the outboxes: relays publish them again into a stream Redis lost, and Watch serves cursors older than the stream from them; only older cursors are OUT_OF_RANGE. 0 keeps them for good." default:"24h" env:"SHARDGATE_EVENT_RETENTION"`
	WatchHeartbeat   time.Duration `name:"watch-heartbeat" help:"Longest a Watch stream stays silent before a heartbeat." default:"5s" env:"SHARDGATE_WATCH_HEARTBEAT"`
	MaxWatchers      int           `name:"max-watchers" help:"Concurrent Watch streams this instance serves; more get RESOURCE_EXHAUSTED. Each holds a Redis connection." default:"1000" env:"SHARDGATE_MAX_WATCHERS"`
	SessionSweep     time.Duration `name:"session-sweep-interval" help:"How often to delete expired sessions (with a delete event each) from every shard; one instance sweeps a shard at a time. 0 turns it off." default:"1m" env:"SHARDGATE_SESSION_SWEEP_INTERVAL"`
	TombstoneTTL     time.Duration `name:"tombstone-retention" help:"How long the tombstones of deleted users, items and config values are kept; older ones are pruned each session sweep round. A key created again after its tombstone was pruned continues above its partition's version floor. 0 keeps them for good." default:"168h" env:"SHARDGATE_TOMBSTONE_RETENTION"`
	Mover            bool          `help:"Run the rebalancing executor here (one instance leads cluster-wide at a time); --no-mover leaves rebalances to other instances." default:"true" negatable:"" env:"SHARDGATE_MOVER"`
	guardFlags
	redisFlags
	userSessionFlags
}

type serveCmd struct {
	Listen         string        `help:"Address to serve gRPC on." default:"127.0.0.1:7070" env:"SHARDGATE_LISTEN"`
	Catalog        string        `help:"Catalog database DSN." required:"" env:"SHARDGATE_CATALOG"`
	AllowPlaintext bool          `name:"allow-plaintext" help:"Serve without TLS on a non-loopback address: tokens and data cross the network in the clear (only where the network itself protects them). Logged as a warning." env:"SHARDGATE_ALLOW_PLAINTEXT"`
	NoAuth         bool          `name:"no-auth" help:"Serve without a JWT key source: every call acts as an anonymous admin. Loopback addresses only; logged as a warning at start and every minute." env:"SHARDGATE_NO_AUTH"`
	Drain          time.Duration `help:"How long health reports NOT_SERVING after SIGTERM before the server stops taking calls, so load balancers move away first." default:"2s" env:"SHARDGATE_DRAIN"`
	serveFlags
	securityFlags

	// noAuthEvery is how often --no-auth is logged again while serving
	// (default a minute).
	noAuthEvery time.Duration
}

// noAuthWarning is logged at start and every minute under --no-auth: a
// server anyone local can administer must not look like a normal one in
// the log.
const noAuthWarning = "NO AUTH (--no-auth): every call acts as an anonymous admin; any process that can reach the listen address can read and change all data"

func (c *serveCmd) Run(ctx context.Context, log *slog.Logger) error {
	loopback, err := isLoopback(c.Listen)
	if err != nil {
		return err
	}
	warnOptOutsFromEnv(log, c.optOuts())
	if _, ok := os.LookupEnv("SHARDGATE_INSECURE"); ok {
		log.Warn("SHARDGATE_INSECURE is not read; the opt-outs are --allow-plaintext (no TLS beyond loopback) and --no-auth (loopback only)")
	}
	if err := checkExposure(c.Listen, loopback, c.securityFlags.tlsOn(), c.securityFlags.authOn(), c.AllowPlaintext, c.NoAuth); err != nil {
		return err
	}
	sec, err := c.securityFlags.build(ctx, log)
	if err != nil {
		return err
	}
	if c.CacheMACKeyFile != "" {
		if sec.cacheMACKey, err = readMACKey(c.CacheMACKeyFile); err != nil {
			return err
		}
	}
	sec.allowPlaintext = c.AllowPlaintext
	if !loopback && sec.tls == nil {
		log.Warn("PLAINTEXT (--allow-plaintext): serving on a non-loopback address without TLS; tokens and data cross the network in the clear", "listen", c.Listen)
	}
	if c.NoAuth {
		log.Warn(noAuthWarning, "listen", c.Listen)
		every := c.noAuthEvery
		if every <= 0 {
			every = time.Minute
		}
		wctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() {
			t := time.NewTicker(every)
			defer t.Stop()
			for {
				select {
				case <-wctx.Done():
					return
				case <-t.C:
					log.Warn(noAuthWarning, "listen", c.Listen)
				}
			}
		})
		defer wg.Wait()
		defer stop()
	}
	return run(ctx, log, c.Listen, c.Catalog, c.serveFlags, sec, c.Drain)
}

// optOut is a flag that turns a protection off.
type optOut struct {
	flag, env string
	on        bool
}

func (c *serveCmd) optOuts() []optOut {
	return []optOut{
		{"--no-auth", "SHARDGATE_NO_AUTH", c.NoAuth},
		{"--allow-plaintext", "SHARDGATE_ALLOW_PLAINTEXT", c.AllowPlaintext},
		{"--jwt-allow-any-issuer", "SHARDGATE_JWT_ALLOW_ANY_ISSUER", c.JWTAllowAnyIssuer},
		{"--jwt-allow-any-audience", "SHARDGATE_JWT_ALLOW_ANY_AUDIENCE", c.JWTAllowAnyAudience},
	}
}

// warnOptOutsFromEnv names, at WARN, each opt-out that is on and whose
// environment variable says so: a variable set long ago and far from the
// command line must not turn a protection off unnoticed.
func warnOptOutsFromEnv(log *slog.Logger, opts []optOut) {
	for _, o := range opts {
		v, ok := os.LookupEnv(o.env)
		if !o.on || !ok {
			continue
		}
		// A variable that says false left the flag to the command line.
		if b, err := strconv.ParseBool(v); err != nil || b {
			log.Warn("protection turned off by an environment variable", "variable", o.env, "flag", o.flag)
		}
	}
}

// checkExposure decides whether serve may start: auth needs a key source
// unless noAuth says otherwise, which only a loopback address allows; a
// non-loopback address needs TLS unless allowPlaintext says otherwise.
// Each opt-out turns off one protection, never both.
func checkExposure(listen string, loopback, tlsOn, authOn, allowPlaintext, noAuth bool) error {
	const keyFlags = "--jwt-keys, --jwt-jwks-url or --jwt-hs256-secret-file"
	switch {
	case authOn && noAuth:
		return fmt.Errorf("--no-auth and a JWT key source (%s) contradict each other: give one", keyFlags)
	case !authOn && !noAuth:
		return fmt.Errorf("no JWT key source: give %s (with --jwt-issuer and --jwt-audience), or --no-auth to let every call act as an anonymous admin (loopback addresses only)", keyFlags)
	case noAuth && !loopback:
		return fmt.Errorf("refusing --no-auth on %s: not a loopback address, and anyone reaching it would be an admin; configure %s", listen, keyFlags)
	case !loopback && !tlsOn && !allowPlaintext:
		return fmt.Errorf("refusing to listen on %s without TLS: not a loopback address; configure --tls-cert and --tls-key, use a loopback address, or pass --allow-plaintext if the network protects the traffic", listen)
	}
	return nil
}

// sweepInterval is --session-sweep-interval as server.Options takes it:
// there 0 means the default and a negative value off.
func (f serveFlags) sweepInterval() time.Duration {
	if f.SessionSweep <= 0 {
		return -1
	}
	return f.SessionSweep
}

// tombstoneRetention is --tombstone-retention as server.Options takes it:
// there 0 means the default and a negative value never.
func (f serveFlags) tombstoneRetention() time.Duration {
	if f.TombstoneTTL <= 0 {
		return -1
	}
	return f.TombstoneTTL
}

// eventRetention is --event-retention as server.Options takes it: there 0
// means the default and a negative value for good.
func (f serveFlags) eventRetention() time.Duration {
	if f.EventRetention <= 0 {
		return -1
	}
	return f.EventRetention
}

// eventsClient connects to Redis for the change events.
func (f serveFlags) eventsClient(rc redisConn) (rueidis.Client, error) {
	opt := rc.opt
	opt.DisableCache = true
	// One blocking XREAD per watcher, plus room for the relays' pipelines.
	opt.BlockingPoolSize = max(rueidis.DefaultPoolSize, f.MaxWatchers+16)
	return rueidis.NewClient(opt)
}

// lateClient is a Redis client that may connect after the server started.
type lateClient struct {
	mu sync.Mutex
	rc rueidis.Client
}

func (l *lateClient) set(rc rueidis.Client) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rc = rc
}

func (l *lateClient) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rc != nil {
		l.rc.Close()
	}
}

// connect retries every second until Redis answers, then hands the client
// to the server, or until ctx ends.
func (l *lateClient) connect(ctx context.Context, f serveFlags, redis redisConn, s *server.Server, log *slog.Logger) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rc, err := f.eventsClient(redis)
		if err != nil {
			continue
		}
		if !s.AttachRedis(rc) {
			rc.Close()
			return
		}
		l.set(rc)
		log.Info("change events on: Redis answered", "redis", redis.name, "prefix", f.EventsPrefix, "stream_maxlen", f.StreamMaxLen)
		return
	}
}

// checkCachePrefix wants the prefix to end with ':'. The cache's keys are
// <prefix>s:…, c:… and l:…, and ending an overflow deletes <prefix>[scl]:*;
// without the separator, prefix "sg" would also match the keys of a
// cluster whose prefix is "sgs:".
func checkCachePrefix(p string) error {
	if !strings.HasSuffix(p, ":") {
		return fmt.Errorf("--cache-prefix %q must end with ':' so it cannot overlap another cluster's keys", p)
	}
	return nil
}

// run serves until ctx ends: health turns NOT_SERVING, calls are still
// taken for drain, then in-flight calls get up to f.Grace.
func run(ctx context.Context, log *slog.Logger, listen, catalogDSN string, f serveFlags, sec security, drain time.Duration) error {
	if f.ShardWriteBatch < 1 {
		return fmt.Errorf("--shard-max-write-batch %d: give at least 1 (1 turns group commit off)", f.ShardWriteBatch)
	}
	if f.ShardFlushers < 0 {
		return fmt.Errorf("--shard-write-flushers %d: give 0 (half the pool) or more", f.ShardFlushers)
	}
	if f.ShardReadBatch < 1 {
		return fmt.Errorf("--shard-max-read-batch %d: give at least 1 (1 turns read batching off)", f.ShardReadBatch)
	}
	if f.ShardReaders < 0 {
		return fmt.Errorf("--shard-read-flushers %d: give 0 (half the pool) or more", f.ShardReaders)
	}
	redis, redisOn, err := f.cacheRedis()
	if err != nil {
		return err
	}
	limitRedis, _, err := f.limitRedis()
	if err != nil {
		return err
	}
	if err := f.checkTLSUsed(redis, limitRedis); err != nil {
		return err
	}
	var c *cache.Cache
	if redisOn {
		if err := checkCachePrefix(f.CachePrefix); err != nil {
			return err
		}
		if sec.cacheMACKey == nil {
			return errNoMACKey
		}
		if c, err = cache.DialOptions(redis.opt, cache.Options{Prefix: f.CachePrefix, MACKey: sec.cacheMACKey, Logger: log}); err != nil {
			return fmt.Errorf("cache (--redis-url or --redis; empty turns it off): %w", err)
		}
		defer c.Close() // after the server: its last writes still invalidate
		log.Info("cache on", "redis", redis.name, "tls", redis.opt.TLSConfig != nil, "auth", redis.opt.Password != "")
	} else {
		log.Warn("cache off (--redis is empty): every read goes to PostgreSQL")
	}
	opts := server.Options{
		MaxJSONBytes: f.MaxJSONBytes,
		ShardPool: shards.PoolOptions{MaxConns: f.ShardMaxConns, MinIdleConns: f.ShardMinIdle,
			MaxWriteBatch: f.ShardWriteBatch, WriteFlushers: f.ShardFlushers,
			MaxReadBatch: f.ShardReadBatch, ReadFlushers: f.ShardReaders},
		TopologyInterval:   f.TopologyInterval,
		Cache:              c,
		Logger:             log,
		EventsPrefix:       f.EventsPrefix,
		StreamMaxLen:       f.StreamMaxLen,
		EventRetention:     f.eventRetention(),
		WatchHeartbeat:     f.WatchHeartbeat,
		MaxWatchers:        f.MaxWatchers,
		SweepInterval:      f.sweepInterval(),
		TombstoneRetention: f.tombstoneRetention(),
		RunMover:           f.Mover,
	}
	if err := f.userSessionFlags.apply(&opts); err != nil {
		return err
	}
	// The events' Redis client: connected now or, if Redis does not answer
	// yet, by a loop that attaches it once it does; the server serves
	// meanwhile (Watch answers UNAVAILABLE).
	var evRedis lateClient
	defer evRedis.close() // after the server's relays are gone
	connectLater := false
	const piling = "every write still adds an outbox row, which only a relay removes: run relays on at least one instance"
	switch {
	case !f.Events:
		log.Warn("change events off (--no-events): no relay runs here and Watch answers FAILED_PRECONDITION; " + piling)
	case !redisOn:
		log.Warn("change events off (--redis is empty): no relay runs and Watch answers FAILED_PRECONDITION; " + piling)
	case f.Events:
		opts.RunRelays = true
		rc, err := f.eventsClient(redis)
		if err != nil {
			log.Warn("change events wait for Redis: relays start and Watch opens once it answers", "redis", redis.name, "err", err)
			connectLater = true
			break
		}
		opts.Redis = rc
		evRedis.set(rc)
		log.Info("change events on", "redis", redis.name, "prefix", f.EventsPrefix, "stream_maxlen", f.StreamMaxLen)
	}
	tp, stopTracing, err := tracingFromEnv(ctx, os.Getenv, log)
	if err != nil {
		return err
	}
	defer func() { // after the server: its last spans are flushed
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := stopTracing(sctx); err != nil {
			log.Warn("flushing traces failed", "err", err)
		}
	}()
	opts.TracerProvider = tp
	s, err := server.New(ctx, catalogDSN, opts)
	if err != nil {
		return err
	}
	defer s.Close()
	switch {
	case opts.SweepInterval < 0:
		log.Warn("session sweeper off (--session-sweep-interval 0): expired sessions, and tombstones of deleted keys, stay in the databases' tables")
	case opts.TombstoneRetention < 0:
		log.Warn("tombstone pruning off (--tombstone-retention 0): tombstones of deleted keys stay in the databases' tables")
	}
	if connectLater {
		loopCtx, stopLoop := context.WithCancel(ctx)
		var loop sync.WaitGroup
		loop.Go(func() { evRedis.connect(loopCtx, f, redis, s, log) })
		defer loop.Wait()
		defer stopLoop()
	}
	// Watches never end by themselves: end them when shutdown starts, so
	// their clients resume elsewhere during the drain.
	defer context.AfterFunc(ctx, s.EndWatches)()
	// The watcher keeps the map current through drain and grace, so it
	// outlives ctx; it must be gone before Close closes what it uses.
	watchCtx, stopWatch := context.WithCancel(context.WithoutCancel(ctx))
	var watch sync.WaitGroup
	watch.Go(func() { s.WatchTopology(watchCtx) })
	defer watch.Wait()
	defer stopWatch()
	lim, closeLimiter, err := f.limiter(limitRedis, log)
	if err != nil {
		return err
	}
	defer closeLimiter()
	g, hs := server.NewGRPCServer(s, server.GRPCOptions{
		MaxRecvMsgBytes: f.MaxRecvBytes,
		DefaultTimeout:  f.DefaultTimeout,
		MaxTimeout:      f.MaxTimeout,
		TLS:             sec.tls,
		Auth:            sec.auth,
		Limiter:         lim,
	})
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	if f.MetricsListen != "" {
		stop, err := serveMetrics(f.MetricsListen, adminSurface{metrics: s.MetricsHandler(), status: s.ClusterStatus, pprof: f.Pprof}, sec, log)
		if err != nil {
			lis.Close()
			return err
		}
		defer stop()
	}
	t := s.Router().Table()
	log.Info("serving", "addr", lis.Addr().String(), "tls", sec.tls != nil, "auth", sec.auth != nil, "topology_version", t.Version(), "partitions", t.PartitionCount(), "shards", len(t.Shards()))
	err = server.Serve(ctx, g, hs, lis, f.Grace, drain)
	log.Info("stopped")
	return err
}

// adminSurface is what the metrics address serves.
type adminSurface struct {
	metrics http.Handler
	status  dashboard.StatusFunc
	pprof   bool
}

// serveMetrics serves /metrics and the dashboard (/, /api/status) on addr
// until stop is called. On a loopback address anyone on the machine may
// look, as before. Beyond loopback it takes what the gRPC address takes:
// TLS and an admin bearer token (JWT) on everything but the dashboard's
// static files; --allow-plaintext waives TLS, nothing waives the token.
func serveMetrics(addr string, a adminSurface, sec security, log *slog.Logger) (stop func(), err error) {
	loopback, err := isLoopback(addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen: %w", err)
	}
	if !loopback {
		if err := checkExposure(addr, false, sec.tls != nil, sec.auth != nil, sec.allowPlaintext, sec.auth == nil); err != nil {
			return nil, fmt.Errorf("metrics and dashboard (--metrics-listen): %w", err)
		}
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener (--metrics-listen, empty to turn off): %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", a.metrics)
	dashboard.Register(mux, a.status)
	if a.pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		// Not /debug/pprof/cmdline: flags may hold a DSN with a password.
	}
	var h http.Handler = mux
	guarded := !loopback && sec.auth != nil
	if guarded {
		h = dashboard.Guard(sec.auth, dashboard.StaticPath, mux)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	scheme := "http"
	useTLS := !loopback && sec.tls != nil
	if useTLS {
		srv.TLSConfig = sec.tls.Clone()
		scheme = "https"
	}
	if !loopback && !useTLS {
		log.Warn("PLAINTEXT (--allow-plaintext): metrics and dashboard on a non-loopback address without TLS; admin tokens cross the network in the clear", "listen", addr)
	}
	go func() {
		var err error
		if useTLS {
			err = srv.ServeTLS(lis, "", "")
		} else {
			err = srv.Serve(lis)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server failed", "err", err)
		}
	}()
	base := scheme + "://" + lis.Addr().String()
	log.Info("metrics and dashboard", "metrics", base+"/metrics", "dashboard", base+"/", "admin_token_required", guarded)
	return func() { srv.Close() }, nil
}

// isLoopback reports whether a listen address binds only loopback
// interfaces. An empty host binds every interface.
func isLoopback(addr string) (bool, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false, fmt.Errorf("listen address %q: %w", addr, err)
	}
	if host == "localhost" {
		return true, nil
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback(), nil
}
