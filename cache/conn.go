package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/redis/rueidis"
)

// Dial returns a cache over a new client, with client-side caching on, for
// the Redis at addr; the cache owns the client. If Redis cannot be reached
// now, Dial still returns a cache: until a connection succeeds (retried
// every second) every read goes to the database and every invalidation is
// queued, so a server can start during a Redis outage. The error is only
// for options rueidis refuses.
func Dial(addr string, opts Options) (*Cache, error) {
	return DialOptions(rueidis.ClientOption{InitAddress: []string{addr}}, opts)
}

// DialOptions is Dial to the Redis that base describes (address, AUTH,
// database, TLS: what rueidis.ParseURL fills in). The cache sets the
// client's invalidation receiver, timeouts and local cache size itself.
func DialOptions(base rueidis.ClientOption, opts Options) (*Cache, error) {
	if opts.MACKey != nil && len(opts.MACKey) < MACKeySize {
		return nil, fmt.Errorf("cache: MAC key of %d bytes; want at least %d", len(opts.MACKey), MACKeySize)
	}
	if opts.Invalidations == nil {
		opts.Invalidations = new(Invalidations)
	}
	c := newCache(opts)
	c.owns = true
	c.memo = newMemo() // the client below reports its invalidations to c
	opt := base
	opt.OnInvalidations = opts.Invalidations.receive
	opt.ConnWriteTimeout = c.opts.ConnTimeout
	opt.CacheSizeEachConn = c.opts.LocalCacheBytes
	opt.Dialer = net.Dialer{Timeout: c.opts.ConnTimeout, KeepAlive: c.opts.ConnTimeout / 2}
	addr := strings.Join(base.InitAddress, ",")
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
	if msgs == nil { // the connection dropped (or a flush): rueidis dropped its copies
		if c.memo != nil {
			c.memo.invalidate(nil)
		}
		c.stats.flushes.Add(1)
		return
	}
	c.stats.invalidationsReceived.Add(int64(len(msgs)))
	fn := c.opts.OnInvalidation
	if c.memo == nil && fn == nil {
		return
	}
	keys := make([]string, 0, len(msgs))
	unreadable := false
	for _, m := range msgs {
		if k, err := m.ToString(); err == nil {
			keys = append(keys, k)
		} else {
			unreadable = true
		}
	}
	if c.memo != nil {
		if unreadable {
			c.memo.invalidate(nil) // cannot tell which key: drop them all
		} else {
			c.memo.invalidate(keys)
		}
	}
	if fn != nil {
		for _, k := range keys {
			fn(k)
		}
	}
}

func (c *Cache) redisOK() {
	if c.br.success() {
		// Back from an outage or a slow spell: invalidations may have
		// been missed or be late, so distrust local copies for a while.
		c.distrustLocal(c.opts.FloorWindow)
		c.opts.Logger.Info("cache: Redis is back; breaker closed")
	}
}

// redisFailed records a Redis call, begun at start, that failed.
func (c *Cache) redisFailed(err error, start time.Time) {
	c.stats.redisErrors.Add(1)
	prev := c.br.current()
	c.br.failure(start, time.Now())
	if prev != BreakerOpen && c.br.current() == BreakerOpen {
		c.opts.Logger.Warn("cache: Redis failing; breaker open, reading the database", "err", err)
	}
}

// redis runs one Redis call under RedisTimeout and feeds the breaker.
func (c *Cache) redis(ctx context.Context, fn func(context.Context) (string, error)) (string, error) {
	start := time.Now()
	rctx, cancel := context.WithTimeout(ctx, c.opts.RedisTimeout)
	defer cancel()
	v, err := fn(rctx)
	if err != nil && !rueidis.IsRedisNil(err) {
		c.redisFailed(err, start)
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
