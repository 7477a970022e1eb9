package server

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// Every user's row is on the shard LocateUser names and on no other, and
// 10,000 users spread over 4 shards within ±10% of even.
func TestUsersLandOnTheirShardEvenly(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 4)
	ts := c.start(t, false)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute) // 10,000 writes under -race
	defer cancel()
	const users = 10000
	ids := make(chan int)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for range 32 {
		wg.Go(func() {
			for i := range ids {
				if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: fmt.Sprintf("user-%d", i)}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	for i := range users {
		ids <- i
	}
	close(ids)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	perShard := map[string]int{}
	for _, name := range c.names {
		perShard[name] = c.count(t, name, `SELECT count(*) FROM users`)
	}
	total := 0
	for _, name := range sortedNames(perShard) {
		n := perShard[name]
		total += n
		if n < users/4*9/10 || n > users/4*11/10 {
			t.Errorf("%s holds %d of %d users, outside ±10%% of %d", name, n, users, users/4)
		}
	}
	if total != users {
		t.Fatalf("%d user rows across shards, want %d", total, users)
	}
	t.Logf("users per shard: %v", perShard)

	for i := 0; i < users; i += 97 {
		id := fmt.Sprintf("user-%d", i)
		loc, err := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: id})
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range c.names {
			n := c.count(t, name, `SELECT count(*) FROM users WHERE user_id = $1`, id)
			if want := map[bool]int{true: 1, false: 0}[name == loc.Shard]; n != want {
				t.Fatalf("%s on %s: %d rows, want %d (LocateUser says %s)", id, name, n, want, loc.Shard)
			}
		}
	}
}

// movePartition does by hand what the mover will: freeze on the source,
// copy the partition's rows, mark the source moved, own it on the target,
// then flip the catalog (see shards.OwnershipState for why in that order).
func (c *testCluster) movePartition(t *testing.T, p int32, from, to string) {
	t.Helper()
	c.exec(t, from, `UPDATE ownership SET state = 'frozen' WHERE partition = $1`, p)
	src := c.connect(t, from)
	defer src.Close(context.Background())
	rows, err := src.Query(context.Background(), `SELECT user_id, profile, version FROM users WHERE partition = $1`, p)
	if err != nil {
		t.Fatal(err)
	}
	type user struct {
		id      string
		profile []byte
		version int64
	}
	var us []user
	for rows.Next() {
		var u user
		if err := rows.Scan(&u.id, &u.profile, &u.version); err != nil {
			t.Fatal(err)
		}
		us = append(us, u)
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	for _, u := range us {
		c.exec(t, to, `INSERT INTO users (partition, user_id, profile, version) VALUES ($1, $2, $3, $4)`, p, u.id, u.profile, u.version)
	}
	c.exec(t, from, `UPDATE ownership SET state = 'moved' WHERE partition = $1`, p)
	c.exec(t, to, `INSERT INTO ownership (partition, state) VALUES ($1, 'owned')
		ON CONFLICT (partition) DO UPDATE SET state = 'owned'`, p)
	c.exec(t, "catalog", `UPDATE partitions SET shard = $2 WHERE partition = $1`, p, to)
}

// A router holding a stale map is fenced by the shard that gave the
// partition away; the call still succeeds, on the new owner, after a
// transparent reload and retry.
func TestStaleRouterIsFencedAndRetried(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	stale := c.start(t, false) // never watches: its map goes stale
	ctx := ctxT(t)

	const id = "dave"
	if _, err := stale.data.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: `{"v":1}`}); err != nil {
		t.Fatal(err)
	}
	loc, err := stale.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: id})
	if err != nil {
		t.Fatal(err)
	}
	from, to := loc.Shard, c.names[0]
	if to == from {
		to = c.names[1]
	}
	c.movePartition(t, loc.Partition, from, to)

	// The stale router still believes the old owner...
	if s, _ := stale.srv.router.ShardOf(loc.Partition); s != from {
		t.Fatalf("router already moved to %s; the test needs a stale map", s)
	}
	// ...yet reads and writes succeed, and the write lands on the new owner.
	got, err := stale.data.GetUser(ctx, &pb.GetUserRequest{UserId: id})
	if err != nil || got.Version != 1 {
		t.Fatalf("GetUser through a stale router = %v, %v", got, err)
	}
	put, err := stale.data.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: `{"v":2}`})
	if err != nil || put.Version != 2 {
		t.Fatalf("PutUser through a stale router = %v, %v", put, err)
	}
	if s, _ := stale.srv.router.ShardOf(loc.Partition); s != to {
		t.Fatalf("after the retry the router routes partition %d to %s, want %s", loc.Partition, s, to)
	}
	if n := c.count(t, to, `SELECT count(*) FROM users WHERE user_id = $1 AND version = 2`, id); n != 1 {
		t.Fatalf("new owner %s has %d rows at version 2", to, n)
	}
	if n := c.count(t, from, `SELECT count(*) FROM users WHERE user_id = $1 AND version = 2`, id); n != 0 {
		t.Fatalf("old owner %s took a write after giving the partition away", from)
	}
}

