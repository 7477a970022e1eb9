// Package cache is the read-through cache in front of the databases for
// sessions and config: rueidis with server-assisted client-side caching
// (RESP3 CLIENT TRACKING), so a hot read is answered from this process's
// memory and Redis pushes an invalidation to every process holding a key
// when the key changes.
//
// A miss runs one loader per key: one per process (an in-process flight)
// and one across processes (a lease written into the key itself). The
// loader's result is stored only while its lease is still in the key, so a
// writer's delete, which removes the lease, makes a loader that read the
// old value fail to store it: no stale set.
//
// The process that acknowledged a write never serves an older value
// afterwards: a write leaves a floor on its keys, the time its delete was
// acknowledged. A local copy fetched before that (rueidis stamps each copy
// with its fetch's start, see copyStart) is not served even if its
// invalidation push is late, and in-process flights that started before
// the write are not joined. Every other process drops its copy when
// Redis's invalidation reaches it (δ, measured in the tests).
package cache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
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
	// straight to the database.
	BreakerThreshold int
	BreakerCooldown  time.Duration
	// FloorWindow is how long this process serves nothing from its own
	// memory after Redis trouble (an outage, a failed invalidation, the end
	// of an overflow), when invalidation pushes may be late or lost
	// (default 1s). A write's own keys need no window: see copyStart.
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

	stats stats

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
	c.floors.cur, c.floors.old = make(map[string]floor), make(map[string]floor)
	if opts.Invalidations != nil {
		opts.Invalidations.c.Store(c)
	}
	return c
}

// Dial returns a cache over a new client, with client-side caching on, for
// the Redis at addr; the cache owns the client. If Redis cannot be reached
// now, Dial still returns a cache: until a connection succeeds (retried
// every second) every read goes to the database and every invalidation is
// queued, so a server can start during a Redis outage. The error is only
// for options rueidis refuses.
func Dial(addr string, opts Options) (*Cache, error) {
	if opts.Invalidations == nil {
		opts.Invalidations = new(Invalidations)
	}
	c := newCache(opts)
	c.owns = true
	opt := rueidis.ClientOption{
		InitAddress:       []string{addr},
		OnInvalidations:   opts.Invalidations.receive,
		ConnWriteTimeout:  c.opts.ConnTimeout,
		CacheSizeEachConn: c.opts.LocalCacheBytes,
		Dialer:            net.Dialer{Timeout: c.opts.ConnTimeout, KeepAlive: c.opts.ConnTimeout / 2},
	}
	client, err := rueidis.NewClient(opt)
	if err == nil {
		c.client = client
		c.ready.Store(true)
		go c.retryLoop()
		return c, nil
	}
	if !isConnError(err) {
		return nil, fmt.Errorf("redis %s: %w", addr, err)
	}
	c.opts.Logger.Warn("cache: Redis unreachable; serving from the database until it answers", "addr", addr, "err", err)
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-c.stop:
				close(c.done)
				return
			case <-t.C:
			}
			client, err := rueidis.NewClient(opt)
			if err != nil {
				continue
			}
			c.client = client
			c.ready.Store(true)
			c.opts.Logger.Info("cache: connected to Redis", "addr", addr)
			c.retryLoop()
			return
		}
	}()
	return c, nil
}

// isConnError tells an unreachable Redis from a refused configuration.
func isConnError(err error) bool {
	var ne net.Error
	var oe *net.OpError
	return errors.As(err, &ne) || errors.As(err, &oe) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, io.EOF)
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

// Invalidations receives a rueidis client's invalidation pushes for the
// cache built over that client. The zero value is ready to use.
type Invalidations struct{ c atomic.Pointer[Cache] }

// OnInvalidations is the function to set as rueidis
// ClientOption.OnInvalidations.
func (i *Invalidations) OnInvalidations(msgs []rueidis.RedisMessage) { i.receive(msgs) }

func (i *Invalidations) receive(msgs []rueidis.RedisMessage) {
	c := i.c.Load()
	if c == nil {
		return
	}
	if msgs == nil { // the connection dropped: rueidis flushed its cache
		c.stats.flushes.Add(1)
		return
	}
	c.stats.invalidationsReceived.Add(int64(len(msgs)))
	if fn := c.opts.OnInvalidation; fn != nil {
		for _, m := range msgs {
			if k, err := m.ToString(); err == nil {
				fn(k)
			}
		}
	}
}

