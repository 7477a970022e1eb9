package cache

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/rueidis"
)

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
	start := time.Now()
	ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.InvalidateTimeout)
	defer cancel()
	if err := c.del(ictx, keys); err != nil {
		c.redisFailed(err, start)
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
// the next tick tries again. Why this is enough: doc.go, Overflow.
func (c *Cache) endOverflow(flush func() (int, error)) {
	c.pendingMu.Lock()
	drops := c.drops
	c.pendingMu.Unlock()
	start := time.Now()
	n, err := flush()
	if err != nil {
		if !errors.Is(err, errStopping) {
			c.redisFailed(err, start)
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
