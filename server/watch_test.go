package server

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/events"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/migrations"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// withEvents turns on relays and Watch with a Redis prefix of the test's own.
func withEvents(t testing.TB, maxLen int64) serverOption {
	t.Helper()
	addr, prefix := testenv.Redis(t)
	rc, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rc.Close)
	return func(o *Options) {
		o.Redis, o.EventsPrefix, o.RunRelays, o.StreamMaxLen = rc, prefix, true, maxLen
		o.WatchHeartbeat = 200 * time.Millisecond
	}
}

// watcher is one open Watch stream.
type watcher struct {
	stream pb.DataService_WatchClient
	cancel context.CancelFunc
}

func openWatch(t testing.TB, ts *testServer, req *pb.WatchRequest) *watcher {
	t.Helper()
	ctx, cancel := context.WithCancel(ctxT(t))
	st, err := ts.data.Watch(ctx, req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(cancel)
	return &watcher{stream: st, cancel: cancel}
}

// next returns the next event, skipping heartbeats.
func (w *watcher) next(t testing.TB) *pb.ChangeEvent {
	t.Helper()
	for {
		r, err := w.stream.Recv()
		if err != nil {
			t.Fatalf("watch: %v", err)
		}
		if e := r.GetEvent(); e != nil {
			return e
		}
	}
}

// live waits for a heartbeat: the watch has resolved where it starts.
func (w *watcher) live(t testing.TB) string {
	t.Helper()
	for {
		r, err := w.stream.Recv()
		if err != nil {
			t.Fatalf("watch: %v", err)
		}
		if hb := r.GetHeartbeat(); hb != nil {
			return hb.GetCursor()
		}
	}
}

func putUser(t testing.TB, ts *testServer, user, profile string) int64 {
	t.Helper()
	r, err := ts.data.PutUser(ctxT(t), &pb.PutUserRequest{UserId: user, ProfileJson: profile})
	if err != nil {
		t.Fatal(err)
	}
	return r.GetVersion()
}

// A watch resumed from a saved cursor gets exactly the events after it, in
// the order the first watch saw them, and nothing of users it does not follow.
func TestWatchResumesExactlyAfterCursor(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, true, withEvents(t, 0))
	req := &pb.WatchRequest{UserIds: []string{"alice", "bob"}, Config: true}
	w := openWatch(t, ts, req)
	w.live(t)

	putUser(t, ts, "alice", `{"n":1}`)
	putUser(t, ts, "carol", `{}`) // not followed
	putUser(t, ts, "bob", `{"n":1}`)
	putUser(t, ts, "alice", `{"n":2}`)
	if _, err := ts.data.SetConfig(ctxT(t), &pb.SetConfigRequest{Namespace: "ns", Key: "k", ValueJson: `1`}); err != nil {
		t.Fatal(err)
	}
	var first []*pb.ChangeEvent
	for range 4 {
		first = append(first, w.next(t))
	}
	for _, e := range first {
		if e.GetUserId() == "carol" {
			t.Fatalf("event of an unfollowed user: %v", e)
		}
	}
	perUser := map[string][]int64{}
	for _, e := range first {
		if e.GetEntity() == "user" {
			perUser[e.GetUserId()] = append(perUser[e.GetUserId()], e.GetVersion())
		}
	}
	if fmt.Sprint(perUser["alice"]) != "[1 2]" || fmt.Sprint(perUser["bob"]) != "[1]" {
		t.Fatalf("versions per user: %v (events %v)", perUser, first)
	}
	// Disconnect after the first event; write more meanwhile.
	saved := first[0].GetCursor()
	w.cancel()
	putUser(t, ts, "bob", `{"n":2}`)

	w2 := openWatch(t, ts, &pb.WatchRequest{UserIds: []string{"alice", "bob"}, Config: true, Cursor: saved})
	var got []*pb.ChangeEvent
	for range 4 {
		got = append(got, w2.next(t))
	}
	// Across partitions the interleaving may differ; per stream it may not.
	want := map[string]bool{}
	for _, e := range first[1:] {
		want[e.GetEventId()] = true
	}
	last := map[string]int64{}
	for _, e := range got {
		k := e.GetEntity() + "/" + e.GetKey()
		if e.GetVersion() <= last[k] {
			t.Fatalf("%s: version %d after %d", k, e.GetVersion(), last[k])
		}
		last[k] = e.GetVersion()
		if want[e.GetEventId()] {
			delete(want, e.GetEventId())
		} else if e.GetUserId() != "bob" || e.GetVersion() != 2 {
			t.Fatalf("resumed watch got %v, not an event after the cursor", e)
		}
	}
	if len(want) != 0 {
		t.Fatalf("resumed watch missed %d events after the cursor", len(want))
	}
}

