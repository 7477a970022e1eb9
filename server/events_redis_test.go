package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/shardgate/shardgate/events"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// withOwnRedis turns on relays and Watch on a redis-server of the test's
// own (no persistence), which the test may flush, kill and restart.
func withOwnRedis(t testing.TB) (serverOption, *testenv.RedisServer, rueidis.Client) {
	t.Helper()
	rs := testenv.NewRedisServer(t)
	rc, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{rs.Addr()}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rc.Close)
	return func(o *Options) {
		o.Redis, o.EventsPrefix, o.RunRelays = rc, "t:", true
		o.WatchHeartbeat = 200 * time.Millisecond
	}, rs, rc
}

// resumingWatcher follows a Watch and, when it ends for any reason but
// OUT_OF_RANGE, opens it again from the last cursor it got, as a pusher
// does. It keeps each event the first time it arrives (by event_id).
type resumingWatcher struct {
	mu         sync.Mutex
	cursor     string
	seen       map[string]bool
	events     []*pb.ChangeEvent
	outOfRange error
	resumes    int
	held       chan struct{}      // closed to let a paused watcher go on
	end        context.CancelFunc // ends the open stream
}

// pause disconnects the watcher until resume, as a pusher that restarts.
func (w *resumingWatcher) pause() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.held = make(chan struct{})
	if w.end != nil {
		w.end()
	}
}

func (w *resumingWatcher) resume() {
	w.mu.Lock()
	defer w.mu.Unlock()
	close(w.held)
	w.held = nil
}

func (w *resumingWatcher) run(ctx context.Context, ts *testServer, req *pb.WatchRequest) {
	w.seen = map[string]bool{}
	for ctx.Err() == nil {
		r := proto.Clone(req).(*pb.WatchRequest)
		w.mu.Lock()
		held := w.held
		w.mu.Unlock()
		if held != nil {
			select {
			case <-held:
			case <-ctx.Done():
				return
			}
		}
		sctx, end := context.WithCancel(ctx)
		w.mu.Lock()
		r.Cursor, w.end = w.cursor, end
		w.mu.Unlock()
		st, err := ts.data.Watch(sctx, r)
		for err == nil {
			var resp *pb.WatchResponse
			if resp, err = st.Recv(); err != nil {
				break
			}
			w.mu.Lock()
			if e := resp.GetEvent(); e != nil {
				if !w.seen[e.GetEventId()] {
					w.seen[e.GetEventId()] = true
					w.events = append(w.events, e)
				}
				if e.GetCursor() != "" {
					w.cursor = e.GetCursor()
				}
			} else if c := resp.GetHeartbeat().GetCursor(); c != "" {
				w.cursor = c
			}
			w.mu.Unlock()
		}
		end()
		if status.Code(err) == codes.OutOfRange {
			w.mu.Lock()
			w.outOfRange = err
			w.mu.Unlock()
			return
		}
		w.mu.Lock()
		w.resumes++
		w.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (w *resumingWatcher) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.events)
}

