package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/shards"
)

// The operator's view: what the shards, relays and moves are doing, for
// the Prometheus metrics, GetClusterStatus (shardctl status) and the
// dashboard. The databases are asked only when someone looks, and at most
// once per sampleMaxAge however many look.

const (
	// sampleMaxAge is how long a sample of the shards (reachability,
	// backlog) serves before the next look asks them again.
	sampleMaxAge = time.Second
	// sizeMaxAge is the same for the shards' sizes, which change slowly
	// and cost more to ask.
	sizeMaxAge = 15 * time.Second
	// sampleTimeout bounds how long one shard may take to answer.
	sampleTimeout = time.Second
	// rateWindow is how far back rates and recent latencies reach.
	rateWindow = 5 * time.Second
	// defaultMaxBacklogAge is when an undelivered event becomes a problem.
	defaultMaxBacklogAge = time.Minute
)

// shardQueryBuckets are the bounds of the per-shard query latency
// histogram, in seconds.
var shardQueryBuckets = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}

// observer holds what the operator's view keeps between looks.
type observer struct {
	shardQuery *prometheus.HistogramVec // by shard; observed on the request path
	eventsSent atomic.Int64             // events sent on Watch streams

	mu      sync.Mutex
	sample  dbSample             // under mu
	sizes   map[string]sizeEntry // under mu
	history []rateMark           // under mu; oldest first, within rateWindow
}

func newObserver() *observer {
	return &observer{
		shardQuery: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "shardgate_shard_query_duration_seconds",
			Help:    "Calls this instance ran on a shard (each attempt, reads and writes, cache loads included), by shard.",
			Buckets: shardQueryBuckets,
		}, []string{"shard"}),
		sizes: map[string]sizeEntry{},
	}
}

// dbSample is what the databases said at one look.
type dbSample struct {
	at      time.Time
	shards  map[string]shardSample
	config  backlogSample
	cfgErr  error
	reb     catalog.Rebalance
	moves   []catalog.Move
	rebErr  error // catalog.ErrNoRebalance when there never was one
	present bool
}

type shardSample struct {
	err     error // unreachable (or no pool here)
	backlog shards.OutboxBacklog
}

type backlogSample struct {
	rows   int64
	oldest time.Time
}

type sizeEntry struct {
	at   time.Time
	size shards.SizeSample
	ok   bool
}

// rateMark is the counters at one moment, for rates over rateWindow.
type rateMark struct {
	at        time.Time
	queries   map[string]*dto.Histogram
	published map[string]int64 // by shard; "" is the config relay
}

// sizesNow is a copy of the latest size samples, by shard.
func (o *observer) sizesNow() map[string]sizeEntry {
	o.mu.Lock()
	defer o.mu.Unlock()
	return maps.Clone(o.sizes)
}

// look returns a sample of the databases no older than sampleMaxAge,
// asking them if need be.
func (s *Server) look(ctx context.Context) dbSample {
	o := s.observer
	o.mu.Lock()
	defer o.mu.Unlock()
	now := time.Now()
	if o.sample.present && now.Sub(o.sample.at) < sampleMaxAge {
		return o.sample
	}
	// The sample serves every viewer for a second: one caller giving up
	// must not make the shards look unreachable to the others.
	ctx = context.WithoutCancel(ctx)
	topo := s.watcher.Topology()
	smp := dbSample{at: now, shards: make(map[string]shardSample, len(topo.Shards)), present: true}
	var (
		mu    sync.Mutex // guards smp.shards and sizes
		wg    sync.WaitGroup
		sizes = map[string]sizeEntry{} // new samples, into o.sizes once all are in
	)
	for _, rec := range topo.Shards {
		needSize := now.Sub(o.sizes[rec.Name].at) >= sizeMaxAge
		wg.Go(func() {
			var ss shardSample
			sh, ok := s.shard(rec.Name)
			if !ok {
				ss.err = errShardNotOpen
			} else {
				qctx, cancel := context.WithTimeout(ctx, sampleTimeout)
				ss.backlog, ss.err = sh.OutboxBacklog(qctx)
				if ss.err == nil && needSize {
					z, err := sh.SampleSize(qctx)
					mu.Lock()
					sizes[rec.Name] = sizeEntry{at: now, size: z, ok: err == nil}
					mu.Unlock()
				}
				cancel()
			}
			mu.Lock()
			smp.shards[rec.Name] = ss
			mu.Unlock()
		})
	}
	wg.Go(func() {
		qctx, cancel := context.WithTimeout(ctx, sampleTimeout)
		defer cancel()
		smp.config.rows, smp.config.oldest, smp.cfgErr = s.catalog.ConfigOutboxBacklog(qctx, shards.BacklogCountCap)
		smp.reb, smp.moves, smp.rebErr = s.catalog.LatestRebalance(qctx)
	})
	wg.Wait()
	maps.Copy(o.sizes, sizes)
	for name := range o.sizes {
		if _, ok := smp.shards[name]; !ok {
			delete(o.sizes, name) // a shard that left
		}
	}
	o.sample = smp
	return smp
}

