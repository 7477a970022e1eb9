package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testcluster"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/server"
)

// status exits non-zero while a shard's PostgreSQL is stopped, naming it,
// and zero again once it is back.
func TestStatusUnhealthyWhileShardDown(t *testing.T) {
	pg := testenv.NewPGCluster(t)
	dsns := []string{testenv.NewDatabase(t), testenv.NewDatabase(t), testenv.NewDatabase(t), pg.CreateDatabase("shard3")}
	c := testcluster.StartOn(t, dsns, server.Options{}, server.GRPCOptions{})
	g := globals{Addr: c.Addr, Timeout: 10 * time.Second}

	status := func(json bool) (string, error) {
		var out bytes.Buffer
		gg := g
		gg.out, gg.JSON = &out, json
		err := statusCmd{MaxBacklogAge: time.Minute}.Run(&gg)
		return out.String(), err
	}
	out, err := status(false)
	if err != nil {
		t.Fatalf("healthy cluster: %v\n%s", err, out)
	}
	if strings.Count(out, "shard-") != 4 || !strings.Contains(out, "healthy") {
		t.Fatalf("status:\n%s", out)
	}

	pg.Stop()
	// The server samples at most once a second: the next look sees it.
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err = status(false)
		if errors.Is(err, errUnhealthy) || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !errors.Is(err, errUnhealthy) || !strings.Contains(out, "shard shard-3 is unreachable") {
		t.Fatalf("with shard-3 stopped: err %v\n%s", err, out)
	}
	jout, err := status(true)
	if !errors.Is(err, errUnhealthy) {
		t.Fatalf("--json with shard-3 stopped: err %v", err)
	}
	var doc struct {
		Problems []string `json:"problems"`
		Shards   []struct {
			Name      string `json:"name"`
			Reachable bool   `json:"reachable"`
		} `json:"shards"`
	}
	if err := json.Unmarshal([]byte(jout), &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Problems) != 1 || len(doc.Shards) != 4 || doc.Shards[3].Reachable || !doc.Shards[0].Reachable {
		t.Fatalf("--json: %+v", doc)
	}

	pg.Start()
	deadline = time.Now().Add(30 * time.Second)
	for {
		out, err = status(false)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("after shard-3 came back: %v\n%s", err, out)
	}
}

// A threshold outside 1s..24h is refused before any call.
func TestStatusRejectsBadThreshold(t *testing.T) {
	g := globals{Addr: "127.0.0.1:1", out: &bytes.Buffer{}}
	for _, d := range []time.Duration{0, 500 * time.Millisecond, 25 * time.Hour} {
		if err := (statusCmd{MaxBacklogAge: d}).Run(&g); err == nil || !strings.Contains(err.Error(), "max-backlog-age") {
			t.Errorf("--max-backlog-age %s: err %v", d, err)
		}
	}
}
