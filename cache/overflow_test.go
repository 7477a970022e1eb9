package cache

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/internal/testenv"
)

// overflowOptions make a cache that overflows past max queued keys and
// finds a dead link and a returned Redis quickly.
func overflowOptions(max int) Options {
	return Options{
		MaxPending:        max,
		ConnTimeout:       300 * time.Millisecond,
		InvalidateTimeout: 100 * time.Millisecond,
		RetryInterval:     20 * time.Millisecond,
		BreakerCooldown:   50 * time.Millisecond,
	}
}

// cutOff stalls proxy, losing what is sent across it, and writes a new
// value for each key with A's invalidation failing, until A overflows.
func cutOff(t *testing.T, proxy *stallProxy, a *Cache, s *source, keys []string) {
	t.Helper()
	proxy.lose.Store(true)
	proxy.stalled.Store(true)
	for _, k := range keys {
		s.set(k, `"new"`)
		if err := a.Invalidate(context.Background(), k); !errors.Is(err, ErrInvalidationQueued) {
			t.Fatalf("invalidate %s while cut off: %v", k, err)
		}
	}
	if st := a.Stats(); !st.Overflow || st.Pending != 0 || st.Dropped < int64(a.opts.MaxPending)+1 {
		t.Fatalf("after %d failed invalidations, MaxPending %d: %+v; want overflow, nothing pending", len(keys), a.opts.MaxPending, st)
	}
}