// Redis (no persistence) is killed and started again, empty, in the middle
// of 10,000 writes while a Watch follows their users, disconnected from
// a little before the crash until Redis is back (so its cursor is behind
// events only the lost streams held): every acknowledged write's event
// reaches the watcher, per key in version order with none missing, and
// the watch is never OUT_OF_RANGE. The relays publish the lost streams
// again from the retained outbox, and the resumed watch reads what its
// cursor needs from Postgres meanwhile.
func TestWatchSurvivesRedisRestartMidWrites(t *testing.T) {
	t.Parallel()
	const (
		writes  = 10000
		workers = 8
		users   = 60
	)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c := newTestCluster(t, 2)
	opt, rs, _ := withOwnRedis(t)
	ts := c.start(t, true, opt)
	var ids []string
	for i := range users {
		ids = append(ids, fmt.Sprintf("user-%d", i))
	}
	var w resumingWatcher
	wctx, stopWatch := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { w.run(wctx, ts, &pb.WatchRequest{UserIds: ids}) })
	defer func() { stopWatch(); wg.Wait() }()
	waitUntil(t, "the watch to start", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.cursor != ""
	})

	var (
		mu      sync.Mutex
		acked   = map[string]int{} // user → acknowledged writes
		next    atomic.Int64
		done    atomic.Int64
		restart sync.Once
		writers sync.WaitGroup
	)
	for range workers {
		writers.Go(func() {
			for {
				i := next.Add(1)
				if i > writes {
					return
				}
				id := ids[int(i)%users]
				// A write may fail while Redis is down only if it needed
				// Redis; it must not: retry to be sure it is acknowledged.
				var err error
				for try := 0; try < 5; try++ {
					if _, err = ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: fmt.Sprintf(`{"i":%d}`, i)}); err == nil {
						break
					}
				}
				if err != nil {
					t.Errorf("write %d: %v", i, err)
					return
				}
				mu.Lock()
				acked[id]++
				mu.Unlock()
				if done.Add(1) == writes*3/10 {
					restart.Do(func() {
						w.pause()
						time.Sleep(300 * time.Millisecond) // events it misses reach Redis
						rs.Kill()
						time.Sleep(500 * time.Millisecond)
						rs.Start()
						w.resume()
					})
				}
			}
		})
	}
	writers.Wait()
	if t.Failed() {
		return
	}
	deadline := time.Now().Add(2 * time.Minute)
	for w.count() < writes {
		w.mu.Lock()
		oor := w.outOfRange
		w.mu.Unlock()
		if oor != nil {
			t.Fatalf("the watch ended OUT_OF_RANGE: %v", oor)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the watcher got %d of %d events", w.count(), writes)
		}
		time.Sleep(50 * time.Millisecond)
	}
	stopWatch()
	wg.Wait()
	if w.outOfRange != nil {
		t.Fatalf("the watch ended OUT_OF_RANGE: %v", w.outOfRange)
	}
	if w.resumes == 0 {
		t.Fatal("the watch never had to resume: Redis was not restarted under it")
	}
	last := map[string]int64{}
	for _, e := range w.events {
		if e.GetVersion() != last[e.GetUserId()]+1 {
			t.Fatalf("%s: version %d after %d", e.GetUserId(), e.GetVersion(), last[e.GetUserId()])
		}
		last[e.GetUserId()] = e.GetVersion()
	}
	for id, n := range acked {
		if last[id] != int64(n) {
			t.Fatalf("%s: events up to version %d, %d writes acknowledged", id, last[id], n)
		}
	}
}

// A Watch resumed from a cursor older than its stream (Redis flushed) is
// served from the outbox, then follows the stream live; once the events
// after a cursor are pruned past the retention, that cursor is
// OUT_OF_RANGE.
func TestWatchServesCursorsOlderThanTheStreamFromPostgres(t *testing.T) {
	t.Parallel()
	// Whether the events after the cursor are still retained.
	for _, retained := range []bool{true, false} {
		t.Run(fmt.Sprint("retained=", retained), func(t *testing.T) {
			t.Parallel()
			c := newTestCluster(t, 1)
			opt, _, rc := withOwnRedis(t)
			retention := func(o *Options) {
				if !retained {
					o.EventRetention = 2 * time.Second
				}
			}
			ts := c.start(t, true, opt, retention)
			req := &pb.WatchRequest{UserIds: []string{"alice"}, Config: true}
			w := openWatch(t, ts, req)
			w.live(t)
			for i := range 5 {
				putUser(t, ts, "alice", fmt.Sprintf(`{"n":%d}`, i))
			}
			if _, err := ts.data.SetConfig(ctxT(t), &pb.SetConfigRequest{Namespace: "ns", Key: "k", ValueJson: `1`}); err != nil {
				t.Fatal(err)
			}
			first := w.next(t)
			if first.GetVersion() != 1 {
				t.Fatalf("first event %v", first)
			}
			for range 5 { // the rest, so everything is delivered
				w.next(t)
			}
			w.cancel()
			saved := first.GetCursor()
			if !retained {
				waitUntil(t, "the delivered events to be pruned", func() bool {
					return c.count(t, c.names[0], `SELECT count(*) FROM outbox`) == 0 &&
						c.count(t, "catalog", `SELECT count(*) FROM config_outbox`) == 0
				})
			}
			if err := rc.Do(ctxT(t), rc.B().Flushall().Build()).Error(); err != nil {
				t.Fatal(err)
			}

			w2 := openWatch(t, ts, &pb.WatchRequest{UserIds: []string{"alice"}, Config: true, Cursor: saved})
			if !retained {
				for {
					_, err := w2.stream.Recv()
					if err != nil {
						wantCode(t, err, codes.OutOfRange)
						if !strings.Contains(err.Error(), "resync") {
							t.Fatalf("OUT_OF_RANGE without advice: %v", err)
						}
						return
					}
				}
			}
			var got []string
			for range 5 {
				e := w2.next(t)
				got = append(got, fmt.Sprint(e.GetEntity(), e.GetVersion()))
			}
			if fmt.Sprint(got) != "[user2 user3 user4 user5 config1]" && fmt.Sprint(got) != "[config1 user2 user3 user4 user5]" {
				t.Fatalf("resumed watch got %v, want alice's versions 2-5 and the config event", got)
			}
			// Then live: a new write arrives through the stream.
			putUser(t, ts, "alice", `{"n":6}`)
			if e := w2.next(t); e.GetVersion() != 6 || e.GetCursor() == "" {
				t.Fatalf("live event %v", e)
			}
		})
	}
}

