package server

import (
	"net/http"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/shardgate/shardgate/shards"
)

// newRegistry holds the server's Prometheus metrics: a registry of its
// own (not the global one), so several servers in one process, as in
// tests, do not collide.
func (s *Server) newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	s.grpcMetrics = grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(
		grpcprom.WithHistogramBuckets([]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}),
	))
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
		poolCollector{s},
	)
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
)

func (c poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{poolConnsDesc, poolMaxDesc, poolAcquiresDesc, poolWaitsDesc, poolWaitSecondsDesc} {
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
		st := sh.Pool().Stat()
		ch <- prometheus.MustNewConstMetric(poolConnsDesc, prometheus.GaugeValue, float64(st.AcquiredConns()), name, "acquired")
		ch <- prometheus.MustNewConstMetric(poolConnsDesc, prometheus.GaugeValue, float64(st.IdleConns()), name, "idle")
		ch <- prometheus.MustNewConstMetric(poolConnsDesc, prometheus.GaugeValue, float64(st.ConstructingConns()), name, "constructing")
		ch <- prometheus.MustNewConstMetric(poolMaxDesc, prometheus.GaugeValue, float64(st.MaxConns()), name)
		ch <- prometheus.MustNewConstMetric(poolAcquiresDesc, prometheus.CounterValue, float64(st.AcquireCount()), name)
		ch <- prometheus.MustNewConstMetric(poolWaitsDesc, prometheus.CounterValue, float64(st.EmptyAcquireCount()), name)
		ch <- prometheus.MustNewConstMetric(poolWaitSecondsDesc, prometheus.CounterValue, st.EmptyAcquireWaitTime().Seconds(), name)
	}
}