// rates records the counters now and returns the mark rateWindow (or as
// near as kept) ago to compute rates against, and the current one.
func (s *Server) rates(now time.Time) (base, cur rateMark) {
	o := s.observer
	cur = rateMark{at: now, queries: map[string]*dto.Histogram{}, published: map[string]int64{}}
	for _, name := range s.shardNames() {
		h, err := o.shardQuery.GetMetricWithLabelValues(name)
		if err != nil {
			continue
		}
		var m dto.Metric
		if h.(prometheus.Metric).Write(&m) == nil {
			cur.queries[name] = m.GetHistogram()
		}
	}
	for _, st := range s.relayStats() {
		cur.published[st.Name] = st.Published
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.history = slices.DeleteFunc(o.history, func(m rateMark) bool { return now.Sub(m.at) > rateWindow })
	if n := len(o.history); n == 0 || now.Sub(o.history[n-1].at) >= sampleMaxAge/2 {
		o.history = append(o.history, cur)
	}
	base = o.history[0]
	return base, cur
}

func (s *Server) shardNames() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	names := make([]string, 0, len(s.shards))
	for name := range s.shards {
		names = append(names, name)
	}
	return names
}

// shardRemoved forgets a shard's latency series. Called with s.mu held.
func (s *Server) shardRemoved(name string) {
	s.observer.shardQuery.DeleteLabelValues(name)
}

// relayStats are this instance's relays; none without events.
func (s *Server) relayStats() []relayStat {
	s.mu.RLock()
	relays := s.relays
	s.mu.RUnlock()
	if relays == nil {
		return nil
	}
	var out []relayStat
	for _, st := range relays.Stats() {
		out = append(out, relayStat{Name: st.Name, Leading: st.Leading, Published: st.Published})
	}
	return out
}

type relayStat struct {
	Name      string // "" for the config relay
	Leading   bool
	Published int64
}

// quantile estimates the q-quantile of the observations between two
// snapshots of a histogram, interpolating within a bucket; 0 when none.
func quantile(q float64, base, cur *dto.Histogram) float64 {
	if cur == nil {
		return 0
	}
	n := float64(cur.GetSampleCount())
	if base != nil {
		n -= float64(base.GetSampleCount())
	}
	if n <= 0 {
		return 0
	}
	rank := q * n
	lower, prev := 0.0, 0.0
	for i, b := range cur.GetBucket() {
		c := float64(b.GetCumulativeCount())
		if base != nil && i < len(base.GetBucket()) {
			c -= float64(base.GetBucket()[i].GetCumulativeCount())
		}
		if c >= rank {
			in := c - prev
			if in <= 0 {
				return b.GetUpperBound()
			}
			return lower + (b.GetUpperBound()-lower)*(rank-prev)/in
		}
		lower, prev = b.GetUpperBound(), c
	}
	return lower // beyond the last bound
}

func perSecond(delta float64, d time.Duration) float64 {
	if d <= 0 || delta <= 0 {
		return 0
	}
	return delta / d.Seconds()
}

