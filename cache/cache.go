package cache

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// Options tune a Cache. The zero value of a field means its default.
type Options struct {
	// Prefix starts every key the cache writes to Redis (default
	// "shardgate:").
	Prefix string
	// SessionTTL bounds a session's life in Redis (default 10m); it is
	// never kept past the session's own expiry.
	SessionTTL time.Duration
	// ConfigTTL is how long a config value or namespace list stays in
	// Redis (default 30m).
	ConfigTTL time.Duration
	// NotFoundTTL is how long "no such key" stays in Redis (default 5s).
	NotFoundTTL time.Duration
	// LocalTTL bounds how long a process keeps its own copy of a key
	// (default 1m). Redis invalidates it earlier when the key changes.
	LocalTTL time.Duration
	// RedisTimeout bounds every Redis call of a read; past it the read
	// goes to the database (default 50ms).
	RedisTimeout time.Duration
	// InvalidateTimeout bounds a write's invalidation (default 250ms);
	// past it the write still succeeds and the invalidation is retried.
	InvalidateTimeout time.Duration
	// LeaseTTL is how long a loader may hold a key before another may
	// take over (default 2s); LeaseWait is how long a reader waits for
	// another process's loader before loading itself without storing
	// (default 200ms).
	LeaseTTL  time.Duration
	LeaseWait time.Duration
	// BreakerThreshold consecutive Redis failures open the breaker
	// (default 5) for BreakerCooldown (default 1s): while open, reads go
	// straight to the database. Calls that failed while in flight together
	// count as one failure (see breaker).
	BreakerThreshold int
	BreakerCooldown  time.Duration
	// FloorWindow is how long this process serves nothing from its own
	// memory after Redis trouble (an outage, a failed invalidation, the end
	// of an overflow), when invalidation pushes may be late or lost
	// (default 1s). A write's own keys need no window (package doc,
	// Read-your-writes).
	FloorWindow time.Duration
	// RetryInterval is how often failed invalidations are retried
	// (default 100ms).
	RetryInterval time.Duration
	// MaxPending caps the keys whose failed invalidation waits for a retry
	// (default 100,000, about 15 MB). Past it the cache overflows: it drops
	// the queued keys, reads everything from the database, and once Redis
	// answers deletes every cache key under Prefix before caching again.
	MaxPending int
	// MaxListEntries is the largest namespace ListConfig caches whole
	// (default 1000 values); MaxListBytes bounds its values' size
	// (default 1 MiB).
	MaxListEntries int
	MaxListBytes   int
	// ConnTimeout (Dial only) is how long a Redis connection may leave a
	// command or its idle PING unanswered before rueidis closes it, which
	// drops this process's memory copy (rueidis ConnWriteTimeout; default
	// 1s). It bounds how long a process cut off from Redis without a
	// connection reset keeps answering from memory.
	ConnTimeout time.Duration
	// LocalCacheBytes (Dial only) caps the memory for local copies per
	// Redis connection (default rueidis's, 128 MiB); least recently used
	// copies go first.
	LocalCacheBytes int
	// MACKey (at least MACKeySize bytes; Dial refuses fewer) keys the
	// HMAC-SHA256 every entry carries; every process sharing the cache's
	// keys must use the same one. An entry that fails it (forged, copied from another key, or
	// written with another key) is not served: it reads as a miss, is
	// replaced, and is counted (Stats.Rejected). Nil: a random key of this
	// cache's own, so entries written by other processes are rejected
	// (fine for one process, such as dev mode or a test).
	MACKey []byte
	// Invalidations, if set, is the receiver given to the rueidis client
	// as ClientOption.OnInvalidations; the cache then counts the
	// invalidations it receives. Dial sets it up.
	Invalidations *Invalidations
	// OnInvalidation, if set, is called with each key Redis invalidates
	// in this process (tests measure δ with it). It must be fast.
	OnInvalidation func(key string)
	Logger         *slog.Logger
}

