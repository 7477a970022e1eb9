package cache

import (
	"context"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
)

// A value in a key that is neither an entry nor a lease (not ours, or an
// incompatible format) is replaced by the first load, not waited on.
func TestForeignValueIsReplaced(t *testing.T) {
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{})
	raw := rawClient(t, addr)
	s := newSource()
	k := c.ConfigKey("ns", "g")
	s.set(k, `1`)
	ctx := context.Background()
	if err := raw.Do(ctx, raw.B().Set().Key(k).Value("garbage").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if e := mustGet(t, c, k, s); e.Value != `1` {
		t.Fatalf("read %+v", e)
	}
	v, err := raw.Do(ctx, raw.B().Get().Key(k).Build()).ToString()
	if err != nil {
		t.Fatal(err)
	}
	if e, err := c.mac.open(k, v, time.Now(), false); err != nil || e.Value != `1` {
		t.Fatalf("Redis holds %q after a load, want the loaded entry", v)
	}
}

// A half-open breaker's probe given up by its caller frees the probe slot:
// the next read probes Redis and closes the breaker.
func TestAbandonedProbeFreesBreaker(t *testing.T) {
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{BreakerCooldown: 10 * time.Millisecond})
	s := newSource()
	k := c.ConfigKey("ns", "b")
	s.set(k, `1`)
	for range c.opts.BreakerThreshold {
		c.br.failure(time.Now(), time.Now()) // one after another: all count
	}
	time.Sleep(20 * time.Millisecond) // past the cooldown: the next call probes
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c.Get(ctx, k, time.Minute, s.loader(k))
	mustGet(t, c, k, s)
	if st := c.br.current(); st != BreakerClosed {
		t.Fatalf("breaker %v after a read with Redis healthy, want closed", st)
	}
}

// A key queued again while a retry of its older failure is under way stays
// queued: the retry's delete may have run before the newer write.
func TestRequeuedKeySurvivesOlderRetry(t *testing.T) {
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{})
	k := c.ConfigKey("ns", "q")
	c.queue([]string{k})
	c.pendingMu.Lock()
	older := c.pending[k]
	c.pendingMu.Unlock()
	c.queue([]string{k}) // a newer write's delete failed too
	c.pendingMu.Lock()
	newer := c.pending[k]
	c.pendingMu.Unlock()
	if newer == older {
		t.Fatalf("requeue kept generation %d", older)
	}
}

// A load that outlives its flight's deadline (a slow database) is not a
// Redis failure, and its lease is released rather than left for others to
// wait out.
func TestSlowLoadIsNotARedisFailure(t *testing.T) {
	addr, prefix := testenv.Redis(t)
	// A generous Redis timeout: on a loaded machine a real Redis timeout
	// would count as an error and prove nothing about slow loads.
	c := newTestCache(t, addr, prefix, Options{LeaseTTL: 100 * time.Millisecond, RedisTimeout: 2 * time.Second})
	raw := rawClient(t, addr)
	k := c.ConfigKey("ns", "slow")
	for range c.opts.BreakerThreshold + 1 {
		// The caller's deadline bounds a load that goes straight to the
		// loader (when the Redis call does time out after all).
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c.Get(ctx, k, time.Minute, func(ctx context.Context) (Entry, error) {
			<-ctx.Done()
			return Entry{}, ctx.Err()
		})
		cancel()
	}
	if st := c.Stats(); st.RedisErrors != 0 || st.Breaker != BreakerClosed {
		t.Fatalf("after slow loads: %+v, want no Redis errors and the breaker closed", st)
	}
	if n, err := raw.Do(context.Background(), raw.B().Exists().Key(k).Build()).AsInt64(); err != nil || n != 0 {
		t.Fatalf("lease left in Redis after the failed load: exists=%d, %v", n, err)
	}
}
