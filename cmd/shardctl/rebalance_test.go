package main

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/mover"
	"github.com/shardgate/shardgate/server"
)

// docs/rebalancing.md's walk-through, through the commands: add a fifth shard, plan,
// rebalance with --wait, verify, drain it, rebalance back and remove it.
func TestRebalanceCommands(t *testing.T) {
	addr, _ := startClusterWith(t, server.Options{RunMover: true, Mover: mover.ExecutorOptions{Interval: 100 * time.Millisecond}})
	g := globals{Addr: addr}
	gj := g
	gj.JSON = true

	if out := run(t, g, rebalancePlanCmd{}); !strings.Contains(out, "nothing to move") {
		t.Fatalf("plan of a placed cluster:\n%s", out)
	}
	dsn := testenv.NewDatabase(t)
	if out := run(t, g, shardAddCmd{Name: "shard-4", DSN: dsn, Weight: 1}); !strings.Contains(out, "shard-4 added") {
		t.Fatalf("shard add:\n%s", out)
	}
	var plan struct {
		PartitionsMoving int `json:"partitionsMoving"`
		Moves            []struct {
			Target string `json:"target"`
		} `json:"moves"`
	}
	if err := json.Unmarshal([]byte(run(t, gj, rebalancePlanCmd{})), &plan); err != nil || plan.PartitionsMoving < 700 || len(plan.Moves) != 4 {
		t.Fatalf("plan --json after adding a fifth shard: %+v, %v", plan, err)
	}
	out := run(t, g, rebalanceStartCmd{FreezeBudget: 100 * time.Millisecond, Wait: true})
	if !strings.Contains(out, "rebalance 1 started") || !strings.Contains(out, ": done,") || strings.Count(out, "cleaned_up") < 4 {
		t.Fatalf("rebalance start --wait:\n%s", out)
	}
	if out := run(t, g, verifyCmd{Partition: 17}); !strings.HasSuffix(strings.TrimSpace(out), "ok") {
		t.Fatalf("verify:\n%s", out)
	}
	if out := run(t, g, topologyCmd{}); strings.Count(out, "shard-") != 5 {
		t.Fatalf("topology after the rebalance:\n%s", out)
	}

	// Removing a shard that owns partitions is refused, naming why.
	rg := g
	rg.out, rg.Timeout = &strings.Builder{}, 10*time.Second
	if err := (shardRemoveCmd{Name: "shard-4"}).Run(&rg); err == nil || !strings.Contains(err.Error(), "owns") {
		t.Fatalf("removing a shard that owns partitions: %v", err)
	}
	run(t, g, shardDrainCmd{Name: "shard-4"})
	out = run(t, gj, rebalanceStartCmd{FreezeBudget: 100 * time.Millisecond, Wait: true})
	if lines := strings.Split(strings.TrimSpace(out), "\n"); !strings.Contains(lines[len(lines)-1], "REBALANCE_STATE_DONE") {
		t.Fatalf("rebalance start --wait --json, last line: %s", lines[len(lines)-1])
	}
	if out := run(t, g, shardRemoveCmd{Name: "shard-4"}); !strings.Contains(out, "removed") {
		t.Fatalf("shard remove:\n%s", out)
	}
	if out := run(t, g, rebalanceStatusCmd{}); !strings.Contains(out, "rebalance 2: done") {
		t.Fatalf("rebalance status:\n%s", out)
	}
	// Nothing runs: cancel says so.
	if err := (rebalanceCancelCmd{}).Run(&rg); err == nil || !strings.Contains(err.Error(), "no rebalance") {
		t.Fatalf("cancel with nothing running: %v", err)
	}
	if err := (verifyCmd{Partition: 99999}).Run(&rg); err == nil || errors.Is(err, errVerify) {
		t.Fatalf("verify of a partition out of range: %v", err)
	}
}
