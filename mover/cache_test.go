package mover_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// Sessions and config are answered from the cache before, during and after
// the move of the session's partition, by two instances sharing the cache:
// cache keys name no shard, so the move invalidates and flushes nothing and
// no read goes to a database. After the move, TouchSession and
// RevokeSession, now served by the new owner, invalidate the session on
// every instance as before.
func TestCacheAcrossMove(t *testing.T) {
	h := newHarness(t, harnessOptions{Shards: 2, Instances: 2, Cache: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p := router.Partition("cache-across-move", router.DefaultPartitions)
	user := usersIn(p, "cached-", 1)[0]
	a := h.instances[0]
	if _, err := a.data.PutUser(ctx, &pb.PutUserRequest{UserId: user, ProfileJson: `{}`}); err != nil {
		t.Fatal(err)
	}
	s, err := a.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: user, DataJson: `{"cart": 3}`, TtlSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	tok := s.GetToken()
	if _, err := a.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "mover", Key: "color", ValueJson: `"red"`}); err != nil {
		t.Fatal(err)
	}
	// The session's events are relayed (and their invalidations done)
	// before the cache is filled: nothing of the partition is in flight.
	source := h.ownerOf(p)
	target := h.other(source)
	for deadline := time.Now().Add(30 * time.Second); h.query(source, `SELECT count(*) FROM outbox WHERE partition = $1
		AND tick > coalesce((SELECT tick FROM outbox_delivered WHERE partition = $1), 0)`, p) > 0; {
		if time.Now().After(deadline) {
			t.Fatal("the partition's events were not relayed within 30 s")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// read reads the session and the config value on in and checks them.
	read := func(in *instance, version int64) error {
		got, err := in.data.GetSession(ctx, &pb.GetSessionRequest{Token: tok})
		if err != nil {
			return err
		}
		if got.GetUserId() != user || got.GetDataJson() != `{"cart": 3}` || got.GetVersion() != version {
			t.Errorf("session: got %v, want %s's at version %d", got, user, version)
		}
		c, err := in.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "mover", Key: "color"})
		if err != nil {
			return err
		}
		if c.GetValueJson() != `"red"` {
			t.Errorf("config: got %v", c)
		}
		return nil
	}
	// Fill both instances' memory: read until a read answers from it.
	for _, in := range h.instances {
		for i := 0; ; i++ {
			hits := in.cache.Stats().LocalHits
			if err := read(in, 1); err != nil {
				t.Fatal(err)
			}
			if in.cache.Stats().LocalHits == hits+2 {
				break
			}
			if i == 100 {
				t.Fatalf("never answered from memory: %+v", in.cache.Stats())
			}
		}
	}
	before := make([]cache.Stats, len(h.instances))
	for i, in := range h.instances {
		before[i] = in.cache.Stats()
	}

	// Read on both instances throughout the move.
	h.startMove(p, target, mover.DefaultFreezeBudget)
	reads := make([]int64, len(h.instances))
	for {
		for i, in := range h.instances {
			if err := read(in, 1); err != nil {
				t.Fatalf("read during the move: %v", err)
			}
			reads[i] += 2
		}
		r, err := a.admin.GetRebalance(ctx, &pb.GetRebalanceRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if r.GetRebalance().GetState() != pb.RebalanceState_REBALANCE_STATE_RUNNING {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	m := h.waitDone(time.Second)
	if h.ownerOf(p) != target || h.query(target, `SELECT count(*) FROM sessions WHERE partition = $1`, p) != 1 ||
		h.query(source, `SELECT count(*) FROM sessions WHERE partition = $1`, p) != 0 {
		t.Fatalf("the session did not move to %s", target)
	}
	for i, in := range h.instances {
		if err := read(in, 1); err != nil {
			t.Fatalf("read after the move: %v", err)
		}
		reads[i] += 2
		st := in.cache.Stats()
		if st.Loads != before[i].Loads || st.LocalHits-before[i].LocalHits != reads[i] {
			t.Fatalf("instance %d: %d reads during and after the move, %d answered from memory, %d loaded from a database",
				i, reads[i], st.LocalHits-before[i].LocalHits, st.Loads-before[i].Loads)
		}
		if st.InvalidationsReceived != before[i].InvalidationsReceived || st.Invalidations != before[i].Invalidations {
			t.Fatalf("instance %d: the move invalidated cache keys: %+v, before %+v", i, st, before[i])
		}
	}
	t.Logf("%d reads answered from memory during and after the move (freeze %.1f ms)", reads[0]+reads[1], m.GetLastFreezeMs())

	// Writes through the new owner still invalidate, on every instance.
	touched, err := h.instances[1].data.TouchSession(ctx, &pb.TouchSessionRequest{Token: tok, TtlSeconds: 7200})
	if err != nil {
		t.Fatal(err)
	}
	if v := h.query(target, `SELECT version FROM sessions WHERE partition = $1`, p); v != touched.GetVersion() {
		t.Fatalf("the touch did not reach the new owner: version %d there, touched %d", v, touched.GetVersion())
	}
	for i, in := range h.instances {
		for deadline := time.Now().Add(5 * time.Second); ; {
			got, err := in.data.GetSession(ctx, &pb.GetSessionRequest{Token: tok})
			if err != nil {
				t.Fatal(err)
			}
			if got.GetVersion() == touched.GetVersion() && got.GetExpiresAt().AsTime().Equal(touched.GetExpiresAt().AsTime()) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("instance %d still answers version %d after the touch to %d", i, got.GetVersion(), touched.GetVersion())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if _, err := a.data.RevokeSession(ctx, &pb.RevokeSessionRequest{Token: tok}); err != nil {
		t.Fatal(err)
	}
	if n := h.query(target, `SELECT count(*) FROM sessions WHERE partition = $1`, p); n != 0 {
		t.Fatal("the revoke did not reach the new owner")
	}
	for i, in := range h.instances {
		for deadline := time.Now().Add(5 * time.Second); ; {
			_, err := in.data.GetSession(ctx, &pb.GetSessionRequest{Token: tok})
			if status.Code(err) == codes.NotFound {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("instance %d: a revoked session answers %v", i, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	for i, in := range h.instances {
		if st := in.cache.Stats(); st.PrefixFlushes != 0 || st.Flushes != 0 || st.Overflow || st.Pending != 0 {
			t.Fatalf("instance %d's cache was flushed or fell behind: %+v", i, st)
		}
	}
}
