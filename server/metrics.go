package server

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/shards"
)

// newRegistry holds the server's Prometheus metrics: a registry of its
// own (not the global one), so several servers in one process, as in
// tests, do not collide.
func (s *Server) newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	s.grpcMetrics = newGRPCMetrics([]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5})
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		s.grpcMetrics,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "shardgate_topology_version",
			Help: "Topology version of the routing table this server uses.",
		}, func() float64 {
			if t := s.router.Table(); t != nil {
				return float64(t.Version())
			}
			return 0
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shardgate_wrong_shard_retries_total",
			Help: "Calls retried because a shard no longer owned the partition (stale map or a move in progress).",
		}, func() float64 { return float64(s.wrongShardRetries.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shardgate_sessions_swept_total",
			Help: "Expired sessions this server's sweeper deleted (each with a delete event).",
		}, func() float64 { return float64(s.sessionsSwept.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shardgate_session_sweep_errors_total",
			Help: "Session sweep batches that failed (logged with the shard); the shard is swept again next round.",
		}, func() float64 { return float64(s.sweepErrors.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shardgate_tombstones_pruned_total",
			Help: "Tombstones of deleted users, items and config values this server's sweeper pruned past their retention (shards and catalog).",
		}, func() float64 { return float64(s.tombstonesPruned.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shardgate_tombstone_prune_errors_total",
			Help: "Tombstone prune batches that failed (logged with the shard or catalog); pruned again next round.",
		}, func() float64 { return float64(s.pruneErrors.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "shardgate_relay_quarantined_partitions",
			Help: "Partitions (and the config stream) whose events this server's leading relays hold back because their stream clashes with the outbox clock; the ERROR log says which and how to repair.",
		}, func() float64 {
			s.mu.RLock()
			relays := s.relays
			s.mu.RUnlock()
			if relays == nil {
				return 0
			}
			return float64(relays.QuarantinedStreams())
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shardgate_watch_dropped_entries_total",
			Help: "Stream entries Watch dropped because they are not a well-formed event of their stream (written to Redis by someone else); logged at WARN, at most every 10 s.",
		}, func() float64 { return float64(s.droppedEntries.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shardgate_relay_republished_events_total",
			Help: "Events this server's leading relays published again into streams found behind their delivered events (Redis lost them).",
		}, func() float64 {
			if m := s.relayManager(); m != nil {
				return float64(m.Republished())
			}
			return 0
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shardgate_relay_pruned_events_total",
			Help: "Delivered events this server's leading relays pruned from the outboxes past the event retention.",
		}, func() float64 {
			if m := s.relayManager(); m != nil {
				return float64(m.Pruned())
			}
			return 0
		}),
		poolCollector{s},
		s.observer.shardQuery,
		statusCollector{s},
	)
	if s.opts.Cache != nil {
		reg.MustRegister(cacheCollector{s.opts.Cache})
	}
	return reg
}

// MetricsHandler serves the server's metrics in the Prometheus format.
func (s *Server) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(s.metrics, promhttp.HandlerOpts{Registry: s.metrics})
}

// poolCollector reports each shard pool's pgxpool statistics at scrape time.
type poolCollector struct{ s *Server }

var (
	poolConnsDesc = prometheus.NewDesc("shardgate_shard_pool_conns",
		"Connections in a shard's pool, by state.", []string{"shard", "state"}, nil)
	poolMaxDesc = prometheus.NewDesc("shardgate_shard_pool_max_conns",
		"Size limit of a shard's pool.", []string{"shard"}, nil)
	poolAcquiresDesc = prometheus.NewDesc("shardgate_shard_pool_acquires_total",
		"Connections acquired from a shard's pool.", []string{"shard"}, nil)
	poolWaitsDesc = prometheus.NewDesc("shardgate_shard_pool_acquire_waits_total",
		"Acquires that had to wait for a connection (the pool was busy).", []string{"shard"}, nil)
	poolWaitSecondsDesc = prometheus.NewDesc("shardgate_shard_pool_acquire_wait_seconds_total",
		"Time spent waiting for a connection.", []string{"shard"}, nil)
	writeBatchesDesc = prometheus.NewDesc("shardgate_shard_write_batches_total",
		"Transactions group commit flushed to a shard; shardgate_shard_grouped_writes_total over this is the mean batch size.", []string{"shard"}, nil)
	groupedWritesDesc = prometheus.NewDesc("shardgate_shard_grouped_writes_total",
		"Writes group commit flushed to a shard.", []string{"shard"}, nil)
	writeRerunsDesc = prometheus.NewDesc("shardgate_shard_write_reruns_total",
		"Writes run again alone because a statement of their batch failed.", []string{"shard"}, nil)
	readBatchesDesc = prometheus.NewDesc("shardgate_shard_read_batches_total",
		"Statements that answered two or more concurrent point reads (GetUser, GetItem) at once (read batching).", []string{"shard"}, nil)
	batchedReadsDesc = prometheus.NewDesc("shardgate_shard_batched_reads_total",
		"Point reads answered by read-batching statements.", []string{"shard"}, nil)
)

func (c poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{poolConnsDesc, poolMaxDesc, poolAcquiresDesc, poolWaitsDesc, poolWaitSecondsDesc, writeBatchesDesc, groupedWritesDesc, writeRerunsDesc, readBatchesDesc, batchedReadsDesc} {
		ch <- d
	}
}

func (c poolCollector) Collect(ch chan<- prometheus.Metric) {
	// Copy first: sending may block on the scraper, and the request path
	// must not wait behind it for s.mu.
	c.s.mu.RLock()
	pools := make(map[string]*shards.Shard, len(c.s.shards))
	for name, p := range c.s.shards {
		pools[name] = p.sh
	}
	c.s.mu.RUnlock()
	for name, sh := range pools {
		st := sh.Stat()
		ch <- prometheus.MustNewConstMetric(poolConnsDesc, prometheus.GaugeValue, float64(st.AcquiredConns()), name, "acquired")
		ch <- prometheus.MustNewConstMetric(poolConnsDesc, prometheus.GaugeValue, float64(st.IdleConns()), name, "idle")
		ch <- prometheus.MustNewConstMetric(poolConnsDesc, prometheus.GaugeValue, float64(st.ConstructingConns()), name, "constructing")
		ch <- prometheus.MustNewConstMetric(poolMaxDesc, prometheus.GaugeValue, float64(st.MaxConns()), name)
		ch <- prometheus.MustNewConstMetric(poolAcquiresDesc, prometheus.CounterValue, float64(st.AcquireCount()), name)
		ch <- prometheus.MustNewConstMetric(poolWaitsDesc, prometheus.CounterValue, float64(st.EmptyAcquireCount()), name)
		ch <- prometheus.MustNewConstMetric(poolWaitSecondsDesc, prometheus.CounterValue, st.EmptyAcquireWaitTime().Seconds(), name)
		gs := sh.WriteGroupStats()
		ch <- prometheus.MustNewConstMetric(writeBatchesDesc, prometheus.CounterValue, float64(gs.Batches), name)
		ch <- prometheus.MustNewConstMetric(groupedWritesDesc, prometheus.CounterValue, float64(gs.Writes), name)
		ch <- prometheus.MustNewConstMetric(writeRerunsDesc, prometheus.CounterValue, float64(gs.Reruns), name)
		rs := sh.ReadBatchStats()
		ch <- prometheus.MustNewConstMetric(readBatchesDesc, prometheus.CounterValue, float64(rs.Batches), name)
		ch <- prometheus.MustNewConstMetric(batchedReadsDesc, prometheus.CounterValue, float64(rs.Reads), name)
	}
}

// cacheCollector reports the cache's counters at scrape time.
type cacheCollector struct{ c *cache.Cache }

var (
	cacheReadsDesc = prometheus.NewDesc("shardgate_cache_reads_total",
		"Cached reads (GetSession, GetConfig, ListConfig) by outcome: local (this process's memory), redis, miss.", []string{"outcome"}, nil)
	cacheLoadsDesc = prometheus.NewDesc("shardgate_cache_loads_total",
		"Database reads made by the cache (misses and bypasses).", nil, nil)
	cacheBypassedDesc = prometheus.NewDesc("shardgate_cache_bypassed_total",
		"Reads sent straight to the database because the breaker was open, the key's invalidation was pending, or the retry queue overflowed.", nil, nil)
	cacheInvalidationsDesc = prometheus.NewDesc("shardgate_cache_invalidations_total",
		"Cache keys invalidated, by direction: sent (by this server's writes) or received (pushed by Redis).", []string{"direction"}, nil)
	cacheRedisErrorsDesc = prometheus.NewDesc("shardgate_cache_redis_errors_total",
		"Redis calls that failed or timed out.", nil, nil)
	cachePendingDesc = prometheus.NewDesc("shardgate_cache_pending_invalidations",
		"Keys whose invalidation failed and awaits a retry.", nil, nil)
	cacheBreakerDesc = prometheus.NewDesc("shardgate_cache_breaker_state",
		"Redis circuit breaker: 0 closed, 1 open, 2 half-open.", nil, nil)
	cacheOverflowDesc = prometheus.NewDesc("shardgate_cache_overflow",
		"1 while the retry queue has overflowed: every cached read goes to the database until the cache's keys in Redis are flushed.", nil, nil)
	cacheDroppedDesc = prometheus.NewDesc("shardgate_cache_dropped_invalidations_total",
		"Failed invalidations dropped instead of queued, because the retry queue overflowed (a prefix flush covers them).", nil, nil)
	cachePrefixFlushesDesc = prometheus.NewDesc("shardgate_cache_prefix_flushes_total",
		"Flushes of every cache key under the prefix in Redis, each ending an overflow.", nil, nil)
	cacheRejectedDesc = prometheus.NewDesc("shardgate_cache_rejected_entries_total",
		"Entries read from Redis and not served, by reason: mac (failed its MAC: forged, copied from another key, or written with another MAC key or an older version) or validity (read past the TTL it was stored with: replayed, or clocks apart).", []string{"reason"}, nil)
	cachePredatedDesc = prometheus.NewDesc("shardgate_cache_predated_total",
		"Memory copies not served because they were fetched before this server's own later write to the key (its invalidation push not yet in); the read went to Redis.", nil, nil)
)

func (c cacheCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{cacheReadsDesc, cacheLoadsDesc, cacheBypassedDesc, cacheInvalidationsDesc, cacheRedisErrorsDesc, cachePendingDesc, cacheBreakerDesc,
		cacheOverflowDesc, cacheDroppedDesc, cachePrefixFlushesDesc, cachePredatedDesc, cacheRejectedDesc} {
		ch <- d
	}
}

func (c cacheCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.c.Stats()
	ch <- prometheus.MustNewConstMetric(cacheReadsDesc, prometheus.CounterValue, float64(st.LocalHits), "local")
	ch <- prometheus.MustNewConstMetric(cacheReadsDesc, prometheus.CounterValue, float64(st.RedisHits), "redis")
	ch <- prometheus.MustNewConstMetric(cacheReadsDesc, prometheus.CounterValue, float64(st.Misses), "miss")
	ch <- prometheus.MustNewConstMetric(cacheLoadsDesc, prometheus.CounterValue, float64(st.Loads))
	ch <- prometheus.MustNewConstMetric(cacheBypassedDesc, prometheus.CounterValue, float64(st.Bypassed))
	ch <- prometheus.MustNewConstMetric(cacheInvalidationsDesc, prometheus.CounterValue, float64(st.Invalidations), "sent")
	ch <- prometheus.MustNewConstMetric(cacheInvalidationsDesc, prometheus.CounterValue, float64(st.InvalidationsReceived), "received")
	ch <- prometheus.MustNewConstMetric(cacheRedisErrorsDesc, prometheus.CounterValue, float64(st.RedisErrors))
	ch <- prometheus.MustNewConstMetric(cachePendingDesc, prometheus.GaugeValue, float64(st.Pending))
	ch <- prometheus.MustNewConstMetric(cacheBreakerDesc, prometheus.GaugeValue, float64(st.Breaker))
	overflow := 0.0
	if st.Overflow {
		overflow = 1
	}
	ch <- prometheus.MustNewConstMetric(cacheOverflowDesc, prometheus.GaugeValue, overflow)
	ch <- prometheus.MustNewConstMetric(cacheDroppedDesc, prometheus.CounterValue, float64(st.Dropped))
	ch <- prometheus.MustNewConstMetric(cachePrefixFlushesDesc, prometheus.CounterValue, float64(st.PrefixFlushes))
	ch <- prometheus.MustNewConstMetric(cachePredatedDesc, prometheus.CounterValue, float64(st.Predated))
	ch <- prometheus.MustNewConstMetric(cacheRejectedDesc, prometheus.CounterValue, float64(st.Rejected), "mac")
	ch <- prometheus.MustNewConstMetric(cacheRejectedDesc, prometheus.CounterValue, float64(st.PastValidity), "validity")
}
