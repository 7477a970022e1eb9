// Package ratelimit limits calls per caller and method class with token
// buckets (GCRA) shared in Redis, falling back to each instance's memory
// when Redis fails, and provides the gRPC interceptors that apply them.
package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/rueidis"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Class groups methods that share a rate limit.
type Class string

// The method classes.
const (
	ClassRead  Class = "read"
	ClassWrite Class = "write"
	ClassAdmin Class = "admin"
	ClassWatch Class = "watch"
)

// Rate is a token bucket: Burst calls at once, refilled at PerSecond.
type Rate struct {
	PerSecond float64
	Burst     int
}

// ParseRates reads "read=1000/2000,write=200" (class=per-second[/burst];
// burst defaults to the rate, at least 1).
func ParseRates(s string) (map[Class]Rate, error) {
	out := map[Class]Rate{}
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, spec, ok := strings.Cut(part, "=")
		class := Class(name)
		switch class {
		case ClassRead, ClassWrite, ClassAdmin, ClassWatch:
		default:
			return nil, fmt.Errorf("rate limit %q: class is not read, write, admin or watch", part)
		}
		if !ok {
			return nil, fmt.Errorf("rate limit %q: want class=rate[/burst]", part)
		}
		r, err := ParseRate(spec)
		if err != nil {
			return nil, fmt.Errorf("rate limit %q: %w", part, err)
		}
		out[class] = r
	}
	return out, nil
}

// ParseRate reads "per-second[/burst]" (burst defaults to the rate, at
// least 1).
func ParseRate(spec string) (Rate, error) {
	rs, bs, hasBurst := strings.Cut(spec, "/")
	r, err := strconv.ParseFloat(rs, 64)
	if err != nil || r <= 0 || r > 1e6 {
		return Rate{}, errors.New("rate must be a number in (0, 1e6]")
	}
	b := max(1, int(r))
	if hasBurst {
		if b, err = strconv.Atoi(bs); err != nil || b < 1 || b > 1e6 {
			return Rate{}, errors.New("burst must be 1..1e6")
		}
	}
	return Rate{PerSecond: r, Burst: b}, nil
}

// Options configure a Limiter.
type Options struct {
	// Redis holds the buckets, shared by all instances. Nil: in-memory
	// buckets only (each instance limits on its own), unless Connect is set.
	Redis rueidis.Client
	// Connect, used when Redis is nil, makes the Redis client. The limiter
	// calls it in the background at New and then at most once per Retry
	// while checks fall back to memory, until it succeeds; Close closes
	// the client it made. So a Redis that is down at start is picked up
	// when it comes back (rueidis reconnects a client it made by itself,
	// but cannot be made without a first connection).
	Connect func() (rueidis.Client, error)
	// Prefix starts every Redis key (default "shardgate:rl:").
	Prefix string
	// Rates per class; a class without one is not limited.
	Rates map[Class]Rate
	// RedisTimeout bounds one check in Redis (default 100ms); a slower or
	// failed check falls back to memory.
	RedisTimeout time.Duration
	// Retry is how long after a Redis failure checks stay in memory before
	// Redis is tried again (default 1s).
	Retry  time.Duration
	Logger *slog.Logger
}

// Limiter rate-limits calls per principal and method class with GCRA (a
// token bucket kept as one timestamp per key). Buckets live in Redis, one
// Lua script call per check; a busy key takes a few tokens per call and
// spends them locally (see leaseSize). When
// Redis fails the limiter degrades to per-instance buckets in memory,
// logging each switch and exporting shardgate_ratelimit_degraded.
type Limiter struct {
	o          Options
	redis      atomic.Pointer[redisClient] // nil until Options.Redis or Connect gives one
	dialing    atomic.Bool                 // a Connect call is under way
	dialFailed atomic.Bool                 // a Connect call failed (logged once)
	dialAt     atomic.Int64                // unix nanos: no Connect call before then
	life       sync.Mutex                  // orders Close against starting a Connect call
	closed     bool                        // under life
	dials      sync.WaitGroup
	degraded   atomic.Bool
	retryAt    atomic.Int64 // unix nanos: until then, use memory
	mu         sync.Mutex
	mem        map[string]int64 // key → theoretical arrival time (unix µs)
	leases     map[string]lease // key → tokens taken from Redis ahead of time
	lastSweep  time.Time

	fallbacks prometheus.Counter
	limited   *prometheus.CounterVec
}

// New returns a Limiter.
func New(o Options) *Limiter {
	if o.Prefix == "" {
		o.Prefix = "shardgate:rl:"
	}
	if o.RedisTimeout <= 0 {
		o.RedisTimeout = 100 * time.Millisecond
	}
	if o.Retry <= 0 {
		o.Retry = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	l := &Limiter{o: o, mem: map[string]int64{}, leases: map[string]lease{}}
	l.fallbacks = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "shardgate_ratelimit_memory_checks_total",
		Help: "Rate-limit checks answered by the in-memory fallback because Redis failed.",
	})
	l.limited = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "shardgate_ratelimit_limited_total",
		Help: "Calls refused with ResourceExhausted, by method class.",
	}, []string{"class"})
	if o.Redis != nil {
		l.redis.Store(&redisClient{o.Redis})
	} else {
		l.degraded.Store(true)
		l.connect()
	}
	return l
}