// ClusterStatus builds the operator's summary (GetClusterStatus, the
// dashboard). maxBacklogAge (0: one minute) is when an undelivered event
// becomes a problem.
func (s *Server) ClusterStatus(ctx context.Context, maxBacklogAge time.Duration) (*pb.GetClusterStatusResponse, error) {
	if maxBacklogAge <= 0 {
		maxBacklogAge = defaultMaxBacklogAge
	}
	topo := s.watcher.Topology()
	if topo.Table == nil {
		return nil, errNoTable
	}
	smp := s.look(ctx)
	now := time.Now()
	base, cur := s.rates(now)
	window := cur.at.Sub(base.at)
	resp := &pb.GetClusterStatusResponse{
		Time:            timestamppb.New(now),
		TopologyVersion: topo.Version,
		PartitionCount:  int32(topo.PartitionCount),
		Events:          &pb.EventFlow{},
	}
	problem := func(format string, args ...any) { resp.Problems = append(resp.Problems, fmt.Sprintf(format, args...)) }
	leading := map[string]bool{}
	for _, st := range s.relayStats() {
		leading[st.Name] = st.Leading
		resp.Events.PublishedTotal += st.Published
		resp.Events.PublishedPerSecond += perSecond(float64(st.Published-base.published[st.Name]), window)
	}
	resp.Events.ConfigRelayLeading = leading[""]
	resp.Events.WatchStreams = s.watchers.Load()
	resp.Events.WatchEventsSent = s.observer.eventsSent.Load()
	var oldest time.Time
	older := func(t time.Time) {
		if !t.IsZero() && (oldest.IsZero() || t.Before(oldest)) {
			oldest = t
		}
	}
	age := func(t time.Time) float64 {
		if t.IsZero() {
			return 0
		}
		return max(now.Sub(t).Seconds(), 0)
	}

	counts := topo.Table.Counts()
	index := make(map[string]uint32, len(topo.Shards))
	sizes := s.observer.sizesNow()
	for i, rec := range topo.Shards {
		index[rec.Name] = uint32(i)
		st := &pb.ShardStatus{
			Name:         rec.Name,
			State:        shardState(rec.State),
			Weight:       int32(rec.Weight),
			Partitions:   int32(counts[rec.Name]),
			Share:        float64(counts[rec.Name]) / float64(max(topo.PartitionCount, 1)),
			RelayLeading: leading[rec.Name],
		}
		ss, asked := smp.shards[rec.Name]
		switch {
		case !asked:
			st.Error = "not asked yet"
		case ss.err != nil:
			st.Error = describeUnreachable(ss.err)
			problem("shard %s is unreachable: %s", rec.Name, st.Error)
		default:
			st.Reachable = true
			st.Backlog = ss.backlog.Rows
			st.OldestEventAgeSeconds = age(ss.backlog.Oldest)
			older(ss.backlog.Oldest)
			resp.Events.Backlog += ss.backlog.Rows
			if a := st.OldestEventAgeSeconds; a > maxBacklogAge.Seconds() {
				problem("shard %s: its oldest undelivered event is %.0fs old (more than %s): is a relay running and Redis up?", rec.Name, a, maxBacklogAge)
			}
		}
		if z := sizes[rec.Name]; z.ok {
			st.Rows, st.Bytes = z.size.Rows, z.size.Bytes
		}
		if h := cur.queries[rec.Name]; h != nil {
			var bh *dto.Histogram
			if base.queries != nil {
				bh = base.queries[rec.Name]
			}
			delta := float64(h.GetSampleCount())
			if bh != nil {
				delta -= float64(bh.GetSampleCount())
			}
			st.Qps = perSecond(delta, window)
			st.P99Ms = quantile(0.99, bh, h) * 1000
		}
		if sh, ok := s.shard(rec.Name); ok {
			if ps := sh.Stat(); ps != nil {
				st.PoolAcquired, st.PoolMax = ps.AcquiredConns(), ps.MaxConns()
			}
		}
		st.PublishedPerSecond = perSecond(float64(cur.published[rec.Name]-base.published[rec.Name]), window)
		resp.Shards = append(resp.Shards, st)
	}
	if smp.cfgErr != nil {
		problem("catalog: %s", describeUnreachable(smp.cfgErr))
	} else {
		resp.Events.Backlog += smp.config.rows
		older(smp.config.oldest)
		if a := age(smp.config.oldest); a > maxBacklogAge.Seconds() {
			problem("config outbox: its oldest undelivered event is %.0fs old (more than %s)", a, maxBacklogAge)
		}
	}
	resp.Events.OldestEventAgeSeconds = age(oldest)

	resp.Owners = make([]uint32, topo.PartitionCount)
	for p, owner := range topo.Table.Owners() {
		resp.Owners[p] = index[owner]
	}
	switch {
	case smp.rebErr == nil:
		resp.Rebalance = rebalanceProto(smp.reb, smp.moves, now)
		for _, m := range smp.moves {
			st := mover.State(m.State)
			if st == mover.Failed {
				problem("move %d (%s → %s) failed: %s", m.ID, m.Source, m.Target, m.LastError)
			}
			if st.Terminal() {
				continue
			}
			resp.MovingPartitions = append(resp.MovingPartitions, m.Partitions...)
			if st == mover.Frozen {
				resp.FrozenPartitions = append(resp.FrozenPartitions, m.Partitions...)
			}
		}
		if smp.reb.State == catalog.RebalanceFailed && !slices.ContainsFunc(smp.moves, func(m catalog.Move) bool { return m.State == string(mover.Failed) }) {
			problem("rebalance %d failed: %s", smp.reb.ID, smp.reb.Error)
		}
	case !errors.Is(smp.rebErr, catalog.ErrNoRebalance):
		problem("catalog: rebalances: %s", describeUnreachable(smp.rebErr))
	}
	if c := s.opts.Cache; c != nil {
		cs := c.Stats()
		hits := cs.LocalHits + cs.RedisHits
		resp.Cache = &pb.CacheStatus{Enabled: true, LocalHits: cs.LocalHits, RedisHits: cs.RedisHits, Misses: cs.Misses, Breaker: cs.Breaker.String()}
		if total := hits + cs.Misses; total > 0 {
			resp.Cache.HitRatio = float64(hits) / float64(total)
		}
	} else {
		resp.Cache = &pb.CacheStatus{}
	}
	return resp, nil
}

