package server

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

func withSweepInterval(d time.Duration) serverOption {
	return func(o *Options) { o.SweepInterval = d }
}

// createSession creates user and a session for it with data {"kind": kind}
// and returns the session's token.
func createSession(t testing.TB, ts *testServer, user, kind string) string {
	t.Helper()
	ctx := ctxT(t)
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: user}); err != nil {
		t.Fatal(err)
	}
	r, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: user, DataJson: fmt.Sprintf(`{"kind":%q}`, kind), TtlSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	return r.GetToken()
}

// expireKind makes the sessions of that kind on db expired, as time passing
// would (without an event).
func (c *testCluster) expireKind(t testing.TB, db, kind string) {
	t.Helper()
	c.exec(t, db, `UPDATE sessions SET expires_at = now() - interval '1 second' WHERE data->>'kind' = $1`, kind)
}

func (c *testCluster) countKind(t testing.TB, db, kind string) int {
	t.Helper()
	return c.count(t, db, `SELECT count(*) FROM sessions WHERE data->>'kind' = $1`, kind)
}

// The sweeper deletes expired sessions from every shard's table within
// about an interval, leaves live ones, and watchers get a delete event for
// each.
func TestSessionSweeper(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, true, withEvents(t, 0), withSweepInterval(50*time.Millisecond))
	var users []string
	for i := range 8 {
		users = append(users, fmt.Sprintf("sweep%d", i))
	}
	w := openWatch(t, ts, &pb.WatchRequest{UserIds: users})
	w.live(t)
	doomed := map[string]bool{} // hex token hash
	var live []string
	for _, u := range users {
		tok := createSession(t, ts, u, "doomed")
		doomed[fmt.Sprintf("%x", sha256.Sum256([]byte(tok)))] = true
		live = append(live, createSession(t, ts, u, "live"))
	}
	for _, name := range c.names {
		if c.countKind(t, name, "doomed") == 0 {
			t.Fatalf("%s got no session; pick more users", name)
		}
		c.expireKind(t, name, "doomed")
	}

	waitUntil(t, "the expired sessions to be swept", func() bool {
		n := 0
		for _, name := range c.names {
			n += c.countKind(t, name, "doomed")
		}
		return n == 0
	})
	for _, name := range c.names {
		if n := c.countKind(t, name, "live"); n == 0 {
			t.Fatalf("%s: live sessions were swept", name)
		}
	}
	for _, tok := range live {
		if _, err := ts.data.GetSession(ctxT(t), &pb.GetSessionRequest{Token: tok}); err != nil {
			t.Fatalf("live session after the sweep: %v", err)
		}
	}
	for len(doomed) > 0 {
		e := w.next(t)
		if e.GetEntity() != "session" || e.GetOp() != "delete" {
			continue // the creates
		}
		if !doomed[e.GetKey()] {
			t.Fatalf("delete event of a session that was not expired: %v", e)
		}
		delete(doomed, e.GetKey())
	}

	rec := httptest.NewRecorder()
	ts.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		fmt.Sprintf("shardgate_sessions_swept_total %d\n", len(users)),
		"shardgate_session_sweep_errors_total 0\n",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// A shard that is down fails its own sweeps (logged and counted) and
// nobody else's; once it is back, its expired sessions go too.
func TestSessionSweeperShardDown(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, pg := newCrashableCluster(t, ctx)
	ts := c.start(t, true, withSweepInterval(50*time.Millisecond))
	for i := 0; c.countKind(t, "shard-0", "doomed") == 0 || c.countKind(t, "shard-1", "doomed") == 0; i++ {
		if i == 100 {
			t.Fatal("100 users did not cover both shards")
		}
		createSession(t, ts, fmt.Sprintf("u%d", i), "doomed")
	}

	pg.Stop()
	c.expireKind(t, "shard-0", "doomed")
	waitUntil(t, "shard-0 to be swept while shard-1 is down", func() bool {
		return c.countKind(t, "shard-0", "doomed") == 0
	})
	waitUntil(t, "a failed sweep of shard-1 to be counted", func() bool {
		return ts.srv.sweepErrors.Load() > 0
	})

	pg.Start()
	c.expireKind(t, "shard-1", "doomed")
	waitUntil(t, "shard-1 to be swept once it is back", func() bool {
		return c.countKind(t, "shard-1", "doomed") == 0
	})
}

func withTombstoneRetention(d time.Duration) serverOption {
	return func(o *Options) { o.TombstoneRetention = d }
}

// tombstones counts the tombstones on db of keys named name: users and
// items on a shard, config values in the catalog.
func (c *testCluster) tombstones(t testing.TB, db, name string) int {
	t.Helper()
	if db == "catalog" {
		return c.count(t, db, `SELECT count(*) FROM config_tombstones WHERE key = $1`, name)
	}
	return c.count(t, db, `SELECT (SELECT count(*) FROM user_tombstones WHERE user_id LIKE $1 || '%')
		+ (SELECT count(*) FROM item_tombstones WHERE key = $1)`, name)
}