// A watcher that never reads does not hold up another; when it reads again
// it gets its events in order, or OUT_OF_RANGE once it fell behind the
// retention. The retention (200-300 entries: MAXLEN ~ trims whole nodes of
// 100) is far behind the 400 writes for the stalled one, which holds a
// stream window of a few 16 KB events, and gives the reader slack enough
// for a loaded machine.
func TestWatchSlowWatcherDoesNotBlockOthers(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	ts := c.start(t, true, withEvents(t, 200))
	p := router.Partition("alice", router.DefaultPartitions)
	req := &pb.WatchRequest{Partitions: []uint32{uint32(p)}}
	stalled := openWatch(t, ts, req)
	stalled.live(t)
	reader := openWatch(t, ts, req)
	reader.live(t)

	const n = 400
	big := `{"pad":"` + strings.Repeat("x", 16<<10) + `"}`
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range n {
			if _, err := ts.data.PutUser(ctxT(t), &pb.PutUserRequest{UserId: "alice", ProfileJson: big}); err != nil {
				t.Errorf("write %d: %v", i, err)
				return
			}
		}
	})
	for i := range n {
		if e := reader.next(t); e.GetVersion() != int64(i+1) {
			t.Fatalf("reader: event %d has version %d", i, e.GetVersion())
		}
	}
	wg.Wait()
	// The stalled one: whatever it gets is in order (what its stream
	// trimmed meanwhile, from Postgres); if it ends, it is because it fell
	// behind.
	var prev int64
	for prev < n {
		r, err := stalled.stream.Recv()
		if err != nil {
			if status.Code(err) != codes.OutOfRange {
				t.Fatalf("stalled watcher ended with %v, want OUT_OF_RANGE", err)
			}
			t.Logf("stalled watcher ended after version %d: %v", prev, err)
			return
		}
		if e := r.GetEvent(); e != nil {
			if e.GetVersion() != prev+1 {
				t.Fatalf("stalled watcher: version %d after %d", e.GetVersion(), prev)
			}
			prev = e.GetVersion()
		}
	}
}

// Watch validates before it touches Redis, and a cursor behind both its
// stream and the events Postgres retains is OUT_OF_RANGE with advice.
func TestWatchErrors(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	off := c.start(t, false) // no Redis at all
	on := c.start(t, false, withEvents(t, 0))
	tooMany := make([]string, maxWatchUsers+1)
	for i := range tooMany {
		tooMany[i] = fmt.Sprint("u", i)
	}
	for _, tc := range []struct {
		req   *pb.WatchRequest
		field string
	}{
		{&pb.WatchRequest{}, "user_ids"},
		{&pb.WatchRequest{UserIds: []string{"a"}, Partitions: []uint32{1}}, "partitions"},
		{&pb.WatchRequest{UserIds: tooMany}, "user_ids"},
		{&pb.WatchRequest{UserIds: []string{"ok", "not ok"}}, "user_ids[1]"},
		{&pb.WatchRequest{Partitions: []uint32{1, router.DefaultPartitions}}, "partitions[1]"},
		{&pb.WatchRequest{Partitions: []uint32{1}, Cursor: "garbage!"}, "cursor"},
	} {
		for _, ts := range []*testServer{off, on} {
			st, err := ts.data.Watch(ctxT(t), tc.req)
			if err == nil {
				_, err = st.Recv()
			}
			if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), tc.field+":") {
				t.Fatalf("%v: %v, want InvalidArgument naming %s", tc.req, err, tc.field)
			}
		}
	}
	st, err := off.data.Watch(ctxT(t), &pb.WatchRequest{Partitions: []uint32{1}})
	if err == nil {
		_, err = st.Recv()
	}
	wantCode(t, err, codes.FailedPrecondition)

	// Past MaxWatchers, a watch is refused; one ending frees its place.
	one := c.start(t, false, withEvents(t, 0), func(o *Options) { o.MaxWatchers = 1 })
	first := openWatch(t, one, &pb.WatchRequest{Partitions: []uint32{1}})
	first.live(t)
	st, err = one.data.Watch(ctxT(t), &pb.WatchRequest{Partitions: []uint32{2}})
	if err == nil {
		_, err = st.Recv()
	}
	wantCode(t, err, codes.ResourceExhausted)
	first.cancel()
	waitUntil(t, "the ended watch to free its place", func() bool { return one.srv.watchers.Load() == 0 })
	openWatch(t, one, &pb.WatchRequest{Partitions: []uint32{2}}).live(t)

	// A stream whose oldest entry is tick 291, of a partition whose events
	// up to 300 were delivered and then pruned from Postgres: a cursor at
	// 289 is too old, one at 290 is just in time.
	rc, keys := on.srv.opts.Redis, events.Keys{Prefix: on.srv.opts.EventsPrefix}
	user := "u0"
	for i := 1; router.Partition(user, router.DefaultPartitions) != 7; i++ {
		user = fmt.Sprint("u", i)
	}
	for i := 1; i <= 300; i++ {
		cmd := rc.B().Xadd().Key(keys.Stream(7)).Id(fmt.Sprintf("%d-0", i)).FieldValue().
			FieldValue("event_id", fmt.Sprintf("00000000-0000-4000-8000-%012d", i)).FieldValue("user_id", user).
			FieldValue("partition", "7").FieldValue("entity", "user").FieldValue("key", user).FieldValue("op", "upsert").
			FieldValue("version", fmt.Sprint(i)).FieldValue("committed_at", time.Now().UTC().Format(time.RFC3339Nano)).Build()
		if err := rc.Do(ctxT(t), cmd).Error(); err != nil {
			t.Fatal(err)
		}
	}
	if err := rc.Do(ctxT(t), rc.B().Xtrim().Key(keys.Stream(7)).Maxlen().Threshold("10").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	c.exec(t, c.names[0], `INSERT INTO outbox_delivered (partition, tick) VALUES (7, 300)`)
	old := events.Cursor{{Stream: 7, Tick: 289}}.String()
	st, err = on.data.Watch(ctxT(t), &pb.WatchRequest{Partitions: []uint32{7}, Cursor: old})
	if err == nil {
		_, err = st.Recv()
	}
	wantCode(t, err, codes.OutOfRange)
	if !strings.Contains(status.Convert(err).Message(), "resync") {
		t.Fatalf("OUT_OF_RANGE without advice: %v", err)
	}
	w := openWatch(t, on, &pb.WatchRequest{Partitions: []uint32{7}, Cursor: events.Cursor{{Stream: 7, Tick: 290}}.String()})
	if e := w.next(t); e.GetVersion() != 291 {
		t.Fatalf("first event after cursor 290: %v", e)
	}
}

