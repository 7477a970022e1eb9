package server

import (
	"bufio"
	"fmt"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// scrapeSeries reads the server's /metrics page into series → value, a series
// being the name with its labels as printed.
func scrapeSeries(t testing.TB, s *Server) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	s.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	out := map[string]float64{}
	sc := bufio.NewScanner(rec.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// sum adds the values of every series of a metric.
func sum(m map[string]float64, name string) (total float64, n int) {
	for k, v := range m {
		if k == name || strings.HasPrefix(k, name+"{") {
			total += v
			n++
		}
	}
	return total, n
}

// After a short load the operator's series are there with plausible
// values: each write published once, the backlog back to zero, every
// partition owned, each relay led here, the watch's events counted.
func TestMetricsOperatorSeries(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, true, withEvents(t, 0))
	ctx := ctxT(t)
	const writes = 40
	users := make([]string, writes)
	for i := range users {
		users[i] = fmt.Sprintf("load-%d", i)
	}
	w := openWatch(t, ts, &pb.WatchRequest{UserIds: users})
	// The watch reads from "now": wait until it is open before writing.
	if _, err := w.stream.Header(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the watch to open", func() bool { return ts.srv.watchers.Load() == 1 })
	for _, u := range users {
		if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: u, ProfileJson: `{"n":1}`}); err != nil {
			t.Fatal(err)
		}
	}
	received := 0
	for received < writes {
		r, err := w.stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.GetEvent() != nil {
			received++
		}
	}

	var m map[string]float64
	waitUntil(t, "every write published and the backlog empty", func() bool {
		time.Sleep(sampleMaxAge / 4)
		m = scrapeSeries(t, ts.srv)
		published, _ := sum(m, "shardgate_events_published_total")
		backlog, n := sum(m, "shardgate_outbox_backlog_events")
		return published == writes && backlog == 0 && n == 2
	})
	for _, name := range c.names {
		for _, series := range []string{
			`shardgate_shard_up{shard="` + name + `"}`,
			`shardgate_relay_leading{shard="` + name + `"}`,
		} {
			if m[series] != 1 {
				t.Errorf("%s = %v, want 1", series, m[series])
			}
		}
		if v, ok := m[`shardgate_outbox_oldest_event_age_seconds{shard="`+name+`"}`]; !ok || v != 0 {
			t.Errorf("oldest event age of %s = %v (present %v), want 0 with nothing waiting", name, v, ok)
		}
		if v := m[`shardgate_shard_bytes{shard="`+name+`"}`]; v < 1e6 {
			t.Errorf("shard %s size %v bytes: implausible for a PostgreSQL database", name, v)
		}
	}
	if parts, _ := sum(m, "shardgate_shard_partitions"); parts != 4096 {
		t.Errorf("partitions owned add up to %v, want 4096", parts)
	}
	if q, _ := sum(m, "shardgate_shard_query_duration_seconds_count"); q < writes {
		t.Errorf("%v shard queries counted, want at least the %d writes", q, writes)
	}
	if m["shardgate_watch_streams"] != 1 || m["shardgate_watch_events_sent_total"] != writes {
		t.Errorf("watch streams %v, events sent %v; want 1 and %d", m["shardgate_watch_streams"], m["shardgate_watch_events_sent_total"], writes)
	}
	if m["shardgate_config_relay_leading"] != 1 {
		t.Errorf("config relay leading = %v, want 1", m["shardgate_config_relay_leading"])
	}
	if t.Failed() {
		t.Logf("metrics: %v", m)
	}

	// The same figures in the summary.
	st, err := ts.admin.GetClusterStatus(ctx, &pb.GetClusterStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Shards) != 2 || len(st.Owners) != 4096 || len(st.Problems) != 0 {
		t.Fatalf("status: %d shards, %d owners, problems %q", len(st.Shards), len(st.Owners), st.Problems)
	}
	if st.Events.PublishedTotal != writes || st.Events.Backlog != 0 || st.Events.WatchEventsSent != writes {
		t.Errorf("status events = %v", st.Events)
	}
	for _, sh := range st.Shards {
		if !sh.Reachable || !sh.RelayLeading || sh.PoolMax == 0 {
			t.Errorf("status of %s = %v", sh.Name, sh)
		}
	}
}

// The p99 of the queries in a window comes from the histogram's buckets
// between two snapshots.
func TestQuantileBetweenSnapshots(t *testing.T) {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "x", Buckets: []float64{.001, .01, .1}})
	snap := func() *dto.Histogram {
		var m dto.Metric
		if err := h.Write(&m); err != nil {
			t.Fatal(err)
		}
		return proto.Clone(m.GetHistogram()).(*dto.Histogram)
	}
	for range 100 {
		h.Observe(.05) // before the window: must not count
	}
	base := snap()
	for range 99 {
		h.Observe(.0005)
	}
	h.Observe(.005)
	cur := snap()
	if got := quantile(0.5, base, cur); got <= 0 || got > .001 {
		t.Errorf("p50 = %v, want within the first bucket", got)
	}
	if got := quantile(0.995, base, cur); got <= .001 || got > .01 {
		t.Errorf("p99.5 = %v, want within the second bucket", got)
	}
	if got := quantile(0.99, cur, cur); got != 0 {
		t.Errorf("p99 of an empty window = %v, want 0", got)
	}
}

// A shard whose database is gone is a problem in the summary and reads as
// down in the metrics; the rest still answers.
func TestStatusShardUnreachable(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, false)
	ctx := ctxT(t)
	// Point shard-1 at a port nothing listens on.
	c.exec(t, "catalog", `UPDATE shards SET dsn = 'postgres://postgres@127.0.0.1:1/none?connect_timeout=1' WHERE name = 'shard-1'`)
	if err := ts.srv.watcher.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(sampleMaxAge) // past the last sample
	st, err := ts.admin.GetClusterStatus(ctx, &pb.GetClusterStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Problems) != 1 || !strings.Contains(st.Problems[0], "shard shard-1 is unreachable") {
		t.Fatalf("problems = %q, want shard-1 unreachable", st.Problems)
	}
	if strings.Contains(st.Problems[0], "127.0.0.1:1") {
		t.Errorf("problem %q quotes the DSN", st.Problems[0])
	}
	if !st.Shards[0].Reachable || st.Shards[1].Reachable {
		t.Errorf("reachable: %v %v, want true false", st.Shards[0].Reachable, st.Shards[1].Reachable)
	}
	m := scrapeSeries(t, ts.srv)
	if m[`shardgate_shard_up{shard="shard-1"}`] != 0 || m[`shardgate_shard_up{shard="shard-0"}`] != 1 {
		t.Errorf("shard_up: %v %v", m[`shardgate_shard_up{shard="shard-0"}`], m[`shardgate_shard_up{shard="shard-1"}`])
	}
}

// GetClusterStatus's threshold is checked like every field: 0 (default)
// or 1 s to a day.
func TestClusterStatusRequestRule(t *testing.T) {
	v := &validator{maxJSON: 1 << 16, partitions: func() int { return 4096 }}
	for n, ok := range map[int32]bool{0: true, 1: true, 86400: true, -1: false, 86401: false} {
		err := v.check(&pb.GetClusterStatusRequest{MaxBacklogAgeSeconds: n})
		if (err == nil) != ok {
			t.Errorf("max_backlog_age_seconds %d: err %v, want ok %v", n, err, ok)
		}
		if err != nil && !strings.Contains(err.Error(), "max_backlog_age_seconds") {
			t.Errorf("error %q does not name the field", err)
		}
	}
}
