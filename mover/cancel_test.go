package mover_test

import (
	"context"
	"testing"
	"time"

	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// A move whose target applies the stream too slowly for the freeze budget
// keeps waiting to catch up; a cancel stops it there and rolls it back,
// rather than waiting for the lag to fall.
func TestCancelWhileCatchingUp(t *testing.T) {
	clock := &actionClock{}
	h := newHarness(t, harnessOptions{Shards: 2, Mover: mover.ExecutorOptions{BeforeAction: clock.hook}})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p := router.Partition("cancel-catching-up", router.DefaultPartitions)
	user := usersIn(p, "cancel-", 1)[0]
	if _, err := h.instances[0].data.PutUser(ctx, &pb.PutUserRequest{UserId: user, ProfileJson: `{}`}); err != nil {
		t.Fatal(err)
	}
	source := h.ownerOf(p)
	target := h.other(source)

	// Every marker takes the target's apply 150 ms, three times the
	// catch-up's goal (half the 100 ms budget), and well within the wait
	// for one marker: the lag never falls below the goal.
	conn := h.connect(ctx, target)
	defer conn.Close(ctx)
	for _, sql := range []string{
		`CREATE FUNCTION slow_marker() RETURNS trigger LANGUAGE plpgsql AS $$
		 BEGIN PERFORM pg_sleep(0.15); RETURN NEW; END $$`,
		`CREATE TRIGGER slow_marker BEFORE INSERT ON move_markers FOR EACH ROW EXECUTE FUNCTION slow_marker()`,
		`ALTER TABLE move_markers ENABLE ALWAYS TRIGGER slow_marker`, // the apply worker fires it too
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}

	h.startMove(p, target, mover.DefaultFreezeBudget)
	m := h.waitMove(30*time.Second, "catch-up", func(m *pb.Move) bool {
		return m.GetState() == "catching_up" && clock.count(m.GetId(), mover.CatchingUp, mover.AwaitCatchUp) > 0
	})
	time.Sleep(time.Second) // a few markers, all late
	if _, err := h.instances[0].admin.CancelRebalance(ctx, &pb.CancelRebalanceRequest{}); err != nil {
		t.Fatal(err)
	}
	if r := h.waitRebalance(20 * time.Second); r.GetState() != pb.RebalanceState_REBALANCE_STATE_CANCELLED {
		t.Fatalf("cancelled rebalance ended %s:\n%s", r.GetState(), movesText(r))
	}
	if n := clock.count(m.GetId(), mover.CatchingUp, mover.Freeze); n != 0 {
		t.Fatalf("the move froze its partition %d times without catching up", n)
	}
	if owner := h.ownerOf(p); owner != source {
		t.Fatalf("a cancelled move left partition %d on %s", p, owner)
	}
	if n := h.query(target, `SELECT (SELECT count(*) FROM users WHERE partition = $1) + (SELECT count(*) FROM ownership WHERE partition = $1)`, p); n != 0 {
		t.Fatalf("the cancelled move left %d rows of partition %d on %s", n, p, target)
	}
	h.checkNoReplication()
}