type redisClient struct{ rueidis.Client }

// connect calls Options.Connect in the background, unless one call is
// under way, the last failed less than Retry ago, or the limiter is closed.
func (l *Limiter) connect() {
	if l.o.Connect == nil || time.Now().UnixNano() < l.dialAt.Load() || !l.dialing.CompareAndSwap(false, true) {
		return
	}
	l.life.Lock()
	defer l.life.Unlock()
	if l.closed {
		l.dialing.Store(false)
		return
	}
	l.dials.Add(1)
	go func() {
		defer l.dials.Done()
		defer l.dialing.Store(false)
		rc, err := l.o.Connect()
		if err != nil {
			l.dialAt.Store(time.Now().Add(l.o.Retry).UnixNano())
			if !l.dialFailed.Swap(true) {
				l.o.Logger.Warn("rate limiter: cannot reach Redis; limiting in this instance's memory until it answers", "err", err)
			}
			return
		}
		l.life.Lock()
		defer l.life.Unlock()
		if l.closed {
			rc.Close()
			return
		}
		l.redis.Store(&redisClient{rc})
		l.o.Logger.Info("rate limiter: connected to Redis; buckets are shared")
	}()
}

// Close stops connecting and closes the client Connect made (Options.Redis
// stays the caller's). Checks after Close use memory only.
func (l *Limiter) Close() {
	l.life.Lock()
	if l.closed {
		l.life.Unlock()
		return
	}
	l.closed = true
	l.life.Unlock()
	l.dials.Wait()
	if rc := l.redis.Swap(nil); rc != nil && l.o.Redis == nil {
		rc.Close()
	}
}

// Collectors are the limiter's metrics.
func (l *Limiter) Collectors() []prometheus.Collector {
	return []prometheus.Collector{
		l.fallbacks, l.limited,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "shardgate_ratelimit_degraded",
			Help: "1 while rate limits are kept in this instance's memory because Redis is unavailable.",
		}, func() float64 {
			if l.degraded.Load() {
				return 1
			}
			return 0
		}),
	}
}

// gcraScript takes up to ARGV[3] tokens from the bucket KEYS[1]; ARGV[1]
// is the emission interval and ARGV[2] the burst tolerance, in µs. It
// returns {tokens granted, retry after in µs when none}. Redis's clock is
// the one clock all instances share.
var gcraScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local avail = math.floor((now + tolerance - tat) / interval)
if avail < 1 then
  return {0, tat + interval - tolerance - now}
