package mover_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// workload is a steady mix of writes, reads and sessions across a set of
// users, with a Watch following them all. Each user has one writer, so
// the last acknowledged write of every key is known exactly.
type workload struct {
	t     *testing.T
	users []string

	mu       sync.Mutex
	acked    map[string]int64  // "user/<id>" or "item/<id>" → last acknowledged version
	values   map[string]string // the value written at that version
	tokens   map[string]string // user → a live session token
	events   map[string][]int64
	seenIDs  map[string]bool
	calls    atomic.Int64
	failed   atomic.Int64
	firstErr atomic.Value // error
}

func newWorkload(t *testing.T, users int) *workload {
	w := &workload{t: t, acked: map[string]int64{}, values: map[string]string{}, tokens: map[string]string{},
		events: map[string][]int64{}, seenIDs: map[string]bool{}}
	for i := range users {
		w.users = append(w.users, fmt.Sprintf("u%04d", i))
	}
	return w
}

// fail records a failed call; every call of the workload must succeed.
func (w *workload) fail(op string, err error) {
	w.failed.Add(1)
	w.firstErr.CompareAndSwap(nil, fmt.Errorf("%s: %w", op, err))
}

func (w *workload) ack(key string, version int64, value string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if version <= w.acked[key] {
		w.firstErr.CompareAndSwap(nil, fmt.Errorf("%s acknowledged at version %d after %d", key, version, w.acked[key]))
		w.failed.Add(1)
	}
	w.acked[key], w.values[key] = version, value
}

// watch follows every user of the workload until ctx ends, recording each
// event's version per key. ready is closed once the watch is open.
func (w *workload) watch(ctx context.Context, data pb.DataServiceClient, ready chan<- struct{}) {
	st, err := data.Watch(ctx, &pb.WatchRequest{UserIds: w.users})
	if err != nil {
		w.fail("watch", err)
		close(ready)
		return
	}
	first := true
	for {
		r, err := st.Recv()
		if first {
			close(ready)
			first = false
		}
		if err != nil {
			if ctx.Err() == nil {
				w.fail("watch recv", err)
			}
			return
		}
		e := r.GetEvent()
		if e == nil {
			continue
		}
		key := e.GetEntity() + "/" + e.GetUserId()
		if e.GetEntity() == "session" {
			continue // their keys are token hashes; users and items carry the checks
		}
		w.mu.Lock()
		if !w.seenIDs[e.GetEventId()] {
			w.seenIDs[e.GetEventId()] = true
			w.events[key] = append(w.events[key], e.GetVersion())
		}
		w.mu.Unlock()
	}
}

// write runs one writer over its users until ctx ends.
func (w *workload) write(ctx context.Context, data pb.DataServiceClient, mine []string) {
	for n := 1; ctx.Err() == nil; n++ {
		for _, u := range mine {
			if ctx.Err() != nil {
				return
			}
			cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			profile := fmt.Sprintf(`{"n": %d}`, n)
			w.calls.Add(1)
			r, err := data.PutUser(cctx, &pb.PutUserRequest{UserId: u, ProfileJson: profile})
			if err != nil {
				cancel()
				w.fail("put user "+u, err)
				continue
			}
			w.ack("user/"+u, r.GetVersion(), profile)
			value := fmt.Sprintf(`"v%d"`, n)
			w.calls.Add(1)
			ri, err := data.PutItem(cctx, &pb.PutItemRequest{UserId: u, Collection: "c", Key: "k", ValueJson: value})
			if err != nil {
				cancel()
				w.fail("put item "+u, err)
				continue
			}
			w.ack("item/"+u, ri.GetVersion(), value)
			if n%4 == 0 {
				w.calls.Add(1)
				s, err := data.CreateSession(cctx, &pb.CreateSessionRequest{UserId: u, DataJson: `{}`, TtlSeconds: 3600})
				if err != nil {
					w.fail("create session "+u, err)
				} else {
					w.mu.Lock()
					w.tokens[u] = s.GetToken()
					w.mu.Unlock()
				}
			}
			cancel()
		}
	}
}

