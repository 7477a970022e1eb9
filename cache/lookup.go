package cache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/redis/rueidis"
)

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
	trust, fl := c.trustLocal(key, now)
	var gen uint64
	if trust && c.memo != nil {
		if m, ok := c.memo.get(key); ok && now.UnixMilli() < m.pxat && !c.predates(m.pxat, fl) && !now.After(m.validUntil) {
			c.stats.localHits.Add(1)
			c.stats.memoHits.Add(1)
			return live(m.e, now), stateHit, nil
		}
		gen = c.memo.gen(key) // before DoCache: see memo
	}
	rctx := &lazyTimeout{Context: ctx, deadline: now.Add(c.opts.RedisTimeout)}
	defer rctx.stop()
	var res rueidis.RedisResult
	if trust {
		res = c.client.DoCache(rctx, c.client.B().Get().Key(key).Cache(), c.opts.LocalTTL)
		if res.IsCacheHit() && c.predates(res.CachePXAT(), fl) {
			// A copy fetched before this process's last write to key (or
			// before the end of an overflow), whose invalidation push has
			// not arrived yet: ask Redis. If Redis holds the same bytes,
			// the copy may answer (doc.go, Read-your-writes).
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
			c.redisFailed(err, now)
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
	e, validUntil, err := c.mac.openUntil(key, s, now, trust)
	if err != nil {
		// Not served: fill replaces it (acquireLua, fillLeased).
		c.rejected(key, err)
		c.stats.misses.Add(1)
		return Entry{}, stateMiss, nil
	}
	if res.IsCacheHit() {
		c.stats.localHits.Add(1)
		if c.memo != nil {
			c.memo.put(key, gen, memoEntry{e: e, pxat: res.CachePXAT(), validUntil: validUntil}, len(s))
		}
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

func (c *Cache) loadDirect(ctx context.Context, load Loader) (Entry, error) {
	c.stats.loads.Add(1)
	e, err := load(ctx)
	return live(e, time.Now()), err
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
	// acquireLua returns the key's value if it holds an entry (of format
	// 2, see formatByte) or a lease; anything else (not ours, or from an
	// incompatible version) is overwritten like an empty key, so it cannot
	// stall readers. Otherwise it stores the caller's lease (ARGV[1]) for
	// ARGV[2] ms and returns it.
	acquireLua = `
local v = redis.call('GET', KEYS[1])
if v then
  local b = string.byte(v, 1)
  if b == 2 or (b == 0 and string.len(v) == string.len(ARGV[1])) then return v end
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
			now := time.Now()
			e, err := c.mac.open(key, v, now, false)
			if err == nil {
				c.stats.redisHits.Add(1)
				return fillResult{e: live(e, now), confirmed: true}
			}
			// Not to be served, nor waited out: delete it unless it
			// changed meanwhile, and take the lease.
			c.rejected(key, err)
			if c.releaseLease(ctx, key, v) == nil && time.Now().Before(giveUp) {
				continue
			}
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
		c.releaseLease(ctx, key, lease)
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
				[]string{lease, c.mac.seal(key, e, now.Add(ttl)), fmt.Sprint(ttl.Milliseconds())}).AsInt64()
		})
		stored = err == nil && n == 1
	} else {
		c.releaseLease(ctx, key, lease)
	}
	return fillResult{e: e, confirmed: stored}
}

// releaseLease deletes key's lease (or any value) if it is still the
// caller's.
func (c *Cache) releaseLease(ctx context.Context, key, lease string) error {
	_, err := c.redis(ctx, func(ctx context.Context) (string, error) {
		return "", c.release.Exec(ctx, c.client, []string{key}, []string{lease}).Error()
	})
	return err
}

// rejected counts an entry read from Redis that may not be served, and
// warns at most once a minute.
func (c *Cache) rejected(key string, err error) {
	if errors.Is(err, errPastValidity) {
		c.stats.pastValidity.Add(1)
	} else {
		c.stats.rejected.Add(1)
	}
	now := time.Now().UnixNano()
	if last := c.rejectLogged.Load(); now-last > int64(time.Minute) && c.rejectLogged.CompareAndSwap(last, now) {
		c.opts.Logger.Warn("cache: entry in Redis not served; reading the database and replacing it (forged, written with another MAC key or by another version, or replayed)",
			"key", key, "err", err)
	}
}

func newLease() string {
	var b [12]byte
	rand.Read(b[:])
	return "\x00" + hex.EncodeToString(b[:])
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