// describeUnreachable says why a database did not answer without quoting
// anything that may hold a DSN.
func describeUnreachable(err error) string {
	switch {
	case errors.Is(err, errShardNotOpen):
		return "this server has no connection pool for it"
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Sprintf("no answer within %s", sampleTimeout)
	case shards.IsUnavailable(err):
		return "cannot connect"
	}
	return "query failed (see the server log)"
}

// statusCollector reports the sampled state at scrape time.
type statusCollector struct{ s *Server }

var (
	shardUpDesc = prometheus.NewDesc("shardgate_shard_up",
		"1 if the shard answered this instance's last look (at most 1 s old), else 0.", []string{"shard"}, nil)
	shardPartitionsDesc = prometheus.NewDesc("shardgate_shard_partitions",
		"Partitions the shard owns in the routing table this instance uses.", []string{"shard"}, nil)
	shardRowsDesc = prometheus.NewDesc("shardgate_shard_rows",
		"Estimated live rows of users, sessions and items on the shard (PostgreSQL statistics, sampled at most every 15 s).", []string{"shard"}, nil)
	shardBytesDesc = prometheus.NewDesc("shardgate_shard_bytes",
		"Size of the shard's database (sampled at most every 15 s).", []string{"shard"}, nil)
	backlogDesc = prometheus.NewDesc("shardgate_outbox_backlog_events",
		"Undelivered events in the shard's outbox (counted up to a million).", []string{"shard"}, nil)
	oldestDesc = prometheus.NewDesc("shardgate_outbox_oldest_event_age_seconds",
		"Age of the oldest undelivered event in the shard's outbox; 0 when none waits.", []string{"shard"}, nil)
	configBacklogDesc = prometheus.NewDesc("shardgate_config_outbox_backlog_events",
		"Undelivered events in the catalog's config outbox.", nil, nil)
	configOldestDesc = prometheus.NewDesc("shardgate_config_outbox_oldest_event_age_seconds",
		"Age of the oldest undelivered config event; 0 when none waits.", nil, nil)
	publishedDesc = prometheus.NewDesc("shardgate_events_published_total",
		"Events this instance's relay of the shard published (in Redis, out of the outbox).", []string{"shard"}, nil)
	configPublishedDesc = prometheus.NewDesc("shardgate_config_events_published_total",
		"Config events this instance's config relay published.", nil, nil)
	relayLeadingDesc = prometheus.NewDesc("shardgate_relay_leading",
		"1 while this instance leads the shard's relay (exactly one instance should, per shard).", []string{"shard"}, nil)
	configRelayLeadingDesc = prometheus.NewDesc("shardgate_config_relay_leading",
		"1 while this instance leads the config relay.", nil, nil)
	watchStreamsDesc = prometheus.NewDesc("shardgate_watch_streams",
		"Watch streams open on this instance.", nil, nil)
	watchSentDesc = prometheus.NewDesc("shardgate_watch_events_sent_total",
		"Change events this instance sent on Watch streams.", nil, nil)
	moveProgressDesc = prometheus.NewDesc("shardgate_move_progress_ratio",
		"Rows copied / rows planned of each move not yet ended, by source and target shard.", []string{"source", "target"}, nil)
	movesDesc = prometheus.NewDesc("shardgate_moves",
		"Moves of the running or last rebalance, by state.", []string{"state"}, nil)
)