// Relays follow the topology: a shard added to the catalog gets one, a shard
// removed loses it.
func TestRelaysFollowTopology(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	ts := c.start(t, true, withEvents(t, 0))
	ctx := ctxT(t)
	dsn := testenv.NewDatabase(t)
	if _, err := migrations.Up(ctx, dsn, migrations.Shard); err != nil {
		t.Fatal(err)
	}
	c.shardDSN["extra"] = dsn
	relays := func() int {
		return c.count(t, "extra", `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1`, events.RelayApplicationName)
	}
	c.exec(t, "catalog", `INSERT INTO shards (name, dsn) VALUES ('extra', $1)`, dsn)
	c.exec(t, "extra", `INSERT INTO outbox (partition, user_id, entity, key, op, version) VALUES (9, 'zed', 'user', 'zed', 'upsert', 1)`)
	rc, keys := ts.srv.opts.Redis, events.Keys{Prefix: ts.srv.opts.EventsPrefix}
	waitUntil(t, "the new shard's event to be published", func() bool {
		n, err := rc.Do(ctx, rc.B().Xlen().Key(keys.Stream(9)).Build()).AsInt64()
		return err == nil && n == 1
	})
	c.exec(t, "catalog", `DELETE FROM shards WHERE name = 'extra'`)
	waitUntil(t, "the removed shard's relay to stop", func() bool { return relays() == 0 })
}

func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A watch of every partition has a cursor far longer than a user watch's;
// it must still be accepted back, through the whole interceptor chain.
func TestWatchAllPartitionsResumesFromLongCursor(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, true, withEvents(t, 0))
	n := ts.srv.Router().Table().PartitionCount()
	all := make([]uint32, n)
	for i := range all {
		all[i] = uint32(i)
	}
	w := openWatch(t, ts, &pb.WatchRequest{Partitions: all})
	w.live(t)
	putUser(t, ts, "alice", `{"n":1}`)
	first := w.next(t)
	w.cancel()
	if len(first.GetCursor()) <= 256 {
		t.Fatalf("cursor of a %d-partition watch is only %d bytes; the test wants a long one", n, len(first.GetCursor()))
	}
	putUser(t, ts, "bob", `{"n":1}`)
	resumed := openWatch(t, ts, &pb.WatchRequest{Partitions: all, Cursor: first.GetCursor()})
	if e := resumed.next(t); e.GetUserId() != "bob" {
		t.Fatalf("resumed from alice's event, got %s's", e.GetUserId())
	}
}

// Shutting down ends open watches with Unavailable (resume elsewhere)
// instead of holding the graceful stop for its whole grace period.
func TestEndWatchesOnShutdown(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	ts := c.start(t, true, withEvents(t, 0))
	w := openWatch(t, ts, &pb.WatchRequest{UserIds: []string{"alice"}})
	w.live(t)
	ts.srv.EndWatches()
	for {
		_, err := w.stream.Recv()
		if err == nil {
			continue // a heartbeat already in flight
		}
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("watch after EndWatches: %v, want Unavailable", err)
		}
		break
	}
	_, err := ts.data.Watch(ctxT(t), &pb.WatchRequest{UserIds: []string{"alice"}})
	if err == nil {
		st, _ := ts.data.Watch(ctxT(t), &pb.WatchRequest{UserIds: []string{"alice"}})
		_, err = st.Recv()
	}
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("new watch after EndWatches: %v, want Unavailable", err)
	}
}