func waitOverflowEnd(t *testing.T, a *Cache, each func()) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for a.Stats().Overflow {
		if time.Now().After(deadline) {
			t.Fatalf("overflow did not end: %+v", a.Stats())
		}
		if each != nil {
			each()
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func rawGet(t *testing.T, raw rueidis.Client, k string) (string, bool) {
	t.Helper()
	v, err := raw.Do(context.Background(), raw.B().Get().Key(k).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return "", false
	}
	if err != nil {
		t.Fatal(err)
	}
	return v, true
}

// TestOverflow: A is partitioned from a Redis that stays up for others, and
// more writes fail to invalidate than it may queue. While in overflow A
// reads every key from the database, however stale Redis is; once A
// reaches Redis again it deletes every key of its cache there (and no one
// else's), leaves overflow, and caches again.
func TestOverflow(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	_, otherPrefix := testenv.Redis(t)
	proxy := newStallProxy(t, addr)
	const max = 10
	a := newTestCache(t, proxy.lis.Addr().String(), prefix, overflowOptions(max))
	raw := rawClient(t, addr)
	ctx := context.Background()
	s := newSource()

	keys := make([]string, max+5)
	for i := range keys {
		keys[i] = a.ConfigKey("ns", fmt.Sprint(i))
		s.set(keys[i], `"old"`)
		for range 3 { // loaded, then read from Redis into memory, then from memory
			mustGet(t, a, keys[i], s)
		}
	}
	if a.Stats().LocalHits == 0 {
		t.Fatalf("nothing in A's memory: %+v", a.Stats())
	}
	// Keys on this Redis that are not this cache's: another prefix's, and
	// this prefix's event stream and rate limit.
	foreign := []string{otherPrefix + "c:ns:0", otherPrefix + "s:ab", prefix + "events:config", prefix + "rl:read:1.2.3.4"}
	for _, k := range foreign {
		if err := raw.Do(ctx, raw.B().Set().Key(k).Value("keep").Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}

	cutOff(t, proxy, a, s, keys)
	// Others, who still reach Redis, may put old values back: a session
	// and a list A changed too, whose invalidations were dropped.
	sk := a.SessionKey([]byte("token-hash"))
	lk := a.ConfigListKey("ns")
	for _, k := range []string{sk, lk} {
		s.set(k, `"old"`)
		s.set(k, `"new"`)
		if err := a.Invalidate(ctx, k); !errors.Is(err, ErrInvalidationQueued) {
			t.Fatalf("invalidate %s in overflow: %v", k, err)
		}
	}
	for _, k := range append([]string{sk, lk}, keys...) {
		stale := a.mac.seal(k, Entry{Found: true, Value: `"old"`, Version: 1}, time.Now().Add(time.Hour))
		if err := raw.Do(ctx, raw.B().Set().Key(k).Value(stale).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	readAll := func() {
		t.Helper()
		for _, k := range append([]string{sk, lk}, keys...) {
			if e := mustGet(t, a, k, s); e.Value != `"new"` || e.Version != 2 {
				t.Fatalf("read %s = %+v, want the database's version 2 (overflow %v)", k, e, a.Stats().Overflow)
			}
		}
	}
	before := a.Stats()
	readAll()
	if st := a.Stats(); !st.Overflow || st.Bypassed-before.Bypassed != int64(len(keys)+2) ||
		st.LocalHits != before.LocalHits || st.RedisHits != before.RedisHits {
		t.Fatalf("reads in overflow: before %+v, after %+v; want every one bypassed", before, st)
	}

	proxy.stalled.Store(false)
	waitOverflowEnd(t, a, readAll)
	if st := a.Stats(); st.PrefixFlushes != 1 {
		t.Fatalf("after overflow: %+v, want one prefix flush", st)
	}
	for _, k := range append([]string{sk, lk}, keys...) {
		if v, ok := rawGet(t, raw, k); ok {
			if e, err := a.mac.open(k, v, time.Now(), false); err != nil || e.Version != 2 {
				t.Fatalf("%s in Redis after the flush: %q", k, v)
			}
		}
	}
	for _, k := range foreign {
		if v, ok := rawGet(t, raw, k); !ok || v != "keep" {
			t.Fatalf("flush touched %s: %q, %v", k, v, ok)
		}
	}

	// Caching resumes: hits from memory, still the new values.
	deadline := time.Now().Add(30 * time.Second)
	for hits := a.Stats().LocalHits; a.Stats().LocalHits == hits; {
		if time.Now().After(deadline) {
			t.Fatalf("caching did not resume: %+v", a.Stats())
		}
		readAll()
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("a: %+v", a.Stats())
}

// TestLoadBeforeFlushCannotStore: a load that read the old value before a
// write whose invalidation was dropped by the overflow cannot store that
// value once the flush ran, even though its lease would still be live.
func TestLoadBeforeFlushCannotStore(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	proxy := newStallProxy(t, addr)
	o := overflowOptions(2)
	o.LeaseTTL = time.Minute // only the flush can remove the lease
	a := newTestCache(t, proxy.lis.Addr().String(), prefix, o)
	b := newTestCache(t, addr, prefix, Options{})
	raw := rawClient(t, addr)
	ctx := context.Background()
	s := newSource()
	k := a.ConfigKey("ns", "slow")
	s.set(k, `"old"`)

	read, gate := make(chan struct{}), make(chan struct{})
	slow := func(ctx context.Context) (Entry, error) {
		e, err := s.loader(k)(ctx)
		close(read)
		<-gate
		return e, err
	}
	got := make(chan Entry, 1)
	go func() {
		e, _ := a.Get(ctx, k, time.Minute, slow)
		got <- e
	}()
	select {
	case <-read: // A holds the lease and has read "old"
	case <-time.After(30 * time.Second):
		t.Fatal("the load never ran")
	}
	if v, ok := rawGet(t, raw, k); !ok || len(v) == 0 || v[0] != leaseByte {
		t.Fatalf("no lease in Redis during the load: %q", v)
	}

	cutOff(t, proxy, a, s, []string{k, a.ConfigKey("ns", "x"), a.ConfigKey("ns", "y")})
	proxy.stalled.Store(false)
	waitOverflowEnd(t, a, nil)
	if _, ok := rawGet(t, raw, k); ok {
		t.Fatal("the load's lease survived the flush")
	}
	close(gate)
	if e := <-got; e.Value != `"old"` {
		t.Fatalf("the slow load returned %+v", e) // it started before the write
	}
	if v, ok := rawGet(t, raw, k); ok {
		t.Fatalf("Redis holds the slow load's value after the flush: %q", v)
	}
	for _, c := range []*Cache{a, b} {
		if e := mustGet(t, c, k, s); e.Value != `"new"` {
			t.Fatalf("after the flush: %+v", e)
		}
	}
}

// TestFlushPatternEscapesPrefix: glob characters in a prefix match only
// themselves, and only the cache's kinds of key match.
func TestFlushPatternEscapesPrefix(t *testing.T) {
	c := newCache(Options{Prefix: `a*b?[x]\:`})
	if got, want := c.flushPattern(), `a\*b\?\[x\]\\:[scl]:*`; got != want {
		t.Fatalf("flushPattern = %q, want %q", got, want)
	}
}

// TestOverflowBypassesAReachableRedis: Redis answers reads but never a
// delete in time, so the overflow cannot end; every read still comes from
// the database although Redis holds old values for every key.
func TestOverflowBypassesAReachableRedis(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	o := overflowOptions(2)
	o.InvalidateTimeout = time.Nanosecond // deletes (and flushes) always time out
	o.BreakerThreshold = 1 << 30          // and the breaker never opens
	a := newTestCache(t, addr, prefix, o)
	raw := rawClient(t, addr)
	ctx := context.Background()
	s := newSource()
	keys := []string{a.ConfigKey("ns", "a"), a.ConfigKey("ns", "b"), a.ConfigKey("ns", "c")}
	for _, k := range keys {
		s.set(k, `"old"`)
		for range 3 {
			mustGet(t, a, k, s)
		}
	}
	for _, k := range keys {
		s.set(k, `"new"`)
		if err := a.Invalidate(ctx, k); !errors.Is(err, ErrInvalidationQueued) {
			t.Fatalf("invalidate with a 1 ns timeout: %v", err)
		}
	}
	for _, k := range keys {
		stale := a.mac.seal(k, Entry{Found: true, Value: `"old"`, Version: 1}, time.Now().Add(time.Hour))
		if err := raw.Do(ctx, raw.B().Set().Key(k).Value(stale).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	for range 20 {
		for _, k := range keys {
			if e := mustGet(t, a, k, s); e.Version != 2 {
				t.Fatalf("read %s in overflow = %+v, want version 2 (%+v)", k, e, a.Stats())
			}
		}
		time.Sleep(5 * time.Millisecond) // let the retry loop fail a few flushes
	}
	if st := a.Stats(); !st.Overflow || st.PrefixFlushes != 0 || st.Breaker != BreakerClosed {
		t.Fatalf("stats %+v; want overflow, no flush, breaker closed", st)
	}
}

// TestEndOverflow: only a complete pass during which no invalidation was
// dropped ends an overflow; a drop during the pass may have been passed
// over, and a failed pass may have missed anything.
func TestEndOverflow(t *testing.T) {
	for _, tc := range []struct {
		name  string
		pass  func(c *Cache) (int, error)
		ended bool
	}{
		{"clean pass", func(*Cache) (int, error) { return 3, nil }, true},
		{"pass failed midway", func(*Cache) (int, error) { return 1, errors.New("i/o timeout") }, false},
		{"drop during the pass", func(c *Cache) (int, error) {
			c.queue([]string{"k"})
			return 3, nil
		}, false},
		{"closing", func(*Cache) (int, error) { return 0, errStopping }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache(Options{MaxPending: 1, Logger: quiet})
			c.queue([]string{"a", "b"})
			if !c.overflow.Load() || c.npending.Load() != 0 {
				t.Fatalf("two keys queued, MaxPending 1: %+v", c.Stats())
			}
			floor := c.flightFloor.Load()
			c.endOverflow(func() (int, error) { return tc.pass(c) })
			st := c.Stats()
			if st.Overflow == tc.ended || (st.PrefixFlushes == 1) != tc.ended || (c.flightFloor.Load() > floor) != tc.ended {
				t.Fatalf("after the pass: %+v, flight floor %d → %d; want ended %v", st, floor, c.flightFloor.Load(), tc.ended)
			}
			if tc.ended {
				return
			}
			c.endOverflow(func() (int, error) { return 0, nil })
			if st := c.Stats(); st.Overflow || st.PrefixFlushes != 1 {
				t.Fatalf("after a clean pass: %+v, want overflow over", st)
			}
		})
	}
}

// TestFlightBeforeFlushIsNotJoined: a read after an overflow ended starts
// its own load rather than wait for one that began before the flush.
func TestFlightBeforeFlushIsNotJoined(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	a := newTestCache(t, addr, prefix, Options{MaxPending: 1, RetryInterval: 5 * time.Millisecond})
	k := a.ConfigKey("ns", "k")
	read, gate := make(chan struct{}), make(chan struct{})
	defer close(gate)
	go a.Get(context.Background(), k, time.Minute, func(context.Context) (Entry, error) {
		close(read)
		<-gate
		return Entry{Found: true, Value: `"old"`, Version: 1}, nil
	})
	<-read
	a.queue([]string{a.ConfigKey("ns", "x"), a.ConfigKey("ns", "y")})
	waitOverflowEnd(t, a, nil)
	got := make(chan Entry, 1)
	go func() {
		e, _ := a.Get(context.Background(), k, time.Minute, func(context.Context) (Entry, error) {
			return Entry{Found: true, Value: `"new"`, Version: 2}, nil
		})
		got <- e
	}()
	select {
	case e := <-got:
		if e.Version != 2 {
			t.Fatalf("read after the flush = %+v", e)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the read after the flush waits for the load from before it")
	}
}
