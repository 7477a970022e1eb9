package cache

import "sync/atomic"

// Stats are the cache's counters since New.
type Stats struct {
	LocalHits int64 // answered from this process's memory
	// MemoHits counts the local hits answered from the decoded entries in
	// front of rueidis's copies (see memo), without asking rueidis.
	MemoHits int64
	// Predated counts memory copies fetched before this process's own
	// later write to the key (its invalidation push not yet arrived): the
	// read went to Redis instead and counts as a Redis hit or miss.
	Predated  int64
	RedisHits int64 // answered by Redis
	Misses    int64 // neither had the key (or a loader held it)
	// Rejected counts entries read from Redis that failed their MAC
	// (forged, copied from another key, or written with another MAC key
	// or an older version); PastValidity those read after the TTL they
	// were stored with (replayed, or clocks apart). Neither is served:
	// the read counts as a miss and the entry is replaced.
	Rejected     int64
	PastValidity int64
	Loads        int64 // database reads made for the cache (including bypasses)
	Bypassed     int64 // reads sent to the database because of the breaker, a pending invalidation or an overflow
	RedisErrors  int64 // Redis calls that failed or timed out
	// Invalidations counts keys this process invalidated;
	// InvalidationsReceived those Redis pushed to it; Flushes the times
	// rueidis dropped its local cache with a connection.
	Invalidations         int64
	InvalidationsReceived int64
	Flushes               int64
	// Pending is the number of keys whose invalidation awaits a retry;
	// Retried those delivered by a retry.
	Pending int64
	Retried int64
	Breaker BreakerState
	// Overflow: more than MaxPending invalidations failed, so every read
	// goes to the database until a prefix flush succeeds. Dropped counts
	// the failed invalidations dropped instead of queued; PrefixFlushes
	// the flushes of every cache key in Redis that ended an overflow.
	Overflow      bool
	Dropped       int64
	PrefixFlushes int64
}

type stats struct {
	localHits, redisHits, misses, loads, bypassed, redisErrors atomic.Int64
	invalidations, invalidationsReceived, flushes, retried     atomic.Int64
	dropped, prefixFlushes, predated, rejected, pastValidity   atomic.Int64
	memoHits                                                   atomic.Int64
}

// Stats returns the counters.
func (c *Cache) Stats() Stats {
	return Stats{
		LocalHits:             c.stats.localHits.Load(),
		MemoHits:              c.stats.memoHits.Load(),
		Predated:              c.stats.predated.Load(),
		RedisHits:             c.stats.redisHits.Load(),
		Misses:                c.stats.misses.Load(),
		Rejected:              c.stats.rejected.Load(),
		PastValidity:          c.stats.pastValidity.Load(),
		Loads:                 c.stats.loads.Load(),
		Bypassed:              c.stats.bypassed.Load(),
		RedisErrors:           c.stats.redisErrors.Load(),
		Invalidations:         c.stats.invalidations.Load(),
		InvalidationsReceived: c.stats.invalidationsReceived.Load(),
		Flushes:               c.stats.flushes.Load(),
		Pending:               c.npending.Load(),
		Retried:               c.stats.retried.Load(),
		Breaker:               c.br.current(),
		Overflow:              c.overflow.Load(),
		Dropped:               c.stats.dropped.Load(),
		PrefixFlushes:         c.stats.prefixFlushes.Load(),
	}
}
