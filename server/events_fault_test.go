package server

import (
	"context"
	"fmt"
	"testing"
	"time"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// Two instances run relays; a shard's Postgres crashes and comes back, then
// one instance goes away. A watcher on the other instance still gets every
// acknowledged write, per user in version order.
func TestEventsSurviveShardCrashAndInstanceLoss(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, pg := newCrashableCluster(t, ctx)
	ev := withEvents(t, 0) // one Redis prefix for both instances
	a := c.start(t, true, ev)
	b := c.start(t, true, ev)

	const users = 40
	var ids []string
	home := map[string]string{}
	for i := range users {
		id := fmt.Sprintf("u%d", i)
		ids = append(ids, id)
		loc, err := a.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: id})
		if err != nil {
			t.Fatal(err)
		}
		home[id] = loc.Shard
	}
	w := openWatch(t, b, &pb.WatchRequest{UserIds: ids})
	w.live(t)

	acked := map[string]int64{} // user → last acknowledged version
	write := func(ts *testServer, onlyShard string) {
		for _, id := range ids {
			if onlyShard != "" && home[id] != onlyShard {
				continue
			}
			r, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: `{}`})
			if err != nil {
				t.Fatalf("write %s: %v", id, err)
			}
			acked[id] = r.GetVersion()
		}
	}
	write(a, "")
	pg.Stop()
	write(a, "shard-0") // the other shard keeps going
	pg.Start()
	write(b, "")
	a.srv.Close() // instance a's relays are gone; b's take over
	write(b, "")

	want := 0
	for _, v := range acked {
		want += int(v)
	}
	seen := map[string]bool{}
	last := map[string]int64{}
	for got := 0; got < want; {
		e := w.next(t)
		if seen[e.GetEventId()] {
			continue
		}
		seen[e.GetEventId()] = true
		got++
		if e.GetVersion() != last[e.GetUserId()]+1 {
			t.Fatalf("%s: version %d after %d", e.GetUserId(), e.GetVersion(), last[e.GetUserId()])
		}
		last[e.GetUserId()] = e.GetVersion()
	}
	for id, v := range acked {
		if last[id] != v {
			t.Fatalf("%s: last event at version %d, acknowledged %d", id, last[id], v)
		}
	}
}
