package mover_test

import (
	"context"
	"fmt"
	"io"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/server"
)

// Helpers for tests that move one chosen partition: the planner moves
// about half of them, so these record a rebalance of a single move in the
// catalog, which the instances' executor runs like any other.

// usersIn returns n user IDs of partition p, each prefix followed by a
// number.
func usersIn(p int32, prefix string, n int) []string {
	var out []string
	for i := 0; len(out) < n; i++ {
		id := prefix + strconv.Itoa(i)
		if router.Partition(id, router.DefaultPartitions) == p {
			out = append(out, id)
		}
	}
	return out
}

// withCatalog runs fn on a catalog connection of the test's own.
func (h *harness) withCatalog(fn func(ctx context.Context, cat *catalog.Catalog) error) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cat, err := catalog.Open(ctx, h.catalogDSN)
	if err != nil {
		h.t.Fatal(err)
	}
	defer cat.Close()
	if err := fn(ctx, cat); err != nil {
		h.t.Fatal(err)
	}
}

// ownerOf returns the shard the catalog's map gives partition p.
func (h *harness) ownerOf(p int32) string {
	h.t.Helper()
	var owner string
	h.withCatalog(func(ctx context.Context, cat *catalog.Catalog) error {
		topo, err := cat.LoadTopology(ctx)
		owner = topo.Table.Owner(p)
		return err
	})
	return owner
}

// startMove records a rebalance that moves partition p from its owner to
// target within the freeze budget, and returns the source.
func (h *harness) startMove(p int32, target string, budget time.Duration) string {
	h.t.Helper()
	var source string
	h.withCatalog(func(ctx context.Context, cat *catalog.Catalog) error {
		topo, err := cat.LoadTopology(ctx)
		if err != nil {
			return err
		}
		source = topo.Table.Owner(p)
		if source == target {
			return fmt.Errorf("partition %d is on %s already", p, target)
		}
		_, err = cat.StartRebalance(ctx, topo.Version, 1, budget,
			[]catalog.MoveSpec{{Source: source, Target: target, Partitions: []int32{p}}})
		return err
	})
	return source
}

// other returns a registered shard other than name.
func (h *harness) other(name string) string {
	for _, n := range h.names {
		if n != name {
			return n
		}
	}
	h.t.Fatalf("no shard besides %s", name)
	return ""
}

// waitDone waits for the latest rebalance to end done and returns its
// only move.
func (h *harness) waitDone(within time.Duration) *pb.Move {
	h.t.Helper()
	r := h.waitRebalance(within)
	if r.GetState() != pb.RebalanceState_REBALANCE_STATE_DONE || len(r.GetMoves()) != 1 {
		h.t.Fatalf("rebalance ended %s:\n%s", r.GetState(), movesText(r))
	}
	return r.GetMoves()[0]
}

// waitMove polls the latest rebalance's only move until ok says yes.
func (h *harness) waitMove(within time.Duration, what string, ok func(*pb.Move) bool) *pb.Move {
	h.t.Helper()
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := h.instances[0].admin.GetRebalance(ctx, &pb.GetRebalanceRequest{})
		cancel()
		if err != nil {
			h.t.Fatal(err)
		}
		if ms := resp.GetRebalance().GetMoves(); len(ms) == 1 && ok(ms[0]) {
			return ms[0]
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("no %s after %s:\n%s", what, within, movesText(resp.GetRebalance()))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// actionClock is an executor's BeforeAction hook that notes when each
// action began, so a test can line its clients' calls up with the move's
// phases. delay, if set, says how long to stall before an action (the
// executor waits, as if the action were slow).
type actionClock struct {
	delay func(s mover.State, a mover.Action) time.Duration

	mu   sync.Mutex
	seen []actionAt
}

type actionAt struct {
	move int64
	s    mover.State
	a    mover.Action
	at   time.Time
}

func (c *actionClock) hook(ctx context.Context, move int64, s mover.State, a mover.Action) error {
	c.mu.Lock()
	c.seen = append(c.seen, actionAt{move, s, a, time.Now()})
	delay := c.delay
	c.mu.Unlock()
	if delay == nil {
		return nil
	}
	if d := delay(s, a); d > 0 {
		select {
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	return nil
}

// setDelay replaces the stall rule.
func (c *actionClock) setDelay(f func(s mover.State, a mover.Action) time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.delay = f
}

// window is a span of time on the test's clock.
type window struct{ from, to time.Time }

func (w window) overlaps(start time.Time, d time.Duration) bool {
	return start.Before(w.to) && start.Add(d).After(w.from)
}

func (w window) String() string { return w.to.Sub(w.from).Round(100 * time.Microsecond).String() }

// windows returns, for move, each span from an action (s, a) to the next
// action (s2, a2) after it: one per time the span was entered.
func (c *actionClock) windows(move int64, s mover.State, a mover.Action, s2 mover.State, a2 mover.Action) []window {
	c.mu.Lock()
	defer c.mu.Unlock()
	var (
		out  []window
		open *time.Time
	)
	for _, x := range c.seen {
		if x.move != move {
			continue
		}
		switch {
		case x.s == s && x.a == a:
			at := x.at
			open = &at
		case open != nil && x.s == s2 && x.a == a2:
			out = append(out, window{*open, x.at})
			open = nil
		}
	}
	return out
}

// first returns when move first began action a in state s.
func (c *actionClock) first(move int64, s mover.State, a mover.Action) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, x := range c.seen {
		if x.move == move && x.s == s && x.a == a {
			return x.at
		}
	}
	return time.Time{}
}

// count returns how many times move began action a in state s.
func (c *actionClock) count(move int64, s mover.State, a mover.Action) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, x := range c.seen {
		if x.move == move && x.s == s && x.a == a {
			n++
		}
	}
	return n
}

// wrongShardRetries reads an instance's count of calls retried after a
// "wrong shard" answer from its metrics.
func wrongShardRetries(t testing.TB, srv *server.Server) int64 {
	t.Helper()
	rec := httptest.NewRecorder()
	srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, "shardgate_wrong_shard_retries_total "); ok {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return int64(n)
		}
	}
	t.Fatal("no shardgate_wrong_shard_retries_total in the metrics")
	return 0
}
