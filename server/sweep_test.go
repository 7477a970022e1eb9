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
