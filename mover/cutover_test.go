package mover_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// acks keeps, per key, the highest version acknowledged to a client, and
// the value written at it.
type acks struct {
	mu     sync.Mutex
	v      map[string]int64
	values map[string]string
}

func newAcks() *acks { return &acks{v: map[string]int64{}, values: map[string]string{}} }

func (a *acks) ack(key string, v int64, value string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if v > a.v[key] {
		a.v[key], a.values[key] = v, value
	}
}

func (a *acks) get(key string) (int64, string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.v[key], a.values[key]
}

// failures records the first few failed client calls.
type failures struct {
	n     atomic.Int64
	mu    sync.Mutex
	first []string
}

func (f *failures) add(format string, args ...any) {
	if f.n.Add(1) <= 5 {
		f.mu.Lock()
		f.first = append(f.first, fmt.Sprintf(format, args...))
		f.mu.Unlock()
	}
}

func (f *failures) check(t *testing.T, calls int64) {
	t.Helper()
	if n := f.n.Load(); n > 0 {
		f.mu.Lock()
		defer f.mu.Unlock()
		t.Fatalf("%d of %d client calls failed; first:\n%s", n, calls, strings.Join(f.first, "\n"))
	}
}

// A router whose map is stale (its topology watcher does not run) keeps
// writing to a partition while it moves: the source's ownership state
// fences each write that reaches it after the freeze, the router reloads
// the map and retries on the new owner, and the caller sees only success.
// Afterwards every acknowledged write is on the target. A second stale
// router, idle during the move, writes once after it: its write goes to the
// source, which no longer lists the partition, and lands on the target.
func TestStaleRouterWritesThroughCutover(t *testing.T) {
	clock := &actionClock{}
	h := newHarness(t, harnessOptions{Shards: 2, Mover: mover.ExecutorOptions{BeforeAction: clock.hook}})
	stale := h.startInstance(harnessOptions{StaleMap: true})
	idle := h.startInstance(harnessOptions{StaleMap: true})

	p := router.Partition("stale-router", router.DefaultPartitions)
	users := usersIn(p, "stale-", 8)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	for _, u := range users {
		if _, err := stale.data.PutUser(ctx, &pb.PutUserRequest{UserId: u, ProfileJson: `{"n": 0}`}); err != nil {
			t.Fatal(err)
		}
	}
	staleVersion := stale.srv.Router().Table().Version()
	idleVersion := idle.srv.Router().Table().Version()

	acked := newAcks()
	var (
		fails failures
		calls atomic.Int64
		last  sync.Map // user → when its last write was acknowledged
		wg    sync.WaitGroup
	)
	for i := range 4 {
		mine := users[2*i : 2*i+2]
		wg.Go(func() {
			for n := 1; ctx.Err() == nil; n++ {
				u := mine[n%len(mine)]
				value := fmt.Sprintf(`{"n": %d}`, n)
				cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				calls.Add(1)
				r, err := stale.data.PutItem(cctx, &pb.PutItemRequest{UserId: u, Collection: "c", Key: "k", ValueJson: value})
				cancel()
				if err != nil {
					fails.add("put item of %s: %v", u, err)
					continue
				}
				acked.ack("item/"+u, r.GetVersion(), value)
				last.Store(u, time.Now())
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	source := h.ownerOf(p)
	target := h.other(source)
	h.startMove(p, target, mover.DefaultFreezeBudget)
	m := h.waitDone(time.Minute)
	time.Sleep(300 * time.Millisecond) // and some writes after the move
	stop()
	wg.Wait()
	fails.check(t, calls.Load())

	cutovers := clock.windows(m.GetId(), mover.Frozen, mover.Freeze, mover.CutOver, mover.DropSubscription)
	if len(cutovers) != 1 {
		t.Fatalf("%d cutovers", len(cutovers))
	}
	after := 0
	last.Range(func(_, v any) bool {
		if v.(time.Time).After(cutovers[0].to) {
			after++
		}
		return true
	})
	if after != len(users) {
		t.Fatalf("only %d of %d users were written after the cutover", after, len(users))
	}
	if retries := wrongShardRetries(t, stale.srv); retries == 0 {
		t.Fatal("the stale router was never fenced: no write hit the frozen or moved source")
	}
	if v := stale.srv.Router().Table().Version(); v <= staleVersion {
		t.Fatalf("the stale router's map is still at version %d", v)
	}
	t.Logf("%d writes by a stale router, %d retried after a wrong-shard answer; freeze %.1f ms",
		calls.Load(), wrongShardRetries(t, stale.srv), m.GetLastFreezeMs())

	// The idle stale router still holds the map from before the move.
	if v := idle.srv.Router().Table().Version(); v != idleVersion {
		t.Fatalf("the idle router's map moved from version %d to %d by itself", idleVersion, v)
	}
	r, err := idle.data.PutItem(context.Background(), &pb.PutItemRequest{UserId: users[0], Collection: "c", Key: "k", ValueJson: `"late"`})
	if err != nil {
		t.Fatalf("write through a router whose map predates the move: %v", err)
	}
	acked.ack("item/"+users[0], r.GetVersion(), `"late"`)
	if n := wrongShardRetries(t, idle.srv); n != 1 {
		t.Fatalf("the idle router retried %d times, want 1 (the source answered wrong shard)", n)
	}

	// Every acknowledged write is on the target, and nothing of the
	// partition is left on the source.
	for _, u := range users {
		want, value := acked.get("item/" + u)
		got := h.query(target, `SELECT coalesce((SELECT version FROM items WHERE partition = $1 AND user_id = $2 AND collection = 'c' AND key = 'k'), 0)`, p, u)
		if got != want {
			t.Fatalf("%s's item is at version %d on %s; acknowledged %d", u, got, target, want)
		}
		same := h.query(target, `SELECT count(*) FROM items WHERE partition = $1 AND user_id = $2 AND value = $3::jsonb`, p, u, value)
		if same != 1 {
			t.Fatalf("%s's item on %s does not hold the acknowledged value %s", u, target, value)
		}
	}
	if n := h.query(source, `SELECT (SELECT count(*) FROM items WHERE partition = $1) + (SELECT count(*) FROM users WHERE partition = $1)
		+ (SELECT count(*) FROM ownership WHERE partition = $1)`, p); n != 0 {
		t.Fatalf("the source keeps %d rows of partition %d", n, p)
	}
	h.checkNoReplication()
}

// Reads of a moving partition (GetUser, GetSession) never fail and never
// return a version older than one already acknowledged to a writer, across:
// a rebalance whose freeze budget (1 ms) the catch-up can never meet, which
// is cancelled; cutovers whose marker misses the budget, so the freeze is
// undone and tried again; and the cutover that succeeds.
func TestReadsThroughCutover(t *testing.T) {
	const (
		budget       = mover.DefaultFreezeBudget
		lateCutovers = 2 // cutovers made to miss their budget
	)
	var late atomic.Int32
	clock := &actionClock{}
	clock.setDelay(func(s mover.State, a mover.Action) time.Duration {
		// Stall before the cutover's marker until the budget is spent, so
		// the marker is late and the freeze is undone.
		if s == mover.Frozen && a == mover.Marker && late.Add(1) <= lateCutovers {
			return budget
		}
		return 0
	})
	h := newHarness(t, harnessOptions{Shards: 2, Instances: 2, Mover: mover.ExecutorOptions{
		BeforeAction: clock.hook, CatchUpTimeout: time.Second,
	}})

	p := router.Partition("reads-through-cutover", router.DefaultPartitions)
	users := usersIn(p, "reader-", 6)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	acked := newAcks()
	tokens := map[string]string{}
	for _, u := range users {
		r, err := h.instances[0].data.PutUser(ctx, &pb.PutUserRequest{UserId: u, ProfileJson: `{"n": 0}`})
		if err != nil {
			t.Fatal(err)
		}
		acked.ack("user/"+u, r.GetVersion(), "")
		s, err := h.instances[0].data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: u, DataJson: `{}`, TtlSeconds: 3600})
		if err != nil {
			t.Fatal(err)
		}
		tokens[u] = s.GetToken()
		acked.ack("session/"+u, 1, "")
	}

	var (
		fails        failures
		writes, read atomic.Int64
		wg           sync.WaitGroup
		readsAt      latencies // every read, for the windows below
	)
	// One writer per user: its profile and its session's expiry.
	for _, u := range users {
		in := h.instances[len(u)%2]
		wg.Go(func() {
			for n := 1; ctx.Err() == nil; n++ {
				cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				writes.Add(2)
				if r, err := in.data.PutUser(cctx, &pb.PutUserRequest{UserId: u, ProfileJson: fmt.Sprintf(`{"n": %d}`, n)}); err != nil {
					fails.add("put user %s: %v", u, err)
				} else {
					acked.ack("user/"+u, r.GetVersion(), "")
				}
				if r, err := in.data.TouchSession(cctx, &pb.TouchSessionRequest{Token: tokens[u], TtlSeconds: 3600}); err != nil {
					fails.add("touch session of %s: %v", u, err)
				} else {
					acked.ack("session/"+u, r.GetVersion(), "")
				}
				cancel()
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
	// Readers on both instances: each read must return at least the
	// version acknowledged before it began, and never less than the
	// reader saw before.
	for i := range 4 {
		in := h.instances[i%2]
		wg.Go(func() {
			seen := map[string]int64{}
			check := func(key string, floor, got int64) {
				if got < floor || got < seen[key] {
					fails.add("%s read at version %d; acknowledged %d before the read, this reader saw %d", key, got, floor, seen[key])
				}
				seen[key] = max(seen[key], got)
			}
			for n := i; ctx.Err() == nil; n++ {
				u := users[n%len(users)]
				cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				floor, _ := acked.get("user/" + u)
				start := time.Now()
				r, err := in.data.GetUser(cctx, &pb.GetUserRequest{UserId: u})
				readsAt.add(start, time.Since(start), err)
				read.Add(1)
				if err != nil {
					fails.add("get user %s: %v", u, err)
				} else {
					check("user/"+u, floor, r.GetVersion())
				}
				floor, _ = acked.get("session/" + u)
				start = time.Now()
				s, err := in.data.GetSession(cctx, &pb.GetSessionRequest{Token: tokens[u]})
				readsAt.add(start, time.Since(start), err)
				read.Add(1)
				if err != nil {
					fails.add("get session of %s: %v", u, err)
				} else {
					check("session/"+u, floor, s.GetVersion())
				}
				cancel()
			}
		})
	}
	time.Sleep(300 * time.Millisecond)

	// A budget too small for a freeze: the move copies, then its freezes
	// keep missing the budget and are undone (the source stays owner), until
	// the rebalance is cancelled.
	source := h.ownerOf(p)
	target := h.other(source)
	h.startMove(p, target, time.Millisecond)
	tiny := h.waitMove(30*time.Second, "second freeze missing a 1 ms budget", func(m *pb.Move) bool {
		tries := clock.count(m.GetId(), mover.CatchingUp, mover.Freeze) + clock.count(m.GetId(), mover.Frozen, mover.Freeze)
		return tries >= 2 && strings.Contains(m.GetLastError(), "freeze budget")
	})
	if _, err := h.instances[0].admin.CancelRebalance(ctx, &pb.CancelRebalanceRequest{}); err != nil {
		t.Fatal(err)
	}
	if r := h.waitRebalance(30 * time.Second); r.GetState() != pb.RebalanceState_REBALANCE_STATE_CANCELLED {
		t.Fatalf("cancelled rebalance ended %s:\n%s", r.GetState(), movesText(r))
	}
	if owner := h.ownerOf(p); owner != source {
		t.Fatalf("a cancelled move left partition %d on %s", p, owner)
	}
	t.Logf("1 ms budget: %d freezes tried, then cancelled; last error %q",
		clock.count(tiny.GetId(), mover.CatchingUp, mover.Freeze)+clock.count(tiny.GetId(), mover.Frozen, mover.Freeze), tiny.GetLastError())

	// A normal budget, but the first cutovers miss it.
	h.startMove(p, target, budget)
	m := h.waitDone(time.Minute)
	time.Sleep(200 * time.Millisecond)
	stop()
	wg.Wait()
	fails.check(t, writes.Load()+read.Load())

	// The partition was frozen from each cutover's Marker action for at
	// least the stall (the late ones), or until the flip (the last).
	var frozen []window
	for _, w := range clock.windows(m.GetId(), mover.Frozen, mover.Marker, mover.Verified, mover.AwaitCatchUp) {
		frozen = append(frozen, window{w.from, w.from.Add(budget)})
	}
	frozen = append(frozen, clock.windows(m.GetId(), mover.Frozen, mover.Marker, mover.CutOver, mover.DropSubscription)...)
	if len(frozen) != lateCutovers+1 || m.GetFreezes() != 1 {
		t.Fatalf("%d cutover freezes, %d recorded on the move; want %d undone, then 1 that flipped", len(frozen), m.GetFreezes(), lateCutovers)
	}
	for i, w := range frozen {
		if len(readsAt.overlapping(w)) == 0 {
			t.Fatalf("no read ran during cutover freeze %d (%s)", i, w)
		}
	}
	if owner := h.ownerOf(p); owner != target {
		t.Fatalf("partition %d is on %s after its move to %s", p, owner, target)
	}
	t.Logf("%d reads and %d writes, none failed; %d cutover freezes, the last %.1f ms", read.Load(), writes.Load(), len(frozen), m.GetLastFreezeMs())
	h.checkNoReplication()
}