// read runs reads of random users and sessions until ctx ends.
func (w *workload) read(ctx context.Context, data pb.DataServiceClient) {
	for ctx.Err() == nil {
		u := w.users[rand.N(len(w.users))]
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		w.calls.Add(1)
		if _, err := data.GetUser(cctx, &pb.GetUserRequest{UserId: u}); err != nil {
			w.fail("get user "+u, err)
		}
		w.mu.Lock()
		tok := w.tokens[u]
		w.mu.Unlock()
		if tok != "" {
			w.calls.Add(1)
			if _, err := data.GetSession(cctx, &pb.GetSessionRequest{Token: tok}); err != nil {
				w.fail("get session of "+u, err)
			}
		}
		cancel()
	}
}

// check verifies the end state: no call failed; every acknowledged write
// is there, once; the watch saw every acknowledged version, in order.
func (w *workload) check(h *harness, data pb.DataServiceClient) {
	t := w.t
	t.Helper()
	if n := w.failed.Load(); n > 0 {
		t.Fatalf("%d of %d client calls failed; first: %v", n, w.calls.Load(), w.firstErr.Load())
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, u := range w.users {
		usr, err := data.GetUser(ctx, &pb.GetUserRequest{UserId: u})
		if err != nil || usr.GetVersion() != w.acked["user/"+u] || usr.GetProfileJson() != w.values["user/"+u] {
			t.Fatalf("%s: got %v, %v; last acknowledged version %d, %s", u, usr, err, w.acked["user/"+u], w.values["user/"+u])
		}
		it, err := data.GetItem(ctx, &pb.GetItemRequest{UserId: u, Collection: "c", Key: "k"})
		if err != nil || it.GetItem().GetVersion() != w.acked["item/"+u] || it.GetItem().GetValueJson() != w.values["item/"+u] {
			t.Fatalf("%s's item: got %v, %v; last acknowledged version %d", u, it, err, w.acked["item/"+u])
		}
		if tok := w.tokens[u]; tok != "" {
			if _, err := data.GetSession(ctx, &pb.GetSessionRequest{Token: tok}); err != nil {
				t.Fatalf("%s's session: %v", u, err)
			}
		}
	}
	// Once: no user row on two shards.
	var total int64
	for _, name := range h.active() {
		total += h.query(name, `SELECT count(*) FROM users`)
	}
	if total != int64(len(w.users)) {
		t.Fatalf("%d user rows across the shards, %d users", total, len(w.users))
	}
	// The watch: every acknowledged version arrives, each key's in order.
	deadline := time.Now().Add(30 * time.Second)
	for {
		missing := ""
		w.mu.Lock()
		for key, v := range w.acked {
			evs := w.events[key]
			if len(evs) == 0 || evs[len(evs)-1] < v {
				missing = fmt.Sprintf("%s: watch saw %d events, up to %v; acknowledged %d", key, len(evs), evs[max(len(evs)-1, 0):], v)
				break
			}
		}
		w.mu.Unlock()
		if missing == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("events missing after 30 s: %s\n%s", missing, h.diagnose(missing[strings.Index(missing, "/")+1:strings.Index(missing, ":")]))
		}
		time.Sleep(100 * time.Millisecond)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for key, evs := range w.events {
		for i := 1; i < len(evs); i++ {
			if evs[i] != evs[i-1]+1 {
				t.Fatalf("%s: watch saw versions %d then %d: out of order or a gap", key, evs[i-1], evs[i])
			}
		}
	}
}

// active lists the registered shards still in the cluster.
func (h *harness) active() []string {
	var out []string
	for _, n := range h.names {
		if !h.removed[n] {
			out = append(out, n)
		}
	}
	return out
}

// The rebalancing issue's main check, on separate PostgreSQL servers: four
// shards under a steady mixed load (reads, writes, sessions, Watch) get a
// fifth, rebalance to completion, drain one and remove it. No client call
// fails, every acknowledged write is there exactly once, the watch sees
// every acknowledged change in order, the map is the placement of the
// shards, and no replication object is left anywhere.
func TestRebalanceUnderLoad(t *testing.T) {
	h := newHarness(t, harnessOptions{Instances: 2})
	w := newWorkload(t, 240)

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	// The watch outlives the load: it must still see the last writes.
	wctx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	var wg, watching sync.WaitGroup
	ready := make(chan struct{})
	watcher := h.instances[1]
	watching.Go(func() { w.watch(wctx, watcher.data, ready) })
	<-ready
	// Create every user before the load so that reads always find them.
	for _, u := range w.users {
		r, err := h.instances[0].data.PutUser(ctx, &pb.PutUserRequest{UserId: u, ProfileJson: `{"n": 0}`})
		if err != nil {
			t.Fatal(err)
		}
		w.ack("user/"+u, r.GetVersion(), `{"n": 0}`)
	}
	const writers = 6
	for i := range writers {
		var mine []string
		for j := i; j < len(w.users); j += writers {
			mine = append(mine, w.users[j])
		}
		in := h.instances[i%len(h.instances)]
		wg.Go(func() { w.write(ctx, in.data, mine) })
	}
	for i := range 2 {
		in := h.instances[i%len(h.instances)]
		wg.Go(func() { w.read(ctx, in.data) })
	}
	time.Sleep(time.Second)

	h.addShard("shard-4", 1)
	r := h.rebalance(&pb.StartRebalanceRequest{}, 3*time.Minute)
	t.Logf("added shard-4:\n%s", movesText(r))
	h.drain("shard-0")
	r = h.rebalance(&pb.StartRebalanceRequest{MaxParallel: 3}, 3*time.Minute)
	t.Logf("drained shard-0:\n%s", movesText(r))
	h.remove("shard-0")
	time.Sleep(500 * time.Millisecond)
	stop()
	wg.Wait()
	t.Logf("%d client calls, %d failed", w.calls.Load(), w.failed.Load())

	w.check(h, h.instances[0].data)
	stopWatch()
	watching.Wait()
	h.checkPlacement([]router.ShardWeight{{Name: "shard-1", Weight: 1}, {Name: "shard-2", Weight: 1}, {Name: "shard-3", Weight: 1}, {Name: "shard-4", Weight: 1}})
	h.checkNoReplication()
}

func (h *harness) drain(name string) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := h.instances[0].admin.DrainShard(ctx, &pb.DrainShardRequest{Name: name}); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) remove(name string) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := h.instances[0].admin.RemoveShard(ctx, &pb.RemoveShardRequest{Name: name}); err != nil {
		h.t.Fatal(err)
	}
	if h.removed == nil {
		h.removed = map[string]bool{}
	}
	h.removed[name] = true
}

