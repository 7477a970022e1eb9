package server

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// newCrashableCluster creates a 2-shard cluster (256 partitions) whose
// shard-1 lives on a PostgreSQL server of its own, which the test may crash
// (pg.Stop) and restart (pg.Start).
func newCrashableCluster(t *testing.T, ctx context.Context) (*testCluster, *testenv.PGCluster) {
	t.Helper()
	pg := testenv.NewPGCluster(t)
	c := &testCluster{catalogDSN: testenv.NewDatabase(t), shardDSN: map[string]string{
		"shard-0": testenv.NewDatabase(t),
		"shard-1": pg.CreateDatabase("shard1"),
	}, names: []string{"shard-0", "shard-1"}}
	specs := []catalog.ShardSpec{{Name: "shard-0", DSN: c.shardDSN["shard-0"]}, {Name: "shard-1", DSN: c.shardDSN["shard-1"]}}
	if err := catalog.CreateCluster(ctx, c.catalogDSN, router.RingConfig{PartitionCount: 256}, specs); err != nil {
		t.Fatal(err)
	}
	return c, pg
}

// A shard's Postgres crashes mid-run: only that shard's users get
// Unavailable, the others never notice; when it comes back the same server
// serves it again, with every acknowledged write intact.
func TestShardCrashAndRecovery(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, pg := newCrashableCluster(t, ctx)
	ts := c.start(t, true)

	home := map[string]string{}
	for i := range 40 {
		id := fmt.Sprintf("u%d", i)
		if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: fmt.Sprintf(`{"n":%d}`, i)}); err != nil {
			t.Fatal(err)
		}
		loc, err := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: id})
		if err != nil {
			t.Fatal(err)
		}
		home[id] = loc.Shard
	}
	perShard := map[string]int{}
	for _, s := range home {
		perShard[s]++
	}
	if perShard["shard-0"] == 0 || perShard["shard-1"] == 0 {
		t.Fatalf("40 users did not cover both shards: %v", perShard)
	}

	pg.Stop()
	for id, shard := range home {
		_, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: id})
		if shard == "shard-1" {
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("%s on the crashed shard: %v, want Unavailable", id, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s on the healthy shard: %v", id, err)
		}
		if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: `{"during":"outage"}`}); err != nil {
			t.Fatalf("write for %s on the healthy shard during the outage: %v", id, err)
		}
	}

	pg.Start()
	// The pool drops its broken connections as they fail; within moments
	// every call succeeds again, without restarting the server.
	deadline := time.Now().Add(30 * time.Second)
	for id, shard := range home {
		for {
			got, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: id})
			if err == nil {
				if shard == "shard-1" && got.Version != 1 {
					t.Fatalf("%s came back at version %d", id, got.Version)
				}
				break
			}
			if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
				t.Fatalf("%s after the shard came back: %v", id, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}
