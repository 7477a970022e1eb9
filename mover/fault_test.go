package mover_test

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// The fault-injection checks of the rebalancing issue: a move survives its
// executor being killed before any of its actions, its source's or
// target's PostgreSQL restarting mid-copy and mid-cutover, and a cancel.
// Each run adds a third shard to a two-shard cluster under a light load of
// writes, reads and a watch, and ends consistent: the rebalance done (or
// cancelled), every acknowledged write there exactly once, the watch
// complete and in order, the map the placement of the shards, and no
// replication object, stray row or ownership row out of place anywhere.
//
// TestFaultKillExecutor runs one kill point per state by default (see
// representativeKills); SHARDGATE_FAULT_FULL=1 runs every action of every
// state.

// representativeKills are the kill points run by default: per state, the
// action before which a crash leaves the most to undo or resume.
var representativeKills = []string{
	"copying:subscribe",         // publication, slot and copied rows exist; no subscription yet
	"catching_up:unfreeze#2",    // the verification's freeze is left standing
	"verified:await-catch-up",   // verified, streaming
	"frozen:flip",               // source moved, target owned, the catalog not flipped: only forward
	"cut_over:delete-source",    // replication gone, the source's copy not deleted
	"rolling_back:clear-target", // a cancel's rollback: replication gone, the target's copy not deleted
}

// faultRun is one fault test's cluster and load. Instance 0 serves the
// load and the admin calls and runs no executor; the instances after it
// run executors, each with its script.
type faultRun struct {
	t      *testing.T
	h      *harness
	load   *load
	owner0 map[string]string // user → the shard that owned its partition before the rebalance
}

// faultServers starts the three PostgreSQL servers that a fault test's
// runs put their shards on, one each, so that a run can stop one.
func faultServers(t *testing.T) []*testenv.PGCluster {
	t.Helper()
	servers := make([]*testenv.PGCluster, len(allShards))
	for i := range servers {
		servers[i] = testenv.NewPGCluster(t)
		conn, err := pgx.Connect(context.Background(), servers[i].DSN("postgres"))
		if err != nil {
			t.Fatal(err)
		}
		// PostgreSQL 15 starts a subscription's apply worker at most
		// once per this interval (default 5 s) per server: a target's
		// second move would wait for it.
		_, err = conn.Exec(context.Background(), `ALTER SYSTEM SET wal_retrieve_retry_interval = '200ms'`)
		if err == nil {
			_, err = conn.Exec(context.Background(), `SELECT pg_reload_conf()`)
		}
		conn.Close(context.Background())
		if err != nil {
			t.Fatal(err)
		}
	}
	return servers
}