// diagnose describes where a user's events are: each shard's outbox rows
// and the tail of the partition's stream.
func (h *harness) diagnose(user string) string {
	var b strings.Builder
	p := router.Partition(user, router.DefaultPartitions)
	fmt.Fprintf(&b, "user %s, partition %d\n", user, p)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, name := range h.names {
		conn := h.connect(ctx, name)
		rows, err := conn.Query(ctx, `SELECT tick, entity, version, event_id::text FROM outbox WHERE partition = $1 ORDER BY tick`, p)
		if err == nil {
			for rows.Next() {
				var (
					tick, v int64
					ent, id string
				)
				rows.Scan(&tick, &ent, &v, &id)
				fmt.Fprintf(&b, "  %s outbox: tick %d %s v%d %s\n", name, tick, ent, v, id)
			}
			rows.Close()
		}
		var own string
		conn.QueryRow(ctx, `SELECT coalesce((SELECT state FROM ownership WHERE partition = $1), '-') || ' clock ' ||
			coalesce((SELECT tick::text FROM outbox_clock WHERE partition = $1), '-')`, p).Scan(&own)
		fmt.Fprintf(&b, "  %s: %s\n", name, own)
		conn.Close(ctx)
	}
	rc, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{h.redisAddr}, DisableCache: true})
	if err == nil {
		defer rc.Close()
		key := fmt.Sprintf("%sevents:p:%d", h.prefix, p)
		entries, err := rc.Do(ctx, rc.B().Xrevrange().Key(key).End("+").Start("-").Count(6).Build()).AsXRange()
		for _, e := range entries {
			fmt.Fprintf(&b, "  stream %s: %s %s v%s %s\n", key, e.ID, e.FieldValues["entity"], e.FieldValues["version"], e.FieldValues["event_id"])
		}
		if err != nil {
			fmt.Fprintf(&b, "  stream %s: %v\n", key, err)
		}
	}
	return b.String()
}