// Key builders. Keys carry Prefix, then a kind, then the address; a
// session's address is the hex of its token's SHA-256, never the token.

// SessionKey is the key of the session whose token hashes to tokenHash.
func (c *Cache) SessionKey(tokenHash []byte) string {
	b := make([]byte, 0, len(c.opts.Prefix)+2+hex.EncodedLen(len(tokenHash)))
	b = append(b, c.opts.Prefix...)
	b = append(b, "s:"...)
	b = hex.AppendEncode(b, tokenHash)
	return string(b)
}

// ConfigKey is the key of one config value. Namespaces never contain ':'
// (they are [A-Za-z0-9._-]), so the key cannot collide with another's.
func (c *Cache) ConfigKey(namespace, key string) string {
	return c.opts.Prefix + "c:" + namespace + ":" + key
}

// ConfigListKey is the key of a whole namespace, as ListConfig reads it.
// Every change in the namespace invalidates it (InvalidateConfig).
func (c *Cache) ConfigListKey(namespace string) string {
	return c.opts.Prefix + "l:" + namespace
}

// GetSession returns the session with this token hash from the cache, or
// loads it. An expired session is never returned: it reads as not found.
func (c *Cache) GetSession(ctx context.Context, tokenHash []byte, load Loader) (Entry, error) {
	return c.Get(ctx, c.SessionKey(tokenHash), c.opts.SessionTTL, load)
}

// GetConfig returns one config value from the cache, or loads it.
func (c *Cache) GetConfig(ctx context.Context, namespace, key string, load Loader) (Entry, error) {
	return c.Get(ctx, c.ConfigKey(namespace, key), c.opts.ConfigTTL, load)
}

// ListConfig returns a whole namespace (Entry.List in key order) from the
// cache, or loads it. A namespace with more than MaxListEntries values or
// MaxListBytes of them comes back TooLarge: the caller reads it from the
// database, page by page.
func (c *Cache) ListConfig(ctx context.Context, namespace string, load Loader) (Entry, error) {
	return c.Get(ctx, c.ConfigListKey(namespace), c.opts.ConfigTTL, func(ctx context.Context) (Entry, error) {
		e, err := load(ctx)
		if err != nil {
			return e, err
		}
		size := 0
		for _, m := range e.List {
			size += len(m.Key) + len(m.Value)
		}
		if len(e.List) > c.opts.MaxListEntries || size > c.opts.MaxListBytes {
			return Entry{TooLarge: true}, nil
		}
		e.Found = true
		return e, nil
	})
}

// MaxListEntries is the namespace size ListConfig caches; a loader should
// read one more to learn that a namespace is larger.
func (c *Cache) MaxListEntries() int { return c.opts.MaxListEntries }

// Get returns key's entry: from this process's memory, from Redis, or from
// load (one loader per key at a time), which is then stored in Redis for
// ttl (less for a session expiring sooner, NotFoundTTL for not found).
// Errors from load are returned and not cached. When Redis fails or is
// slow the entry comes from load; Get never fails because of Redis.
func (c *Cache) Get(ctx context.Context, key string, ttl time.Duration, load Loader) (Entry, error) {
	// isPending before overflow: entering overflow empties the queue
	// after setting overflow, so a key is always seen in one or the other.
	if !c.ready.Load() || c.isPending(key) || c.overflow.Load() {
		c.stats.bypassed.Add(1)
		return c.loadDirect(ctx, load)
	}
	for attempt := 0; attempt < 3; attempt++ {
		now := time.Now()
		if !c.br.allow(now) {
			c.stats.bypassed.Add(1)
			return c.loadDirect(ctx, load)
		}
		e, state, err := c.lookup(ctx, key, now)
		if err != nil {
			return c.loadDirect(ctx, load)
		}
		if state == stateHit {
			return e, nil
		}
		r, leader := c.fill(ctx, key, ttl, load)
		if leader || r.confirmed || r.err != nil {
			return r.e, r.err
		}
		// A flight we joined read a value that a write may have
		// overtaken before it could be stored: ask again.
	}
	return c.loadDirect(ctx, load)
}