func (o Options) withDefaults() Options {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	if o.Prefix == "" {
		o.Prefix = "shardgate:"
	}
	def(&o.SessionTTL, 10*time.Minute)
	def(&o.ConfigTTL, 30*time.Minute)
	def(&o.NotFoundTTL, 5*time.Second)
	def(&o.LocalTTL, time.Minute)
	// Whole milliseconds: rueidis stamps copies in ms, and copyStart
	// subtracts LocalTTL from the stamp.
	o.LocalTTL = o.LocalTTL.Round(time.Millisecond)
	if o.LocalTTL < time.Millisecond {
		o.LocalTTL = time.Millisecond
	}
	def(&o.RedisTimeout, 50*time.Millisecond)
	def(&o.InvalidateTimeout, 250*time.Millisecond)
	def(&o.LeaseTTL, 2*time.Second)
	def(&o.LeaseWait, 200*time.Millisecond)
	def(&o.BreakerCooldown, time.Second)
	def(&o.FloorWindow, time.Second)
	def(&o.RetryInterval, 100*time.Millisecond)
	def(&o.ConnTimeout, time.Second)
	if o.BreakerThreshold <= 0 {
		o.BreakerThreshold = 5
	}
	if o.MaxListEntries <= 0 {
		o.MaxListEntries = 1000
	}
	if o.MaxPending <= 0 {
		o.MaxPending = 100_000
	}
	if o.MaxListBytes <= 0 {
		o.MaxListBytes = 1 << 20
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// Loader reads a key's value from the database. It returns Entry{} (Found
// false) and no error when there is no value; that answer is cached too.
type Loader func(ctx context.Context) (Entry, error)

// Cache is a read-through cache over one rueidis client. Safe for
// concurrent use.
type Cache struct {
	// client is set once; ready says it is (Dial may connect late).
	client rueidis.Client
	ready  atomic.Bool
	opts   Options
	owns   bool // Close closes the client (Dial made it)
	br     breaker

	seq    atomic.Uint64 // orders flights and floors
	floors floors

	flightMu sync.Mutex
	flights  map[string]*flight

	// pending holds keys whose invalidation failed; they are read from
	// the database until a retry deletes them in Redis.
	pendingMu sync.Mutex
	pending   map[string]uint64 // key → generation of its last failure
	npending  atomic.Int64

	// overflow: more than MaxPending keys failed to invalidate, so they
	// were dropped; every read goes to the database until a flush of the
	// whole prefix succeeds. Written under pendingMu. drops counts the
	// failed invalidations dropped (under pendingMu), so a flush can tell
	// whether one failed while it ran.
	overflow atomic.Bool
	drops    uint64
	// flightFloor: in-process flights that started before it are not
	// joined (set when an overflow ends, as markFloors does per key).
	flightFloor atomic.Uint64
	// overflowEnded (Unix ns): when the last overflow ended. For LocalTTL
	// after it, memory copies fetched before it do not answer (trustLocal).
	overflowEnded atomic.Int64
	flushLogged   atomic.Int64 // Unix ns of the last failed-flush warning

	// uncachedUntil (Unix ns): until then every read skips this
	// process's memory, after a failed invalidation or a Redis outage.
	uncachedUntil atomic.Int64

	// memo answers local hits without rueidis; only when this cache
	// receives the client's invalidations (Dial), else nil.
	memo  *memo
	stats stats
	mac   *macer
	// rejectLogged (Unix ns): the last warning about a rejected entry,
	// so a flood of forged entries does not flood the log.
	rejectLogged atomic.Int64

	acquire, store, release *rueidis.Lua

	stop chan struct{}
	done chan struct{}
}

// New returns a cache over client. The caller keeps owning the client;
// Close stops the cache's retry loop only. Build the client with
// opts.Invalidations as its OnInvalidations to count what Redis pushes.
func New(client rueidis.Client, opts Options) *Cache {
	c := newCache(opts)
	c.client = client
	c.ready.Store(true)
	go c.retryLoop()
	return c
}

func newCache(opts Options) *Cache {
	opts = opts.withDefaults()
	c := &Cache{
		opts:    opts,
		br:      breaker{threshold: opts.BreakerThreshold, cooldown: opts.BreakerCooldown},
		flights: make(map[string]*flight),
		pending: make(map[string]uint64),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
		acquire: rueidis.NewLuaScript(acquireLua),
		store:   rueidis.NewLuaScript(storeLua),
		release: rueidis.NewLuaScript(releaseLua),
	}
	key := opts.MACKey
	if key == nil {
		key = randomMACKey()
	}
	c.mac = newMACer(key)
	c.floors.init()
	if opts.Invalidations != nil {
		opts.Invalidations.c.Store(c)
	}
	return c
}

// Close stops the retry loop (and closes the client if Dial made it).
// Invalidations still pending are dropped: their keys expire by TTL.
func (c *Cache) Close() {
	close(c.stop)
	<-c.done
	if n := c.npending.Load(); n > 0 {
		c.opts.Logger.Warn("cache closed with invalidations pending; those keys expire by TTL", "keys", n)
	}
	if c.overflow.Load() {
		c.opts.Logger.Warn("cache closed in overflow; keys whose invalidation was dropped expire by TTL")
	}
	if c.owns && c.ready.Load() {
		c.client.Close()
	}
}
