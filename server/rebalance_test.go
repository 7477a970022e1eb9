package server

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// withMover runs the rebalancing executor, polling fast.
func withMover() serverOption {
	return func(o *Options) {
		o.RunMover = true
		o.Mover = mover.ExecutorOptions{Interval: 100 * time.Millisecond, ReapInterval: time.Second}
	}
}

// waitRebalance polls until the latest rebalance ends and returns it.
func waitRebalance(t *testing.T, admin pb.AdminServiceClient, within time.Duration) *pb.Rebalance {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		resp, err := admin.GetRebalance(ctxT(t), &pb.GetRebalanceRequest{})
		if err != nil {
			t.Fatal(err)
		}
		r := resp.GetRebalance()
		if r.GetState() != pb.RebalanceState_REBALANCE_STATE_RUNNING {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("rebalance still running after %s:\n%s", within, movesText(r))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// movesText is one line per move: its state and last error.
func movesText(r *pb.Rebalance) string {
	var b strings.Builder
	for _, m := range r.GetMoves() {
		fmt.Fprintf(&b, "move %d %s→%s (%d partitions): %s, %d/%d rows, %d attempts, last error %q\n", m.GetId(), m.GetSource(), m.GetTarget(),
			len(m.GetPartitions()), m.GetState(), m.GetRowsCopied(), m.GetRowsTotal(), m.GetAttempts(), m.GetLastError())
	}
	return b.String()
}

// checkPlacement fails unless the catalog's map is the placement of the
// given weighted shards, and every shard's ownership table agrees.
func checkPlacement(t *testing.T, c *testCluster, ts *testServer, shards []router.ShardWeight) {
	t.Helper()
	topo, err := ts.srv.catalog.LoadTopology(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	want, err := router.Place(shards, router.RingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(topo.Table.Owners(), want) {
		t.Fatal("the partition map is not the placement of the shard set")
	}
	for _, s := range shards {
		owned := c.count(t, s.Name, `SELECT count(*) FROM ownership WHERE state = 'owned'`)
		others := c.count(t, s.Name, `SELECT count(*) FROM ownership WHERE state <> 'owned'`)
		if owned != topo.Table.Counts()[s.Name] || others != 0 {
			t.Fatalf("%s lists %d owned and %d other partitions; the map gives it %d", s.Name, owned, others, topo.Table.Counts()[s.Name])
		}
	}
}

// noReplicationObjects fails if any database of the cluster keeps a
// publication, a subscription or a slot of a move.
func noReplicationObjects(t *testing.T, c *testCluster, names ...string) {
	t.Helper()
	for _, n := range names {
		if got := c.count(t, n, `SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_subscription
			WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()))
			+ (SELECT count(*) FROM pg_replication_slots WHERE database = current_database())`); got != 0 {
			t.Fatalf("%s keeps %d publications, subscriptions or slots", n, got)
		}
	}
}

// Add a shard, rebalance onto it, drain another, rebalance off it and
// remove it, on a quiet cluster: the data stays, the map follows the
// placement, and nothing of the moves is left behind.
func TestRebalanceAddDrainRemove(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 4)
	ts := c.start(t, true, withMover())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	const users = 500
	tokens := map[string]string{}
	for i := range users {
		id := fmt.Sprintf("user-%d", i)
		if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: fmt.Sprintf(`{"i":%d}`, i)}); err != nil {
			t.Fatal(err)
		}
		if _, err := ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: id, Collection: "c", Key: "k", ValueJson: `"v"`}); err != nil {
			t.Fatal(err)
		}
		if i%5 == 0 {
			s, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: id, DataJson: `{}`, TtlSeconds: 3600})
			if err != nil {
				t.Fatal(err)
			}
			tokens[id] = s.GetToken()
		}
	}
	checkData := func() {
		t.Helper()
		for i := range users {
			id := fmt.Sprintf("user-%d", i)
			u, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: id})
			if err != nil || u.GetProfileJson() != fmt.Sprintf(`{"i": %d}`, i) {
				t.Fatalf("%s after the rebalance: %v, %v", id, u, err)
			}
			if tok, ok := tokens[id]; ok {
				if s, err := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: tok}); err != nil || s.GetUserId() != id {
					t.Fatalf("%s's session after the rebalance: %v, %v", id, s, err)
				}
			}
		}
		total := 0
		for _, n := range c.names {
			total += c.count(t, n, `SELECT count(*) FROM users`)
		}
		if total != users {
			t.Fatalf("%d user rows across the shards, want %d", total, users)
		}
	}

	// Nothing to do on a placed cluster.
	plan, err := ts.admin.PlanRebalance(ctx, &pb.PlanRebalanceRequest{})
	if err != nil || len(plan.GetMoves()) != 0 {
		t.Fatalf("plan of a fresh cluster: %v, %v", plan, err)
	}

	// Add shard-4 of weight 2.
	dsn := testenv.NewDatabase(t)
	c.shardDSN["shard-4"] = dsn
	c.names = append(c.names, "shard-4")
	if _, err := ts.admin.AddShard(ctx, &pb.AddShardRequest{Name: "shard-4", Dsn: dsn, Weight: 2}); err != nil {
		t.Fatal(err)
	}
	_, err = ts.admin.AddShard(ctx, &pb.AddShardRequest{Name: "shard-4", Dsn: dsn})
	wantCode(t, err, codes.AlreadyExists)
	_, err = ts.admin.AddShard(ctx, &pb.AddShardRequest{Name: "shard-5", Dsn: c.shardDSN["shard-0"]})
	wantCode(t, err, codes.FailedPrecondition) // holds another shard's data

	start, err := ts.admin.StartRebalance(ctx, &pb.StartRebalanceRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if n := start.GetPlan().GetPartitionsMoving(); n < 1000 || len(start.GetPlan().GetMoves()) < 4 {
		t.Fatalf("adding a shard of weight 2 to 4 plans %d partitions in %d moves", n, len(start.GetPlan().GetMoves()))
	}
	_, err = ts.admin.StartRebalance(ctx, &pb.StartRebalanceRequest{})
	wantCode(t, err, codes.FailedPrecondition)
	r := waitRebalance(t, ts.admin, 3*time.Minute)
	if r.GetState() != pb.RebalanceState_REBALANCE_STATE_DONE {
		t.Fatalf("rebalance ended %s:\n%s", r.GetState(), movesText(r))
	}
	for _, m := range r.GetMoves() {
		if m.GetState() != "cleaned_up" || m.GetFreezes() != 1 || (m.GetRowsTotal() > 0 && m.GetVerifiedRows() == 0) {
			t.Fatalf("move %v", m)
		}
	}
	weights := []router.ShardWeight{{Name: "shard-0", Weight: 1}, {Name: "shard-1", Weight: 1}, {Name: "shard-2", Weight: 1}, {Name: "shard-3", Weight: 1}, {Name: "shard-4", Weight: 2}}
	checkPlacement(t, c, ts, weights)
	checkData()
	noReplicationObjects(t, c, c.names...)

	// Drain shard-0 and take it out.
	_, err = ts.admin.RemoveShard(ctx, &pb.RemoveShardRequest{Name: "shard-0"})
	wantCode(t, err, codes.FailedPrecondition)
	if _, err := ts.admin.DrainShard(ctx, &pb.DrainShardRequest{Name: "shard-0"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.admin.StartRebalance(ctx, &pb.StartRebalanceRequest{MaxParallel: 3}); err != nil {
		t.Fatal(err)
	}
	if r := waitRebalance(t, ts.admin, 3*time.Minute); r.GetState() != pb.RebalanceState_REBALANCE_STATE_DONE {
		t.Fatalf("drain rebalance ended %s:\n%s", r.GetState(), movesText(r))
	}
	if _, err := ts.admin.RemoveShard(ctx, &pb.RemoveShardRequest{Name: "shard-0"}); err != nil {
		t.Fatal(err)
	}
	c.names = slices.DeleteFunc(c.names, func(n string) bool { return n == "shard-0" })
	checkPlacement(t, c, ts, weights[1:])
	checkData()
	noReplicationObjects(t, c, c.names...)

	v, err := ts.admin.VerifyPartition(ctx, &pb.VerifyPartitionRequest{Partition: 17})
	if err != nil || !v.GetOk() || len(v.GetCopies()) != 1 {
		t.Fatalf("verify partition 17: %v, %v", v, err)
	}
}