type lookupState int

const (
	stateHit lookupState = iota
	stateMiss
)

// lookup reads key from local memory or Redis. A lease (another loader at
// work) reads as a miss; fill waits for it.
func (c *Cache) lookup(ctx context.Context, key string, now time.Time) (Entry, lookupState, error) {
	rctx := &lazyTimeout{Context: ctx, deadline: now.Add(c.opts.RedisTimeout)}
	defer rctx.stop()
	var res rueidis.RedisResult
	trust, fl := c.trustLocal(key, now)
	if trust {
		res = c.client.DoCache(rctx, c.client.B().Get().Key(key).Cache(), c.opts.LocalTTL)
		if res.IsCacheHit() && c.copyStart(res) <= fl.at.UnixMilli() && res.CachePXAT() != fl.verified {
			// A copy fetched before this process's last write to key (or
			// before the end of an overflow), whose invalidation push has
			// not arrived yet: ask Redis. If Redis holds the same bytes
			// (often a not-found entry, whose short TTL makes its copy look
			// older than it is), the copy is as fresh as that answer, and
			// later writes will invalidate or floor it: let it answer.
			c.stats.predated.Add(1)
			pxat := res.CachePXAT()
			mine, _ := res.ToString()
			res = c.client.Do(rctx, c.client.B().Get().Key(key).Build())
			if theirs, err := res.ToString(); err == nil && theirs == mine {
				c.floors.verify(key, fl.seq, pxat)
			}
		}
	} else {
		res = c.client.Do(rctx, c.client.B().Get().Key(key).Build())
	}
	s, err := res.ToString()
	if rueidis.IsRedisNil(err) {
		c.redisOK()
		c.stats.misses.Add(1)
		return Entry{}, stateMiss, nil
	}
	if err != nil {
		if ctx.Err() == nil { // the caller giving up says nothing about Redis
			c.redisFailed(err)
		} else {
			c.br.abandon() // but frees the probe slot it may hold
		}
		return Entry{}, stateMiss, err
	}
	if !res.IsCacheHit() { // a local hit says nothing about Redis either
		c.redisOK()
	}
	if len(s) > 0 && s[0] == leaseByte {
		c.stats.misses.Add(1)
		return Entry{}, stateMiss, nil
	}
	e, err := decode(s)
	if err != nil {
		// Not ours or from an incompatible version: reload over it.
		c.opts.Logger.Warn("cache: undecodable entry; reloading", "key", key)
		c.stats.misses.Add(1)
		return Entry{}, stateMiss, nil
	}
	if res.IsCacheHit() {
		c.stats.localHits.Add(1)
	} else {
		c.stats.redisHits.Add(1)
	}
	return live(e, now), stateHit, nil
}

// live hides an expired session: it reads as not found.
func live(e Entry, now time.Time) Entry {
	if e.Found && !e.ExpiresAt.IsZero() && !now.Before(e.ExpiresAt) {
		return Entry{}
	}
	return e
}

// trustLocal reports whether local copies may answer (not while
// recovering from a failed invalidation or an outage) and key's floor: if
// this process wrote key lately, when that write's delete was acknowledged
// (only a copy fetched after that may answer), or else when an overflow
// ended, if lately. The zero floor's time lies before every copy.
func (c *Cache) trustLocal(key string, now time.Time) (bool, floor) {
	if now.UnixNano() < c.uncachedUntil.Load() || c.br.current() != BreakerClosed {
		return false, floor{}
	}
	fl, _ := c.floors.get(key)
	if end := c.overflowEnded.Load(); end != 0 && (fl.at.IsZero() || fl.at.UnixNano() < end) && now.UnixNano()-end < int64(c.opts.LocalTTL) {
		// Copies from before the flush may have missed an invalidation
		// that was dropped.
		fl = floor{seq: fl.seq, at: time.Unix(0, end)}
	}
	return true, fl
}