// Entries written straight into a partition stream that are not events of
// it (a config entity, a user of another partition, garbage) never reach a
// user's Watch; each is counted in
// shardgate_watch_dropped_entries_total and logged at WARN.
func TestWatchDropsForgedStreamEntries(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	addr, prefix := testenv.Redis(t)
	rc, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rc.Close)
	var logs strings.Builder
	var logMu sync.Mutex
	ts := c.start(t, true, func(o *Options) {
		o.Redis, o.EventsPrefix, o.RunRelays = rc, prefix, true
		o.WatchHeartbeat = 200 * time.Millisecond
		o.Logger = slogTo(&logMu, &logs)
	})
	w := openWatch(t, ts, &pb.WatchRequest{UserIds: []string{"alice"}, Config: true})
	w.live(t)
	putUser(t, ts, "alice", `{}`)
	if e := w.next(t); e.GetUserId() != "alice" || e.GetVersion() != 1 {
		t.Fatalf("first event %v", e)
	}
	p := router.Partition("alice", router.DefaultPartitions)
	other := "bob"
	for router.Partition(other, router.DefaultPartitions) == p {
		other += "x"
	}
	key := events.Keys{Prefix: prefix}.Stream(p)
	var top int64
	entries, err := rc.Do(ctxT(t), rc.B().Xrevrange().Key(key).End("+").Start("-").Count(1).Build()).AsXRange()
	if err != nil || len(entries) != 1 {
		t.Fatalf("stream %s: %v, %v", key, entries, err)
	}
	fmt.Sscanf(entries[0].ID, "%d-0", &top)
	uuid := "6b8f4a52-0cfa-4a0e-9a43-3d2b8d0f3c1"
	now := time.Now().UTC().Format(time.RFC3339Nano)
	forged := [][]string{
		{"event_id", uuid + "1", "user_id", "alice", "partition", fmt.Sprint(p), "entity", "config", "key", "auth/admins",
			"op", "upsert", "version", "99", "committed_at", now, "payload", `["alice"]`},
		{"event_id", uuid + "2", "user_id", other, "partition", fmt.Sprint(p), "entity", "user", "key", other,
			"op", "upsert", "version", "1", "committed_at", now, "payload", `{}`},
		{"event_id", "x", "version", "garbage"},
	}
	for i, fv := range forged {
		cmd := append([]string{"XADD", key, fmt.Sprintf("%d-%d", top, i+1)}, fv...)
		if err := rc.Do(ctxT(t), rc.B().Arbitrary(cmd...).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, "the forged entries to be dropped", func() bool { return ts.srv.droppedEntries.Load() == int64(len(forged)) })
	// The watch goes on: the next event it gets is a real one.
	if _, err := ts.data.SetConfig(ctxT(t), &pb.SetConfigRequest{Namespace: "ns", Key: "k", ValueJson: `1`}); err != nil {
		t.Fatal(err)
	}
	if e := w.next(t); e.GetEntity() != "config" || e.GetKey() != "ns/k" {
		t.Fatalf("the watch delivered %v, want the real config event", e)
	}
	putUser(t, ts, "alice", `{"n":2}`)
	if e := w.next(t); e.GetUserId() != "alice" || e.GetVersion() != 2 {
		t.Fatalf("the watch delivered %v, want alice's next write", e)
	}
	logMu.Lock()
	out := logs.String()
	logMu.Unlock()
	if n := strings.Count(out, "watch dropped stream entries"); n != 1 {
		t.Fatalf("%d WARN lines about dropped entries, want 1 (rate-limited):\n%s", n, out)
	}
	body := scrapeMetrics(t, ts)
	if !strings.Contains(body, "shardgate_watch_dropped_entries_total 3") {
		t.Fatalf("metrics lack the dropped entries:\n%s", body)
	}
}

// scrapeMetrics returns the server's metrics in the text format.
func scrapeMetrics(t testing.TB, ts *testServer) string {
	t.Helper()
	rec := httptest.NewRecorder()
	ts.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String()
}

// lockedWriter lets a test read a log the server writes from many
// goroutines.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func slogTo(mu *sync.Mutex, w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(lockedWriter{mu, w}, nil))
}