// startFaultRun builds a fault test's cluster on servers (faultServers):
// shard-0 and shard-1 serving a load, and shard-2 added empty, each on a
// server of its own. Each script gets an instance whose executor runs it
// (nil: an executor left alone); the first script's executor leads.
func startFaultRun(t *testing.T, servers []*testenv.PGCluster, scripts ...*script) *faultRun {
	t.Helper()
	h := newHarness(t, harnessOptions{Shards: 2, NoMover: true, Servers: servers})
	for i, sc := range scripts {
		var o harnessOptions
		if sc != nil {
			o.Mover.BeforeAction = sc.hook
		}
		h.startInstance(o)
		if i == 0 {
			h.waitHolder(fmt.Sprintf("instance-%d", len(h.instances)-1))
		}
	}
	h.addShard("shard-2", 1)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cat, err := catalog.Open(ctx, h.catalogDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	topo, err := cat.LoadTopology(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w := newWorkload(t, 40)
	f := &faultRun{t: t, h: h, owner0: map[string]string{}}
	for _, u := range w.users {
		f.owner0[u] = topo.Table.Owner(router.Partition(u, topo.Table.PartitionCount()))
	}
	first, last := h.instances[0], h.instances[len(h.instances)-1]
	f.load = startLoad(w, first.data, last.data, []pb.DataServiceClient{first.data, last.data})
	time.Sleep(300 * time.Millisecond)
	return f
}

// waitHolder waits until holder has taken the executor lock.
func (h *harness) waitHolder(holder string) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, h.catalogDSN)
	if err != nil {
		h.t.Fatal(err)
	}
	defer conn.Close(context.Background())
	for {
		var got string
		if err := conn.QueryRow(ctx, `SELECT holder FROM mover_term`).Scan(&got); err != nil {
			h.t.Fatalf("waiting for %s to lead: %v", holder, err)
		}
		if got == holder {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startRebalance starts a rebalance (maxParallel 0: the default) and
// returns how many moves it plans. The freeze budget is the largest: on a
// busy test machine a cutover may miss a small one again and again, and
// each miss backs off; the faults here are not about the budget.
func (f *faultRun) startRebalance(maxParallel int32) int {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resp, err := f.h.instances[0].admin.StartRebalance(ctx, &pb.StartRebalanceRequest{
		MaxParallel: maxParallel, FreezeBudgetMs: int32(mover.MaxFreezeBudget.Milliseconds()),
	})
	if err != nil {
		f.t.Fatal(err)
	}
	n := len(resp.GetPlan().GetMoves())
	if n == 0 {
		f.t.Fatal("the rebalance plans no move")
	}
	return n
}

func (f *faultRun) cancelRebalance() {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := f.h.instances[0].admin.CancelRebalance(ctx, &pb.CancelRebalanceRequest{}); err != nil {
		f.t.Fatal(err)
	}
}

// rebalance returns the latest rebalance.
func (f *faultRun) rebalance() *pb.Rebalance {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := f.h.instances[0].admin.GetRebalance(ctx, &pb.GetRebalanceRequest{})
	if err != nil {
		f.t.Fatal(err)
	}
	return resp.GetRebalance()
}

// await waits for ready to answer true, failing the test if the rebalance
// ends first or two minutes pass.
func (f *faultRun) await(what string, ready func() bool) {
	f.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !ready() {
		if r := f.rebalance(); r.GetState() != pb.RebalanceState_REBALANCE_STATE_RUNNING {
			f.t.Fatalf("the rebalance ended %s before %s:\n%s", r.GetState(), what, movesText(r))
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("no %s within 2 minutes:\n%s", what, movesText(f.rebalance()))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// awaitKill waits until sc's kill fired.
func (f *faultRun) awaitKill(sc *script) {
	f.t.Helper()
	f.await("kill at "+sc.kill.String(), func() bool {
		select {
		case <-sc.killed:
			return true
		default:
			return false
		}
	})
}

// awaitHeld waits until n moves are held at g and returns their IDs.
func (f *faultRun) awaitHeld(g *gate, n int) []int64 {
	f.t.Helper()
	f.await(fmt.Sprintf("%d moves at %s", n, g.p), func() bool { return len(g.moves()) >= n })
	return g.moves()
}

// move returns the move id of the latest rebalance.
func (f *faultRun) move(id int64) *pb.Move {
	f.t.Helper()
	for _, m := range f.rebalance().GetMoves() {
		if m.GetId() == id {
			return m
		}
	}
	f.t.Fatalf("no move %d", id)
	return nil
}

// finish waits for the rebalance to end in want, stops the load and checks
// the end state: every move ended in moveState; the workload's check
// (failed calls excused by excused; nil excuses none); the placement of
// the shards named placed, and no partition on the others; no replication
// object on any server; no row or ownership row a shard should not have.
// It returns when the last excused call failed (zero if none did).
func (f *faultRun) finish(want pb.RebalanceState, moveState mover.State, placed []string, excused func(callFailure) bool) time.Time {
	t, h := f.t, f.h
	t.Helper()
	r := h.waitRebalance(3 * time.Minute)
	if r.GetState() != want {
		t.Fatalf("rebalance ended %s, want %s:\n%s", r.GetState(), want, movesText(r))
	}
	for _, m := range r.GetMoves() {
		if m.GetState() != string(moveState) {
			t.Fatalf("move %d ended %s, want %s:\n%s", m.GetId(), m.GetState(), moveState, movesText(r))
		}
	}
	t.Logf("rebalance %s:\n%s", r.GetState(), movesText(r))
	time.Sleep(300 * time.Millisecond) // some writes on the final owners
	f.load.stop()
	lastFailure := f.load.checkFailures(excused)
	f.load.w.check(h, h.instances[0].data)
	f.load.finish()
	var ws []router.ShardWeight
	for _, name := range placed {
		ws = append(ws, router.ShardWeight{Name: name, Weight: 1})
	}
	h.checkPlacement(ws)
	h.waitNoReplication(15 * time.Second)
	h.checkNoStrayRows()
	return lastFailure
}

// waitNoReplication waits until no server keeps a publication,
// subscription or replication slot (the executor's reaper may still be on
// its way), and fails the test naming them if within passes.
func (h *harness) waitNoReplication(within time.Duration) {
	h.t.Helper()
	deadline := time.Now().Add(within)
	for {
		left := h.replicationObjects()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("replication objects left after %s: %s", within, strings.Join(left, ", "))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// replicationObjects lists the publications, subscriptions and replication
// slots of the shards' databases, as "shard: kind name". (Servers may be
// shared with other runs: their databases are not this run's business.)
func (h *harness) replicationObjects() []string {
	h.t.Helper()
	var out []string
	for _, name := range h.names {
		out = append(out, h.replicationObjectsOn(name)...)
	}
	return out
}

// replicationObjectsOn lists one shard's database's replication objects.
func (h *harness) replicationObjectsOn(name string) []string {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn := h.connect(ctx, name)
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `
		SELECT $1 || ': publication ' || pubname FROM pg_publication
		UNION ALL SELECT $1 || ': subscription ' || subname FROM pg_subscription
		    WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
		UNION ALL SELECT $1 || ': slot ' || slot_name FROM pg_replication_slots WHERE database = current_database()
		ORDER BY 1`, name)
	if err != nil {
		h.t.Fatalf("%s: %v", name, err)
	}
	objs, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		h.t.Fatalf("%s: %v", name, err)
	}
	return objs
}

// movedTables hold a partition's rows (shards.moveTables).
var movedTables = []string{"outbox_clock", "outbox_delivered", "users", "sessions", "items", "user_tombstones", "item_tombstones", "outbox"}

// checkNoStrayRows fails the test if a shard holds rows of a partition it
// does not own, an ownership row in another state than owned, or a move's
// marker.
func (h *harness) checkNoStrayRows() {
	h.t.Helper()
	for _, name := range h.names {
		for _, table := range movedTables {
			if n := h.query(name, `SELECT count(*) FROM `+table+`
				WHERE partition NOT IN (SELECT partition FROM ownership WHERE state = 'owned')`); n != 0 {
				h.t.Fatalf("%s holds %d rows of %s in partitions it does not own", name, n, table)
			}
		}
		if n := h.query(name, `SELECT count(*) FROM ownership WHERE state <> 'owned'`); n != 0 {
			h.t.Fatalf("%s lists %d partitions in another state than owned", name, n)
		}
		if n := h.query(name, `SELECT count(*) FROM move_markers`); n != 0 {
			h.t.Fatalf("%s keeps %d move markers", name, n)
		}
	}
}

var allShards = []string{"shard-0", "shard-1", "shard-2"}

// The executor is killed right before one action of a move (its hook
// fails, ending its term with nothing recorded, and then its instance
// stops); another instance's executor takes over and finishes. For the
// actions of a rollback the rebalance is cancelled mid-copy first and ends
// cancelled.
func TestFaultKillExecutor(t *testing.T) {
	all := append(normalPoints(), rollbackPoints()...)
	run := all
	if os.Getenv("SHARDGATE_FAULT_FULL") == "" {
		run = nil
		for _, name := range representativeKills {
			p, ok := findPoint(all, name)
			if !ok {
				t.Fatalf("no action %s in the machine: update representativeKills", name)
			}
			run = append(run, p)
		}
	}
	servers := faultServers(t)
	for _, p := range run {
		t.Run(p.String(), func(t *testing.T) { killAt(t, servers, p) })
	}
}

func killAt(t *testing.T, servers []*testenv.PGCluster, p point) {
	cancel := p.State == mover.RollingBack
	var g *gate
	if cancel {
		g = newGate(mustPoint(t, "copying:subscribe"), math.MaxInt)
	}
	a := newScript(g, &p)
	f := startFaultRun(t, servers, a, nil)
	victim := f.h.instances[1]
	n := f.startRebalance(0)
	if cancel {
		f.awaitHeld(g, min(n, mover.DefaultMaxParallel)) // the others wait their turn, planned
		f.cancelRebalance()
		close(g.open)
	}
	f.awaitKill(a)
	victim.stop()
	if cancel {
		f.finish(pb.RebalanceState_REBALANCE_STATE_CANCELLED, mover.Cancelled, []string{"shard-0", "shard-1"}, nil)
		return
	}
	f.finish(pb.RebalanceState_REBALANCE_STATE_DONE, mover.CleanedUp, allShards, nil)
}

func mustPoint(t *testing.T, name string) point {
	t.Helper()
	p, ok := findPoint(append(normalPoints(), rollbackPoints()...), name)
	if !ok {
		t.Fatalf("no action %s in the machine", name)
	}
	return p
}

// A shard's PostgreSQL server crashes (immediate stop) while the executor
// is held before an action of the first move; the executor goes on while
// the server is down for a moment, then it comes back. The move finishes
// with nothing lost and nothing left behind. Only calls for the users of
// a restarted source may fail, and only during its outage and shortly
// after (the executor's retry backoff): a target's outage before the
// cutover must cost clients nothing.
func TestFaultRestartPostgres(t *testing.T) {
	const (
		down  = 1500 * time.Millisecond // how long the server stays down once the executor goes on
		grace = 10 * time.Second        // failures excused after the restart
	)
	cases := []struct {
		name   string
		at     string
		source bool // restart the source's server, else the target's
	}{
		{"source mid-copy", "copying:subscribe", true},
		{"target mid-copy", "copying:subscribe", false},
		{"source mid-cutover", "frozen:mark-moved", true},
		{"target mid-cutover", "frozen:marker", false},
		// The target drops its subscription while the source is down: the
		// slot stays on the source and must go once it is back.
		{"source mid-cleanup", "cut_over:drop-subscription", true},
	}
	servers := faultServers(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			g := newGate(mustPoint(t, c.at), 1)
			f := startFaultRun(t, servers, newScript(g, nil))
			f.startRebalance(1) // one move at a time: the target owns nothing before the first cutover
			m := f.move(f.awaitHeld(g, 1)[0])
			name := m.GetTarget()
			if c.source {
				name = m.GetSource()
			}
			pg := f.h.pg[name]
			downAt := time.Now()
			pg.Stop()
			up := false
			t.Cleanup(func() { // the next runs share the server
				if !up {
					pg.Start()
				}
			})
			close(g.open)
			time.Sleep(down)
			pg.Start()
			up = true
			upAt := time.Now()
			t.Logf("%s was down %s", name, upAt.Sub(downAt).Round(time.Millisecond))
			last := f.finish(pb.RebalanceState_REBALANCE_STATE_DONE, mover.CleanedUp, allShards, func(c callFailure) bool {
				return f.owner0[c.user] == name && c.at.After(downAt) && c.at.Before(upAt.Add(grace))
			})
			if !last.IsZero() {
				t.Logf("the last failed call for %s's users came %s after it went down", name, last.Sub(downAt).Round(time.Millisecond))
			}
		})
	}
}

// CancelRebalance mid-copy and mid-catch-up rolls every move back: the
// sources still own their partitions, the target holds nothing, no
// replication object is left, and the rebalance ends cancelled.
func TestFaultCancel(t *testing.T) {
	servers := faultServers(t)
	for _, at := range []string{"copying:copy", "catching_up:await-catch-up"} {
		t.Run(at, func(t *testing.T) {
			g := newGate(mustPoint(t, at), math.MaxInt)
			f := startFaultRun(t, servers, newScript(g, nil))
			n := f.startRebalance(0)
			f.awaitHeld(g, min(n, mover.DefaultMaxParallel)) // the others wait their turn, planned
			f.cancelRebalance()
			close(g.open)
			f.finish(pb.RebalanceState_REBALANCE_STATE_CANCELLED, mover.Cancelled, []string{"shard-0", "shard-1"}, nil)
			if n := f.h.query("shard-2", `SELECT count(*) FROM ownership`); n != 0 {
				t.Fatalf("shard-2 lists %d partitions after the cancel", n)
			}
		})
	}
}

// The reaper drops the replication objects of moves that are not active
// (here: a publication and a slot on shard-0, and a subscription on
// shard-1 following them, of a move the catalog does not know) within its
// ReapInterval, and leaves those of other clusters sharing the servers
// alone. What it cannot reach it counts in shardgate_mover_debris and
// logs, until it can.
func TestFaultReaper(t *testing.T) {
	const reapInterval = 2 * time.Second
	h := newHarness(t, harnessOptions{Shards: 2, NoMover: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cat, err := catalog.Open(ctx, h.catalogDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	shape, err := cat.Shape(ctx)
	if err != nil {
		t.Fatal(err)
	}

	logs := &testenv.LogBuffer{}
	e := mover.NewExecutor(cat, mover.ExecutorOptions{
		CatalogDSN: h.catalogDSN, Holder: "reaper-test", Interval: 200 * time.Millisecond, ReapInterval: reapInterval,
		Logger: slog.New(slog.NewTextHandler(logs, nil)),
	})
	reg := prometheus.NewRegistry()
	reg.MustRegister(e.Collectors()...)
	ectx, stopExec := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); e.Run(ectx) }()
	defer func() { stopExec(); <-done }()
	for !e.Leading() {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // past the first pass, which a new leader makes at once

	stale := shards.MoveObjectName(shape.SlotPrefix, 424242)
	foreign := shards.MoveObjectName(shape.SlotPrefix+"x", 7) // another cluster's
	conninfo, err := shards.Conninfo(h.dsn["shard-0"])
	if err != nil {
		t.Fatal(err)
	}
	ident := func(name string) string { return pgx.Identifier{name}.Sanitize() }
	h.exec("shard-0", `CREATE PUBLICATION `+ident(stale)+` FOR TABLE users`)
	h.exec("shard-0", `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, stale)
	h.exec("shard-0", `CREATE PUBLICATION `+ident(foreign)+` FOR TABLE users`)
	h.exec("shard-0", `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, foreign)
	var sub string
	h.queryRow("shard-1", &sub, `SELECT format('CREATE SUBSCRIPTION %I CONNECTION %L PUBLICATION %I
		WITH (create_slot = false, slot_name = %L, copy_data = false)', $1::text, $2::text, $1::text, $1::text)`, stale, conninfo)
	h.exec("shard-1", sub)
	created := time.Now()
	// shard-1's server goes down: the reaper cannot reach the subscription.
	h.pg["shard-1"].Stop()

	want := []string{"shard-0: publication " + foreign, "shard-0: slot " + foreign}
	deadline := created.Add(reapInterval + 3*time.Second)
	for {
		left := h.replicationObjectsOn("shard-0")
		if slices.Equal(left, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s after the reaper's interval, shard-0 keeps %v; want only %v", time.Since(created), left, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("the reaper dropped shard-0's debris %s after it was made", time.Since(created).Round(time.Millisecond))
	for debris(t, reg) < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("the reaper cannot reach shard-1, yet shardgate_mover_debris is %v", debris(t, reg))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "shard=shard-1") {
		t.Fatalf("nothing logged about shard-1:\n%s", logs.String())
	}

	h.pg["shard-1"].Start()
	restarted := time.Now()
	deadline = restarted.Add(reapInterval + 3*time.Second)
	for len(h.replicationObjectsOn("shard-1")) > 0 || debris(t, reg) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("shard-1 is back, yet it keeps %v and shardgate_mover_debris is %v", h.replicationObjectsOn("shard-1"), debris(t, reg))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("the reaper dropped shard-1's subscription %s after its server came back", time.Since(restarted).Round(time.Millisecond))

	// The other cluster's objects are still there; they are the test's to drop.
	h.exec("shard-0", `DROP PUBLICATION `+ident(foreign))
	h.exec("shard-0", `SELECT pg_drop_replication_slot($1)`, foreign)
	h.checkNoReplication()
}

// debris reads the shardgate_mover_debris gauge.
func debris(t *testing.T, reg *prometheus.Registry) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "shardgate_mover_debris" {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatal("no shardgate_mover_debris metric")
	return 0
}

// exec runs a statement on a shard.
func (h *harness) exec(name, sql string, args ...any) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn := h.connect(ctx, name)
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		h.t.Fatalf("%s: %s: %v", name, sql, err)
	}
}

// queryRow scans a one-row query's value on a shard into dst.
func (h *harness) queryRow(name string, dst any, sql string, args ...any) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn := h.connect(ctx, name)
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, sql, args...).Scan(dst); err != nil {
		h.t.Fatalf("%s: %s: %v", name, sql, err)
	}
}