// copyStart is when the fetch that made a local copy began (Unix ms), or
// earlier. rueidis stamps a copy with an expiry of its fetch's start plus
// the LocalTTL it was asked for, shortened to the key's TTL in Redis; so
// the expiry minus LocalTTL is at or before the fetch's start, and a copy
// whose copyStart lies after a write's acknowledged delete was read from
// Redis after that delete. A shortened expiry only makes a copy look older
// (it is then read from Redis, never served stale). Both stamps are this
// process's wall clock; a clock stepped back between a write and a fetch
// could make an older copy look newer.
func (c *Cache) copyStart(res rueidis.RedisResult) int64 {
	pxat := res.CachePXAT()
	if pxat <= 0 {
		return 0
	}
	return pxat - c.opts.LocalTTL.Milliseconds()
}

func (c *Cache) loadDirect(ctx context.Context, load Loader) (Entry, error) {
	c.stats.loads.Add(1)
	e, err := load(ctx)
	return live(e, time.Now()), err
}

func (c *Cache) redisOK() {
	if c.br.success() {
		// Back from an outage or a slow spell: invalidations may have
		// been missed or be late, so distrust local copies for a while.
		c.distrustLocal(c.opts.FloorWindow)
		c.opts.Logger.Info("cache: Redis is back; breaker closed")
	}
}

func (c *Cache) redisFailed(err error) {
	c.stats.redisErrors.Add(1)
	prev := c.br.current()
	c.br.failure(time.Now())
	if prev != BreakerOpen && c.br.current() == BreakerOpen {
		c.opts.Logger.Warn("cache: Redis failing; breaker open, reading the database", "err", err)
	}
}

func (c *Cache) distrustLocal(d time.Duration) {
	until := time.Now().Add(d).UnixNano()
	for {
		cur := c.uncachedUntil.Load()
		if cur >= until || c.uncachedUntil.CompareAndSwap(cur, until) {
			return
		}
	}
}

// flight is one in-process load of a key.
type flight struct {
	seq  uint64 // from c.seq when it started
	done chan struct{}
	res  fillResult
}

type fillResult struct {
	e   Entry
	err error
	// confirmed: the value was stored under our lease or read from Redis,
	// so no write acknowledged before the flight ended changed it.
	confirmed bool
}

// fill runs or joins the in-process flight for key. A flight that started
// before this process's last write to key, or before the end of an
// overflow, is not joined.
func (c *Cache) fill(ctx context.Context, key string, ttl time.Duration, load Loader) (fillResult, bool) {
	c.flightMu.Lock()
	if f, ok := c.flights[key]; ok {
		if fl, _ := c.floors.get(key); f.seq > fl.seq && f.seq > c.flightFloor.Load() {
			c.flightMu.Unlock()
			select {
			case <-f.done:
				return f.res, false
			case <-ctx.Done():
				return fillResult{err: ctx.Err()}, false
			}
		}
	}
	f := &flight{seq: c.seq.Add(1), done: make(chan struct{})}
	c.flights[key] = f
	c.flightMu.Unlock()

	// The flight runs on its own context so a joiner is not failed by
	// the leader's caller giving up.
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LeaseTTL)
	f.res = c.fillLeased(fctx, key, ttl, load)
	cancel()

	c.flightMu.Lock()
	if c.flights[key] == f {
		delete(c.flights, key)
	}
	c.flightMu.Unlock()
	close(f.done)
	return f.res, true
}

