package server

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/shardgate/shardgate/events"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// The /metrics page reports calls by method and code, the topology version,
// each shard pool, stale-map retries and quarantined relay partitions.
func TestMetrics(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, false)
	ctx := ctxT(t)
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "mia"}); err != nil {
		t.Fatal(err)
	}
	_, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: "nobody"})
	wantCode(t, err, codes.NotFound)
	loc, _ := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: "mia"})
	to := c.names[0]
	if to == loc.Shard {
		to = c.names[1]
	}
	c.movePartition(t, loc.Partition, loc.Shard, to)
	if _, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: "mia"}); err != nil {
		t.Fatal(err)
	}

	rec := httptest.NewRecorder()
	ts.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	page := string(body)
	for _, want := range []string{
		`grpc_server_handled_total{grpc_code="OK",grpc_method="PutUser",grpc_service="shardgate.v1.DataService",grpc_type="unary"} 1`,
		`grpc_server_handled_total{grpc_code="NotFound",grpc_method="GetUser",grpc_service="shardgate.v1.DataService",grpc_type="unary"} 1`,
		`grpc_server_handling_seconds_bucket`,
		`shardgate_shard_pool_conns{shard="shard-0",state="idle"}`,
		`shardgate_shard_pool_max_conns{shard="shard-1"}`,
		`shardgate_wrong_shard_retries_total 1`,
		`shardgate_topology_version `,
		`shardgate_relay_quarantined_partitions 0`,
		`go_goroutines `,
	} {
		if !strings.Contains(page, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if t.Failed() {
		t.Logf("metrics page:\n%s", page)
	}
}

// A partition whose stream clashes with its outbox clock shows in
// shardgate_relay_quarantined_partitions while this server's relay leads.
func TestMetricsQuarantinedPartitions(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	ts := c.start(t, false, withEvents(t, 0))
	ctx := ctxT(t)
	loc, err := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: "ann"})
	if err != nil {
		t.Fatal(err)
	}
	// Tick 1 of ann's stream holds another event, as if the clock had gone
	// backwards: her write's event, at tick 1 too, clashes.
	rc, keys := ts.srv.opts.Redis, events.Keys{Prefix: ts.srv.opts.EventsPrefix}
	cmd := rc.B().Xadd().Key(keys.Stream(int32(loc.Partition))).Id("1-0").FieldValue().FieldValue("event_id", "someone-else").Build()
	if err := rc.Do(ctx, cmd).Error(); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "ann"}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the gauge to count the partition", func() bool {
		rec := httptest.NewRecorder()
		ts.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		return strings.Contains(rec.Body.String(), "\nshardgate_relay_quarantined_partitions 1\n")
	})
}
