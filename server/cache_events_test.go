package server

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/shards"
)

// TestRelayHealsLostInvalidation: a change that reaches the databases without
// this server's write path (as when its invalidation was lost) leaves the
// cache stale only until the relay publishes its event, not for the TTL.
func TestRelayHealsLostInvalidation(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	addr, prefix := testenv.Redis(t)
	ts := c.start(t, true, withCache(t, addr, prefix, cache.Options{}), withEvents(t, 0))
	ctx := ctxT(t)

	if _, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "ns", Key: "k", ValueJson: `1`}); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "ann"}); err != nil {
		t.Fatal(err)
	}
	sess, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "ann", TtlSeconds: 600})
	if err != nil {
		t.Fatal(err)
	}
	// Load both into this server's memory: past the writer's floor window,
	// reads may answer from it.
	time.Sleep(1100 * time.Millisecond)
	for range 3 {
		if _, err := ts.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "ns", Key: "k"}); err != nil {
			t.Fatal(err)
		}
		if _, err := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: sess.Token}); err != nil {
			t.Fatal(err)
		}
	}
	before := ts.srv.Cache().Stats()
	if before.LocalHits == 0 {
		t.Fatalf("nothing answered from memory: %+v", before)
	}

	// Change both behind the server's back: only the relay can tell the cache.
	cat, err := catalog.Open(ctx, c.catalogDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	if _, err := cat.SetConfig(ctx, "ns", "k", []byte(`2`), nil); err != nil {
		t.Fatal(err)
	}
	sh, err := shards.Open(ctx, "shard-0", c.shardDSN["shard-0"], shards.PoolOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	p, err := parseToken("token", sess.Token, ts.srv.Router().Table().PartitionCount())
	if err != nil {
		t.Fatal(err)
	}
	if err := sh.RevokeSession(ctx, p, hashToken(sess.Token)); err != nil {
		t.Fatal(err)
	}

	// Liveness, not timing: the relay wakes on NOTIFY, and a stale answer
	// would otherwise last for the cache's TTL (minutes).
	deadline := time.Now().Add(20 * time.Second)
	for {
		cfg, cerr := ts.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "ns", Key: "k"})
		_, serr := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: sess.Token})
		if cerr != nil {
			t.Fatal(cerr)
		}
		if cfg.GetValueJson() == "2" && status.Code(serr) == codes.NotFound {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still stale after the relay had 20s: config %s, session err %v", cfg.GetValueJson(), serr)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if after := ts.srv.Cache().Stats(); after.InvalidationsReceived == before.InvalidationsReceived {
		t.Fatalf("no invalidation reached the cache: %+v", after)
	}
}