end
local n = math.min(want, avail)
local new_tat = tat + n * interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {n, 0}
`)

// gcraParams returns the emission interval and burst tolerance of r in µs.
func gcraParams(r Rate) (interval, tolerance int64) {
	interval = max(1, int64(1e6/r.PerSecond))
	return interval, interval * int64(r.Burst)
}

// leaseTTL is how long tokens taken from Redis ahead of time stay usable.
const leaseTTL = 100 * time.Millisecond

// leaseSize is how many tokens one Redis round trip takes for a busy key:
// about 50ms worth of the rate, at most a tenth of the burst and 64, at
// least 1 (then every call asks Redis). Tokens are taken from the shared
// bucket when leased, so leasing never lets more calls through than the
// bucket allows; unused ones expire, which can only refuse a little early.
func leaseSize(r Rate) int64 {
	return max(1, min(int64(r.PerSecond*0.05), int64(r.Burst/10), 64))
}

type lease struct {
	n     int64
	until time.Time
}

// Allow takes a token for key in class. It returns whether the call may
// proceed and, if not, how long until it may.
func (l *Limiter) Allow(ctx context.Context, class Class, key string) (bool, time.Duration) {
	r, ok := l.o.Rates[class]
	if !ok {
		return true, 0
	}
	k := l.o.Prefix + string(class) + ":" + key
	interval, tolerance := gcraParams(r)
	rc := l.redis.Load()
	if rc == nil {
		l.connect()
	}
	if rc != nil && time.Now().UnixNano() >= l.retryAt.Load() {
		want := leaseSize(r)
		if want > 1 && l.takeLeased(k) {
			return true, 0
		}
		rctx, cancel := context.WithTimeout(ctx, l.o.RedisTimeout)
		res, err := gcraScript.Exec(rctx, rc.Client, []string{k}, []string{
			strconv.FormatInt(interval, 10), strconv.FormatInt(tolerance, 10), strconv.FormatInt(want, 10)}).ToArray()
		cancel()
		if err == nil && len(res) == 2 {
			granted, _ := res[0].AsInt64()
			wait, _ := res[1].AsInt64()
			if l.degraded.CompareAndSwap(true, false) {
				l.o.Logger.Info("rate limiter: Redis is back; buckets are shared again")
			}
			if granted > 1 {
				// Concurrent misses each lease; keep what is left of the others.
				l.mu.Lock()
				ls := l.leases[k]
				if time.Now().After(ls.until) {
					ls.n = 0
				}
				l.leases[k] = lease{n: ls.n + granted - 1, until: time.Now().Add(leaseTTL)}
				l.mu.Unlock()
			}
			return granted >= 1, time.Duration(wait) * time.Microsecond
		}
		if ctx.Err() != nil {
			return true, 0 // the call is over anyway
		}
		l.retryAt.Store(time.Now().Add(l.o.Retry).UnixNano())
		if l.degraded.CompareAndSwap(false, true) {
			l.o.Logger.Warn("rate limiter: Redis unavailable; limiting in this instance's memory", "err", err)
		}
	}
	if rc != nil || l.o.Connect != nil {
		l.fallbacks.Inc()
	}
	return l.allowMemory(k, interval, tolerance)
}

// takeLeased uses a token leased earlier for key, if one is left.
func (l *Limiter) takeLeased(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	ls, ok := l.leases[key]
	if !ok || ls.n <= 0 || time.Now().After(ls.until) {
		return false
	}
	ls.n--
	l.leases[key] = ls
	return true
}

// allowMemory is gcraScript against this instance's memory.
func (l *Limiter) allowMemory(key string, interval, tolerance int64) (bool, time.Duration) {
	now := time.Now()
	nowUS := now.UnixMicro()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) > time.Minute {
		for k, tat := range l.mem {
			if tat < nowUS {
				delete(l.mem, k)
			}
		}
		for k, ls := range l.leases {
			if now.After(ls.until) {
				delete(l.leases, k)
			}
		}
		l.lastSweep = now
	}
	tat := max(l.mem[key], nowUS)
	newTAT := tat + interval
	if allowAt := newTAT - tolerance; nowUS < allowAt {
		return false, time.Duration(allowAt-nowUS) * time.Microsecond
	}
	l.mem[key] = newTAT
	return true, 0
}

// classOf puts a method in its rate-limit class: AdminService calls are
// admin; Watch-like streams are watch; DataService reads (Get*, List*)
// are read; everything else is write.
func classOf(method string, stream bool) Class {
	switch {
	case strings.HasPrefix(method, adminPrefix):
		return ClassAdmin
	case strings.HasPrefix(method, "/grpc.reflection."):
		return ClassRead
	case stream:
		return ClassWatch
	}
	name := method[strings.LastIndexByte(method, '/')+1:]
	if strings.HasPrefix(name, "Get") || strings.HasPrefix(name, "List") {
		return ClassRead
	}
	return ClassWrite
}

// adminPrefix starts the full method names of AdminService.
const adminPrefix = "/" + "shardgate.v1.AdminService" + "/"

// RetryAfterKey is the response metadata that says, in milliseconds, when
// a refused call may be retried.
const RetryAfterKey = "retry-after-ms"

func (l *Limiter) refuse(setHeader func(metadata.MD) error, class Class, wait time.Duration) error {
	l.limited.WithLabelValues(string(class)).Inc()
	ms := max(1, wait.Milliseconds())
	setHeader(metadata.Pairs(RetryAfterKey, strconv.FormatInt(ms, 10)))
	return status.Errorf(codes.ResourceExhausted, "rate limit of %s calls exceeded; retry in %d ms", class, ms)
}

// KeyFunc names the caller of the call ctx belongs to, for its bucket keys.
// ok false leaves the call unlimited (methods open to all, such as health).
type KeyFunc func(ctx context.Context) (key string, ok bool)

// UnaryServerInterceptor limits each unary call by the caller key names,
// in its method's class.
func UnaryServerInterceptor(l *Limiter, key KeyFunc) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		k, ok := key(ctx)
		if !ok {
			return h(ctx, req)
		}
		class := classOf(info.FullMethod, false)
		if allowed, wait := l.Allow(ctx, class, k); !allowed {
			return nil, l.refuse(func(md metadata.MD) error { return grpc.SetHeader(ctx, md) }, class, wait)
		}
		return h(ctx, req)
	}
}

// StreamServerInterceptor limits the opening of each stream.
func StreamServerInterceptor(l *Limiter, key KeyFunc) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		k, ok := key(ss.Context())
		if !ok {
			return h(srv, ss)
		}
		class := classOf(info.FullMethod, true)
		if allowed, wait := l.Allow(ss.Context(), class, k); !allowed {
			return l.refuse(ss.SetHeader, class, wait)
		}
		return h(srv, ss)
	}
}