// A write to a frozen partition waits (bounded) instead of failing, and
// completes on the new owner once the move flips.
func TestWriteDuringFreezeCompletesAfterFlip(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	// The hand-made move below is slow under -race; the real one takes ms.
	ts := c.start(t, true, func(o *Options) { o.MoveWait = 20 * time.Second })
	ctx := ctxT(t)
	const id = "erin"
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: id}); err != nil {
		t.Fatal(err)
	}
	loc, _ := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: id})
	from, to := loc.Shard, c.names[0]
	if to == from {
		to = c.names[1]
	}
	c.exec(t, from, `UPDATE ownership SET state = 'frozen' WHERE partition = $1`, loc.Partition)

	// Reads never pause, even while frozen.
	if _, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: id}); err != nil {
		t.Fatalf("read of a frozen partition: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: `{"after":"move"}`})
		done <- err
	}()
	// Move only once the write has met the frozen partition and is retrying.
	for deadline := time.Now().Add(10 * time.Second); ts.srv.wrongShardRetries.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the write never met the frozen partition")
		}
		time.Sleep(time.Millisecond)
	}
	c.movePartition(t, loc.Partition, from, to)
	if err := <-done; err != nil {
		t.Fatalf("write across the move: %v", err)
	}
	if n := c.count(t, to, `SELECT count(*) FROM users WHERE user_id = $1 AND version = 2`, id); n != 1 {
		t.Fatalf("the write did not land on the new owner")
	}
}

// A partition nobody will take (frozen, never flipped) fails with
// Unavailable once the retries run out, rather than hanging.
func TestFrozenForeverIsUnavailable(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	ts := c.start(t, false)
	ctx := ctxT(t)
	loc, _ := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: "frank"})
	c.exec(t, loc.Shard, `UPDATE ownership SET state = 'frozen' WHERE partition = $1`, loc.Partition)
	_, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "frank"})
	wantCode(t, err, codes.Unavailable)
}

// The watcher follows a topology change through LISTEN/NOTIFY.
func TestWatcherFollowsTopology(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, true)
	ctx := ctxT(t)
	before := ts.srv.router.Table().Version()
	loc, _ := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: "gina"})
	to := c.names[0]
	if to == loc.Shard {
		to = c.names[1]
	}
	c.movePartition(t, loc.Partition, loc.Shard, to)
	deadline := time.Now().Add(10 * time.Second)
	for ts.srv.router.Table().Version() == before {
		if time.Now().After(deadline) {
			t.Fatal("the router never saw the topology change")
		}
		time.Sleep(10 * time.Millisecond)
	}
	after, _ := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: "gina"})
	if after.Shard != to {
		t.Fatalf("LocateUser after the change = %s, want %s", after.Shard, to)
	}
	topo, err := ts.admin.GetTopology(ctx, &pb.GetTopologyRequest{})
	if err != nil || topo.Version != after.TopologyVersion {
		t.Fatalf("GetTopology = %v, %v", topo, err)
	}
}

// A shard that is down makes only its own users Unavailable.
func TestShardDownDegradesOnlyItsUsers(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	down := c.names[1]
	c.exec(t, "catalog", `UPDATE shards SET dsn = 'postgres://postgres@127.0.0.1:1/none?connect_timeout=1' WHERE name = $1`, down)
	ts := c.start(t, false)
	ctx := ctxT(t)
	var sawDown, sawUp bool
	for i := 0; i < 50 && !(sawDown && sawUp); i++ {
		id := fmt.Sprintf("u%d", i)
		loc, _ := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: id})
		_, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: id})
		if loc.Shard == down {
			wantCode(t, err, codes.Unavailable)
			sawDown = true
		} else if err != nil {
			t.Fatalf("user on healthy shard %s: %v", loc.Shard, err)
		} else {
			sawUp = true
		}
	}
	if !sawDown || !sawUp {
		t.Fatal("50 users did not cover both shards")
	}
	// Migration status reports the dead shard instead of failing.
	st, err := ts.admin.MigrationStatus(ctx, &pb.MigrationStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range st.Shards {
		if (d.Name == down) != (d.Error != "") {
			t.Fatalf("migration status of %s: %v", d.Name, d)
		}
	}
	if st.Catalog.AppliedVersion != st.Catalog.LatestVersion || st.Catalog.LatestVersion < 1 {
		t.Fatalf("catalog migration status %v", st.Catalog)
	}
}

// Changing a shard's DSN in the catalog (a failover, a rotated password)
// reopens its pool without a single failed call.
func TestDSNChangeIsSeamless(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, true)
	ctx := ctxT(t)
	ids := []string{"olga", "pete", "quin", "rosa", "sam", "tess"}
	for _, id := range ids {
		if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: id}); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := ts.srv.shard("shard-0")
	stop := make(chan struct{})
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := w; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: ids[i%len(ids)]}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	for i := range 5 {
		for _, name := range c.names {
			c.exec(t, "catalog", `UPDATE shards SET dsn = $2 WHERE name = $1`, name, fmt.Sprintf("%s&application_name=rotation-%d", c.shardDSN[name], i))
		}
		v, _ := ts.srv.catalog.TopologyVersion(ctx)
		for deadline := time.Now().Add(10 * time.Second); ts.srv.router.Table().Version() < v; {
			if time.Now().After(deadline) {
				t.Fatal("the server never saw the DSN change")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("a call failed while DSNs changed: %v", err)
	}
	if after, _ := ts.srv.shard("shard-0"); after == before {
		t.Fatal("the pool was never reopened")
	}
}
