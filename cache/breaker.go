package cache

import (
	"sync"
	"sync/atomic"
	"time"
)

// BreakerState is the Redis circuit breaker's state.
type BreakerState int32

const (
	// BreakerClosed: Redis is used.
	BreakerClosed BreakerState = iota
	// BreakerOpen: Redis failed repeatedly; reads go to the database and
	// invalidations wait in the retry queue until the cooldown ends.
	BreakerOpen
	// BreakerHalfOpen: the cooldown ended; one call probes Redis.
	BreakerHalfOpen
)

func (s BreakerState) String() string {
	switch s {
	case BreakerOpen:
		return "open"
	case BreakerHalfOpen:
		return "half-open"
	}
	return "closed"
}

// breaker opens after threshold consecutive Redis failures, stays open for
// cooldown, then lets one probe through: its success closes the breaker,
// its failure opens it again. Failures of calls that were in flight
// together count once: a call counts only if it began after the last
// counted failure was recorded. One stall of Redis, or of this process on
// a busy machine, fails every call in flight at once (32 callers: 32
// timeouts within a millisecond), which says no more than one timeout.
// A pure state machine over the times it is given.
type breaker struct {
	threshold int
	cooldown  time.Duration

	// st and failing mirror state and failures > 0 for the lock-free fast
	// path of a healthy Redis.
	st      atomic.Int32
	failing atomic.Bool

	mu       sync.Mutex
	state    BreakerState
	failures int
	lastFail time.Time // when the last counted failure was recorded
	openedAt time.Time
	probing  bool
}

func (b *breaker) set(s BreakerState) {
	b.state = s
	b.st.Store(int32(s))
}

// allow reports whether a call may use Redis now.
func (b *breaker) allow(now time.Time) bool {
	if BreakerState(b.st.Load()) == BreakerClosed {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	switch b.state {
	case BreakerClosed:
		return true
	case BreakerOpen:
		if now.Sub(b.openedAt) < b.cooldown {
			return false
		}
		b.set(BreakerHalfOpen)
		b.probing = true
		return true
	default: // half-open: one probe at a time
		if b.probing {
			return false
		}
		b.probing = true
		return true
	}
}

// success records a call Redis answered; it reports whether that closed
// an open or half-open breaker.
func (b *breaker) success() (closed bool) {
	if BreakerState(b.st.Load()) == BreakerClosed && !b.failing.Load() {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.failures = 0
	b.failing.Store(false)
	b.probing = false
	if b.state != BreakerClosed {
		b.set(BreakerClosed)
		return true
	}
	return false
}

// failure records a call, begun at start, that Redis did not answer in
// time (or at all) by now.
func (b *breaker) failure(start, now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.state == BreakerClosed && b.failures > 0 && start.Before(b.lastFail) {
		return // in flight with the last counted failure: the same stall
	}
	b.failures++
	b.lastFail = now
	b.failing.Store(true)
	b.probing = false
	if b.state == BreakerHalfOpen || b.failures >= b.threshold {
		b.set(BreakerOpen)
		b.openedAt = now
	}
}

// abandon records a call given up by its caller before Redis answered: it
// says nothing of Redis, but frees the half-open probe slot it may hold.
func (b *breaker) abandon() {
	if BreakerState(b.st.Load()) == BreakerClosed {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.probing = false
}

func (b *breaker) current() BreakerState { return BreakerState(b.st.Load()) }
