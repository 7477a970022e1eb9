package server

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// The /metrics page reports calls by method and code, the topology version,
// each shard pool, and stale-map retries.
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