// The Lua that makes a load safe across processes.
const (
	// acquireLua returns the key's value if it holds an entry or a lease;
	// anything else (not ours, or from an incompatible version) is
	// overwritten like an empty key, so it cannot stall readers. Otherwise it
	// stores the caller's lease (ARGV[1]) for ARGV[2] ms and returns it.
	acquireLua = `
local v = redis.call('GET', KEYS[1])
if v then
  local b = string.byte(v, 1)
  if b == 1 or (b == 0 and string.len(v) == string.len(ARGV[1])) then return v end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]`
	// storeLua replaces the caller's lease with the value; if the lease
	// is gone (a write deleted the key) it stores nothing and returns 0.
	storeLua = `
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0`
	// releaseLua deletes the caller's lease if it is still there.
	releaseLua = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`
)

// fillLeased takes the key's lease (or waits for the process holding it),
// loads, and stores the result under the lease.
func (c *Cache) fillLeased(ctx context.Context, key string, ttl time.Duration, load Loader) fillResult {
	lease := newLease()
	giveUp := time.Now().Add(c.opts.LeaseWait)
	backoff := 500 * time.Microsecond
	for {
		v, err := c.redis(ctx, func(ctx context.Context) (string, error) {
			return c.acquire.Exec(ctx, c.client, []string{key},
				[]string{lease, fmt.Sprint(c.opts.LeaseTTL.Milliseconds())}).ToString()
		})
		if err != nil {
			e, err := c.loadDirect(ctx, load)
			return fillResult{e: e, err: err}
		}
		if v == lease {
			break // ours: load
		}
		if len(v) > 0 && v[0] != leaseByte {
			if e, err := decode(v); err == nil {
				c.stats.redisHits.Add(1)
				return fillResult{e: live(e, time.Now()), confirmed: true}
			}
			// A corrupt entry of our format: wait it out like a lease.
		}
		// Another process is loading: wait for its value.
		if time.Now().After(giveUp) {
			e, err := c.loadDirect(ctx, load)
			return fillResult{e: e, err: err}
		}
		select {
		case <-ctx.Done():
			return fillResult{err: ctx.Err()}
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 20*time.Millisecond)
	}

	c.stats.loads.Add(1)
	e, err := load(ctx)
	// The lease's release or store runs even if the load used up the
	// flight's deadline: skipping it would leave the lease for others to
	// wait out, and failing it would be blamed on Redis. The compare-and-set
	// keeps a late store harmless.
	ctx = context.WithoutCancel(ctx)
	if err != nil {
		c.redis(ctx, func(ctx context.Context) (string, error) {
			return "", c.release.Exec(ctx, c.client, []string{key}, []string{lease}).Error()
		})
		return fillResult{err: err}
	}
	now := time.Now()
	e = live(e, now)
	switch {
	case !e.Found && !e.TooLarge:
		ttl = c.opts.NotFoundTTL
	case !e.ExpiresAt.IsZero():
		ttl = min(ttl, e.ExpiresAt.Sub(now))
	}
	stored := false
	if ttl >= time.Millisecond {
		n, err := c.redisInt(ctx, func(ctx context.Context) (int64, error) {
			return c.store.Exec(ctx, c.client, []string{key},
				[]string{lease, encode(e), fmt.Sprint(ttl.Milliseconds())}).AsInt64()
		})
		stored = err == nil && n == 1
	} else {
		c.redis(ctx, func(ctx context.Context) (string, error) {
			return "", c.release.Exec(ctx, c.client, []string{key}, []string{lease}).Error()
		})
	}
	return fillResult{e: e, confirmed: stored}
}

// redis runs one Redis call under RedisTimeout and feeds the breaker.
func (c *Cache) redis(ctx context.Context, fn func(context.Context) (string, error)) (string, error) {
	rctx, cancel := context.WithTimeout(ctx, c.opts.RedisTimeout)
	defer cancel()
	v, err := fn(rctx)
	if err != nil && !rueidis.IsRedisNil(err) {
		c.redisFailed(err)
		return v, err
	}
	c.redisOK()
	return v, nil
}

func (c *Cache) redisInt(ctx context.Context, fn func(context.Context) (int64, error)) (int64, error) {
	var n int64
	_, err := c.redis(ctx, func(ctx context.Context) (string, error) {
		var err error
		n, err = fn(ctx)
		return "", err
	})
	return n, err
}

func newLease() string {
	var b [12]byte
	rand.Read(b[:])
	return "\x00" + hex.EncodeToString(b[:])
}

// ErrInvalidationQueued means Redis could not delete the keys now; they
// are read from the database here, and retried until Redis deletes them
// (past MaxPending, the overflow's flush deletes them; see Options).
var ErrInvalidationQueued = errors.New("cache: invalidation failed; queued for retry")

// Invalidate deletes keys in Redis after their source changed; Redis then
// pushes the invalidation to every process holding them. Call it after the
// change committed. This process never serves a memory copy of the keys
// fetched before the delete was acknowledged (see copyStart), so it cannot
// serve a value older than the change. If Redis cannot be reached, the keys are queued,
// read from the database by this process, and retried every RetryInterval
// until Redis deletes them (ErrInvalidationQueued).
func (c *Cache) Invalidate(ctx context.Context, keys ...string) error {
	if len(keys) == 0 {
		return nil
	}
	c.stats.invalidations.Add(int64(len(keys)))
	c.markFloors(keys)
	// Even with the breaker open: the breaker spares reads a slow Redis,
	// but other processes may hold the keys, and only this delete (or its
	// retry) tells them.
	var err error
	if c.ready.Load() {
		err = c.invalidateNow(ctx, keys)
	} else {
		err = errors.New("not connected to Redis yet")
	}
	// Flights and local copies from before the delete are now distrusted.
	c.markFloors(keys)
	if err != nil {
		c.queue(keys)
		c.distrustLocal(c.opts.FloorWindow)
		return fmt.Errorf("%w: %v", ErrInvalidationQueued, err)
	}
	return nil
}

func (c *Cache) invalidateNow(ctx context.Context, keys []string) error {
	ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.InvalidateTimeout)
	defer cancel()
	if err := c.del(ictx, keys); err != nil {
		c.redisFailed(err)
		return err
	}
	c.redisOK()
	return nil
}

// del deletes keys in batches.
func (c *Cache) del(ctx context.Context, keys []string) error {
	const batch = 512
	for len(keys) > 0 {
		n := min(batch, len(keys))
		if err := c.client.Do(ctx, c.client.B().Del().Key(keys[:n]...).Build()).Error(); err != nil {
			return err
		}
		keys = keys[n:]
	}
	return nil
}

// InvalidateSession invalidates the session whose token hashes to tokenHash.
func (c *Cache) InvalidateSession(ctx context.Context, tokenHash []byte) error {
	return c.Invalidate(ctx, c.SessionKey(tokenHash))
}

// InvalidateConfig invalidates one config value and its namespace's list.
func (c *Cache) InvalidateConfig(ctx context.Context, namespace, key string) error {
	return c.Invalidate(ctx, c.ConfigChangeKeys(namespace, key)...)
}

// ConfigChangeKeys are the keys a change of one config value invalidates:
// the value's and its namespace's list.
func (c *Cache) ConfigChangeKeys(namespace, key string) []string {
	return []string{c.ConfigKey(namespace, key), c.ConfigListKey(namespace)}
}

// markFloors records a write to keys now: called when a write's delete is
// sent and again once it is acknowledged (the later mark is the one local
// copies are judged by). A floor is kept for as long as a copy fetched
// before it may live (LocalTTL) or a flight started before it may run
// (LeaseTTL).
func (c *Cache) markFloors(keys []string) {
	now := time.Now()
	for _, k := range keys {
		c.floors.set(k, c.seq.Add(1), now, c.opts.LocalTTL+c.opts.LeaseTTL)
	}
}

// queue records keys whose delete failed. Each gets a new generation, so a
// retry already under way for an older failure does not drop it. Past
// MaxPending keys the cache overflows instead: the queue is dropped, and
// while in overflow so is every key that fails; the flush that ends the
// overflow covers them all.
func (c *Cache) queue(keys []string) {
	c.pendingMu.Lock()
	defer c.pendingMu.Unlock()
	if c.overflow.Load() {
		c.drops += uint64(len(keys))
		c.stats.dropped.Add(int64(len(keys)))
		return
	}
	for _, k := range keys {
		c.pending[k] = c.seq.Add(1)
	}
	if n := len(c.pending); n > c.opts.MaxPending {
		// Overflow first, then empty the queue: a reader that no longer
		// finds its key pending then finds the overflow (see Get).
		c.overflow.Store(true)
		c.pending = make(map[string]uint64) // a fresh map frees the old one's buckets
		c.drops += uint64(n)
		c.stats.dropped.Add(int64(n))
		c.opts.Logger.Warn("cache: too many invalidations pending; dropped them, reading the database until Redis answers and the cache's keys are flushed",
			"keys", n, "max_pending", c.opts.MaxPending)
	}
	c.npending.Store(int64(len(c.pending)))
}

func (c *Cache) isPending(key string) bool {
	if c.npending.Load() == 0 {
		return false
	}
	c.pendingMu.Lock()
	defer c.pendingMu.Unlock()
	_, ok := c.pending[key]
	return ok
}

// retryBatch is how many queued keys one retry deletes.
const retryBatch = 4096

// retryLoop deletes queued keys in Redis until none are left.
func (c *Cache) retryLoop() {
	defer close(c.done)
	t := time.NewTicker(c.opts.RetryInterval)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		if c.overflow.Load() {
			c.endOverflow(c.flushPrefix)
			continue
		}
		if c.npending.Load() == 0 {
			continue
		}
		// A bounded share per tick, so each try fits its timeout and a
		// long outage's backlog drains in steps.
		c.pendingMu.Lock()
		n := min(len(c.pending), retryBatch)
		gens := make(map[string]uint64, n)
		keys := make([]string, 0, n)
		for k, g := range c.pending {
			if len(keys) == retryBatch {
				break
			}
			gens[k] = g
			keys = append(keys, k)
		}
		c.pendingMu.Unlock()
		if err := c.invalidateNow(context.Background(), keys); err != nil {
			continue
		}
		c.markFloors(keys)
		c.pendingMu.Lock()
		for _, k := range keys {
			// A key queued again meanwhile failed after this delete was
			// sent; it stays for the next try.
			if c.pending[k] == gens[k] {
				delete(c.pending, k)
			}
		}
		c.npending.Store(int64(len(c.pending)))
		c.pendingMu.Unlock()
		c.stats.retried.Add(int64(len(keys)))
		c.opts.Logger.Info("cache: queued invalidations delivered", "keys", len(keys))
	}
}

// flushScanCount is the COUNT of each SCAN in a flush.
const flushScanCount = 1000

// errStopping ends a flush when the cache closes.
var errStopping = errors.New("cache closing")

// endOverflow runs flush, a pass deleting every key of this cache in Redis
// (flushPrefix), and, if the whole pass succeeded and no invalidation was
// dropped while it ran, ends the overflow. Otherwise the overflow stays and
// the next tick tries again.
//
// Why this is enough: a value made stale by a dropped invalidation was read
// from the database before that write committed, under a lease taken
// before the read, so before the pass began. SCAN returns every key
// present for the whole pass, so the value, or the lease it would replace,
// is deleted unless someone deleted it first; a loader whose lease is gone
// stores nothing (storeLua). A lease taken after the pass passed the key
// reads the database after the write. What is left is this process's own
// state: flights that began before now are not joined (flightFloor), and
// memory copies fetched before now, whose invalidation pushes may arrive
// after the deletes' replies, do not answer (overflowEnded, trustLocal).
func (c *Cache) endOverflow(flush func() (int, error)) {
	c.pendingMu.Lock()
	drops := c.drops
	c.pendingMu.Unlock()
	n, err := flush()
	if err != nil {
		if !errors.Is(err, errStopping) {
			c.redisFailed(err)
			if last := c.flushLogged.Load(); time.Since(time.Unix(0, last)) > 10*time.Second {
				c.flushLogged.Store(time.Now().UnixNano())
				c.opts.Logger.Warn("cache: flush to end the overflow failed; reading the database, retrying", "err", err)
			}
		}
		return
	}
	c.redisOK()
	c.pendingMu.Lock()
	defer c.pendingMu.Unlock()
	if c.drops != drops {
		return // a key dropped during the pass may have been passed over
	}
	c.flightFloor.Store(c.seq.Add(1))
	c.overflowEnded.Store(time.Now().UnixNano())
	c.overflow.Store(false)
	c.stats.prefixFlushes.Add(1)
	c.opts.Logger.Info("cache: overflow over; deleted the cache's keys in Redis, caching again", "keys", n)
}

// flushPattern matches the keys of this cache and nothing else under its
// prefix: event streams (<prefix>events:…) and rate limits (<prefix>rl:…)
// share the default prefix. Keep its kinds in step with the key builders.
func (c *Cache) flushPattern() string {
	var b []byte
	for i := 0; i < len(c.opts.Prefix); i++ {
		switch ch := c.opts.Prefix[i]; ch {
		case '*', '?', '[', ']', '\\':
			b = append(b, '\\', ch)
		default:
			b = append(b, ch)
		}
	}
	return string(b) + "[scl]:*"
}

// flushPrefix deletes every key matching flushPattern on every node the
// client knows, a SCAN page at a time, and returns how many it matched.
// Each key is UNLINKed by its own command (pipelined), so keys of
// different Cluster slots never share one.
func (c *Cache) flushPrefix() (int, error) {
	pattern := c.flushPattern()
	deleted := 0
	for addr, node := range c.client.Nodes() {
		var cursor uint64
		for {
			select {
			case <-c.stop:
				return deleted, errStopping
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), c.opts.InvalidateTimeout)
			page, err := node.Do(ctx, node.B().Scan().Cursor(cursor).Match(pattern).Count(flushScanCount).Build()).AsScanEntry()
			if err == nil && len(page.Elements) > 0 {
				cmds := make(rueidis.Commands, 0, len(page.Elements))
				for _, k := range page.Elements {
					cmds = append(cmds, c.client.B().Unlink().Key(k).Build())
				}
				for _, r := range c.client.DoMulti(ctx, cmds...) {
					if err = r.Error(); err != nil {
						break
					}
				}
			}
			cancel()
			if err != nil {
				return deleted, fmt.Errorf("flush %s: %w", addr, err)
			}
			deleted += len(page.Elements)
			if page.Cursor == 0 {
				break
			}
			cursor = page.Cursor
		}
	}
	return deleted, nil
}

// floors remembers, for keys written here lately, the sequence number and
// time of the write. Two generations, swapped every keep: a floor lives
// between keep and twice keep, and forgetting costs no walk of the map.
type floors struct {
	mu       sync.RWMutex
	cur, old map[string]floor
	swapped  time.Time
	n        atomic.Int64 // len(cur)+len(old), for the lock-free empty check
}

type floor struct {
	seq uint64
	at  time.Time
	// verified is the rueidis stamp (CachePXAT) of a memory copy from
	// before the write that was found equal to Redis's value after it: it
	// may answer (see lookup). Any later write resets it.
	verified int64
}

// get returns key's floor, if it has one.
func (f *floors) get(key string) (floor, bool) {
	if f.n.Load() == 0 {
		return floor{}, false
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	if fl, ok := f.cur[key]; ok {
		return fl, true
	}
	fl, ok := f.old[key]
	return fl, ok
}

// set records a write to key. It never moves a floor back: two writes of
// one key (or of two config values sharing a namespace list) may mark in
// either order. Floors are kept at least keep, which outlasts any local
// copy and any flight from before the write.
func (f *floors) set(key string, seq uint64, now time.Time, keep time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if now.Sub(f.swapped) > keep {
		f.old, f.cur, f.swapped = f.cur, make(map[string]floor), now
	}
	fl, ok := f.cur[key]
	if !ok {
		fl = f.old[key]
	}
	if seq > fl.seq {
		fl.seq = seq
	}
	if now.After(fl.at) {
		fl.at = now
	}
	fl.verified = 0
	f.cur[key] = fl
	f.n.Store(int64(len(f.cur) + len(f.old)))
}

// verify records that key's memory copy stamped pxat matched Redis after
// the write whose floor has sequence seq (not if a later write came).
func (f *floors) verify(key string, seq uint64, pxat int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fl, ok := f.cur[key]; ok && fl.seq == seq {
		fl.verified = pxat
		f.cur[key] = fl
	} else if fl, ok := f.old[key]; ok && fl.seq == seq {
		fl.verified = pxat
		f.old[key] = fl
	}
}

// lazyTimeout is ctx with a deadline whose timer is made only when someone
// asks for it. rueidis answers a local hit without looking at the context,
// so the hit path skips context.WithDeadline's timer and allocations (most
// of its cost, measured by BenchmarkGetSessionHit).
type lazyTimeout struct {
	context.Context
	deadline time.Time

	once   sync.Once
	ctx    context.Context
	cancel context.CancelFunc
}

func (l *lazyTimeout) init() {
	l.once.Do(func() { l.ctx, l.cancel = context.WithDeadline(l.Context, l.deadline) })
}

func (l *lazyTimeout) Deadline() (time.Time, bool) { l.init(); return l.ctx.Deadline() }
func (l *lazyTimeout) Done() <-chan struct{}       { l.init(); return l.ctx.Done() }
func (l *lazyTimeout) Err() error                  { l.init(); return l.ctx.Err() }

// stop releases the timer, if one was made.
func (l *lazyTimeout) stop() {
	l.once.Do(func() {})
	if l.cancel != nil {
		l.cancel()
	}
}