// ageTombstones makes the tombstones of keys named name (users whose ID
// starts with it) look two hours old on every database.
func (c *testCluster) ageTombstones(t testing.TB, name string) {
	t.Helper()
	for _, db := range c.names {
		c.exec(t, db, `UPDATE user_tombstones SET deleted_at = now() - interval '2 hours' WHERE user_id LIKE $1 || '%'`, name)
		c.exec(t, db, `UPDATE item_tombstones SET deleted_at = now() - interval '2 hours' WHERE key = $1`, name)
	}
	c.exec(t, "catalog", `UPDATE config_tombstones SET deleted_at = now() - interval '2 hours' WHERE key = $1`, name)
}

// deleteKeys creates and deletes, for each of n users named name0…, an
// item named name (at version 2, so its tombstone is 3) and then the user
// (tombstone 2), and a config value named name (tombstone 3).
func deleteKeys(t testing.TB, ts *testServer, name string, n int) {
	t.Helper()
	ctx := ctxT(t)
	for i := range n {
		u := fmt.Sprintf("%s%d", name, i)
		if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: u}); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if _, err := ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: u, Collection: "c", Key: name, ValueJson: `1`}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := ts.data.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: u}); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if _, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "ns", Key: name, ValueJson: `1`}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ts.data.DeleteConfig(ctx, &pb.DeleteConfigRequest{Namespace: "ns", Key: name}); err != nil {
		t.Fatal(err)
	}
}

// The sweeper prunes tombstones past the retention on every shard and in
// the catalog, leaves younger ones, and counts them; a key created again
// afterwards continues above its partition's floor.
func TestTombstonePruner(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, true, withSweepInterval(50*time.Millisecond), withTombstoneRetention(time.Hour))
	deleteKeys(t, ts, "old", 8)
	deleteKeys(t, ts, "young", 2)
	for _, name := range c.names {
		if c.tombstones(t, name, "old") == 0 {
			t.Fatalf("%s got no tombstone; pick more users", name)
		}
	}
	c.ageTombstones(t, "old")

	// 8 users, 8 items, 1 config value.
	waitUntil(t, "the old tombstones to be pruned", func() bool { return ts.srv.tombstonesPruned.Load() >= 17 })
	for _, db := range append([]string{"catalog"}, c.names...) {
		if n := c.tombstones(t, db, "old"); n != 0 {
			t.Fatalf("%s: %d old tombstones left", db, n)
		}
	}
	young := c.tombstones(t, "catalog", "young")
	for _, name := range c.names {
		young += c.tombstones(t, name, "young")
	}
	if young != 5 {
		t.Fatalf("%d young tombstones left, want 5", young)
	}

	// Every old partition's floor is 3 (the items' tombstones), config's too.
	ctx := ctxT(t)
	if r, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "old0"}); err != nil || r.GetVersion() != 4 {
		t.Fatalf("user created again: version %d, %v; want 4", r.GetVersion(), err)
	}
	if r, err := ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: "old0", Collection: "c", Key: "old", ValueJson: `2`}); err != nil || r.GetVersion() != 4 {
		t.Fatalf("item created again: version %d, %v; want 4", r.GetVersion(), err)
	}
	if r, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "ns", Key: "old", ValueJson: `2`}); err != nil || r.GetVersion() != 4 {
		t.Fatalf("config value set again: version %d, %v; want 4", r.GetVersion(), err)
	}

	rec := httptest.NewRecorder()
	ts.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		"shardgate_tombstones_pruned_total 17\n",
		"shardgate_tombstone_prune_errors_total 0\n",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// A negative retention keeps every tombstone; the default is 7 days.
func TestTombstoneRetentionOff(t *testing.T) {
	t.Parallel()
	if got := (Options{}).withDefaults().TombstoneRetention; got != 7*24*time.Hour {
		t.Fatalf("default retention %v", got)
	}
	c := newTestCluster(t, 1)
	off := c.start(t, false, withSweepInterval(-1), withTombstoneRetention(-1))
	deleteKeys(t, off, "old", 1)
	c.ageTombstones(t, "old")
	off.srv.sweepShards(ctxT(t)) // one round, as the sweeper would run it
	if n := c.tombstones(t, "shard-0", "old") + c.tombstones(t, "catalog", "old"); n != 3 || off.srv.tombstonesPruned.Load() != 0 {
		t.Fatalf("retention off: %d tombstones left, %d pruned; want 3, 0", n, off.srv.tombstonesPruned.Load())
	}
	on := c.start(t, false, withSweepInterval(-1), withTombstoneRetention(time.Hour))
	on.srv.sweepShards(ctxT(t))
	if n := c.tombstones(t, "shard-0", "old") + c.tombstones(t, "catalog", "old"); n != 0 || on.srv.tombstonesPruned.Load() != 3 {
		t.Fatalf("retention 1h: %d tombstones left, %d pruned; want 0, 3", n, on.srv.tombstonesPruned.Load())
	}
}