func (c statusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{shardUpDesc, shardPartitionsDesc, shardRowsDesc, shardBytesDesc, backlogDesc, oldestDesc,
		configBacklogDesc, configOldestDesc, publishedDesc, configPublishedDesc, relayLeadingDesc, configRelayLeadingDesc,
		watchStreamsDesc, watchSentDesc, moveProgressDesc, movesDesc} {
		ch <- d
	}
}

func (c statusCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	ctx, cancel := context.WithTimeout(context.Background(), 2*sampleTimeout)
	defer cancel()
	smp := s.look(ctx)
	now := time.Now()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	age := func(t time.Time) float64 {
		if t.IsZero() {
			return 0
		}
		return math.Max(now.Sub(t).Seconds(), 0)
	}
	topo := s.watcher.Topology()
	var counts map[string]int
	if topo.Table != nil {
		counts = topo.Table.Counts()
	}
	sizes := s.observer.sizesNow()
	for _, rec := range topo.Shards {
		name := rec.Name
		gauge(shardPartitionsDesc, float64(counts[name]), name)
		ss, ok := smp.shards[name]
		if !ok || ss.err != nil {
			gauge(shardUpDesc, 0, name)
			continue
		}
		gauge(shardUpDesc, 1, name)
		gauge(backlogDesc, float64(ss.backlog.Rows), name)
		gauge(oldestDesc, age(ss.backlog.Oldest), name)
		if z := sizes[name]; z.ok {
			gauge(shardRowsDesc, float64(z.size.Rows), name)
			gauge(shardBytesDesc, float64(z.size.Bytes), name)
		}
	}
	if smp.cfgErr == nil {
		gauge(configBacklogDesc, float64(smp.config.rows))
		gauge(configOldestDesc, age(smp.config.oldest))
	}
	for _, st := range s.relayStats() {
		lead := 0.0
		if st.Leading {
			lead = 1
		}
		if st.Name == "" {
			ch <- prometheus.MustNewConstMetric(configPublishedDesc, prometheus.CounterValue, float64(st.Published))
			gauge(configRelayLeadingDesc, lead)
			continue
		}
		ch <- prometheus.MustNewConstMetric(publishedDesc, prometheus.CounterValue, float64(st.Published), st.Name)
		gauge(relayLeadingDesc, lead, st.Name)
	}
	gauge(watchStreamsDesc, float64(s.watchers.Load()))
	ch <- prometheus.MustNewConstMetric(watchSentDesc, prometheus.CounterValue, float64(s.observer.eventsSent.Load()))
	if smp.rebErr == nil {
		byState := map[string]int{}
		type pair struct{ source, target string }
		progress := map[pair][2]int64{} // copied, total
		for _, m := range smp.moves {
			byState[m.State]++
			if mover.State(m.State).Terminal() || m.RowsTotal <= 0 {
				continue
			}
			k := pair{m.Source, m.Target}
			p := progress[k]
			progress[k] = [2]int64{p[0] + m.RowsCopied, p[1] + m.RowsTotal}
		}
		for k, p := range progress {
			gauge(moveProgressDesc, math.Min(float64(p[0])/float64(p[1]), 1), k.source, k.target)
		}
		for st, n := range byState {
			gauge(movesDesc, float64(n), st)
		}
	}
}
