package auth

import (
	"context"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/ratelimit"
)

// classAuthFailure is the in-memory bucket of failed verifications per
// peer address; it is never a method's class.
const classAuthFailure ratelimit.Class = "auth-failure"

// authThrottle limits failed token verifications per peer address. Each
// failure takes a token from the address's bucket; once one is refused the
// address is blocked until the bucket has a token again, and blocked
// addresses get no signature checks. It lives in this instance's memory:
// it bounds this instance's work, which is what a flood of forged tokens
// attacks.
type authThrottle struct {
	lim *ratelimit.Limiter

	mu        sync.Mutex
	until     map[string]time.Time // address → blocked until
	lastSweep time.Time

	failures prometheus.Counter
	refused  prometheus.Counter
}

func newAuthThrottle(r ratelimit.Rate) *authThrottle {
	return &authThrottle{
		lim:   ratelimit.New(ratelimit.Options{Rates: map[ratelimit.Class]ratelimit.Rate{classAuthFailure: r}}),
		until: map[string]time.Time{},
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shardgate_auth_failures_total",
			Help: "Bearer tokens that failed verification.",
		}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shardgate_auth_throttled_total",
			Help: "Calls refused unchecked because their address had too many failed verifications.",
		}),
	}
}

// blocked reports whether host is blocked, and for how long yet.
func (a *authThrottle) blocked(host string) (time.Duration, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	until, ok := a.until[host]
	if !ok {
		return 0, false
	}
	now := time.Now()
	if !now.Before(until) {
		delete(a.until, host)
		return 0, false
	}
	return until.Sub(now), true
}

// failed charges a failed verification to host.
func (a *authThrottle) failed(host string) {
	a.failures.Inc()
	ok, wait := a.lim.Allow(context.Background(), classAuthFailure, host)
	if ok {
		return
	}
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if now.Sub(a.lastSweep) > time.Minute {
		for h, u := range a.until {
			if !now.Before(u) {
				delete(a.until, h)
			}
		}
		a.lastSweep = now
	}
	a.until[host] = now.Add(wait)
}

func (a *authThrottle) refuse(ctx context.Context, wait time.Duration) error {
	a.refused.Inc()
	ms := max(1, wait.Milliseconds())
	// Streams have no header to set here; unary calls say when to retry.
	_ = grpc.SetHeader(ctx, metadata.Pairs(ratelimit.RetryAfterKey, strconv.FormatInt(ms, 10)))
	return status.Errorf(codes.ResourceExhausted, "too many failed authentications from this address; retry in %d ms", ms)
}
