package main

import (
	"bytes"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/alecthomas/kong"
	"github.com/shardgate/shardgate/internal/testcluster"
	"github.com/shardgate/shardgate/server"
)

// startCluster serves a fresh 4-shard cluster on loopback and returns its
// address and catalog DSN.
func startCluster(t *testing.T) (addr, catalogDSN string) {
	t.Helper()
	return startClusterWith(t, server.Options{})
}

// startClusterWith is startCluster with server options (its logger is quiet).
func startClusterWith(t *testing.T, opts server.Options) (addr, catalogDSN string) {
	t.Helper()
	c := testcluster.Start(t, 4, opts, server.GRPCOptions{})
	return c.Addr, c.CatalogDSN
}

func run(t *testing.T, g globals, cmd interface{ Run(*globals) error }) string {
	t.Helper()
	var out bytes.Buffer
	g.out = &out
	g.Timeout = 10 * time.Second
	if err := cmd.Run(&g); err != nil {
		t.Fatal(err)
	}
	return out.String()
}

func TestCommands(t *testing.T) {
	addr, catalogDSN := startCluster(t)
	g := globals{Addr: addr}

	out := run(t, g, topologyCmd{})
	if !strings.Contains(out, "4096 partitions") || strings.Count(out, "shard-") != 4 {
		t.Fatalf("topology:\n%s", out)
	}
	gj := g
	gj.JSON = true
	var topo struct {
		PartitionCount int `json:"partitionCount"`
		Shards         []struct {
			Name           string `json:"name"`
			PartitionCount int    `json:"partitionCount"`
		} `json:"shards"`
	}
	if err := json.Unmarshal([]byte(run(t, gj, topologyCmd{})), &topo); err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, s := range topo.Shards {
		total += s.PartitionCount
	}
	if len(topo.Shards) != 4 || total != 4096 {
		t.Fatalf("topology --json: %+v", topo)
	}

	if out := run(t, g, locateCmd{User: "alice"}); !strings.Contains(out, "alice") || !strings.Contains(out, "shard-") {
		t.Fatalf("locate:\n%s", out)
	}
	if out := run(t, g, migrateStatusCmd{}); strings.Count(out, "shard-") != 4 || !strings.Contains(out, "catalog") {
		t.Fatalf("migrate status:\n%s", out)
	}
	out = run(t, gj, migrateUpCmd{Catalog: catalogDSN})
	var rows []struct {
		Database string  `json:"database"`
		Applied  []int64 `json:"applied"`
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil || len(rows) != 5 {
		t.Fatalf("migrate up --json: %s (%v)", out, err)
	}
	for _, r := range rows {
		if len(r.Applied) != 0 {
			t.Fatalf("migrate up on a current cluster applied %v to %s", r.Applied, r.Database)
		}
	}
}

func TestBadInputIsAnError(t *testing.T) {
	addr, _ := startCluster(t)
	g := globals{Addr: addr, Timeout: 5 * time.Second, out: io.Discard}
	err := locateCmd{User: "not valid"}.Run(&g)
	if err == nil || !strings.Contains(err.Error(), "user_id") {
		t.Fatalf("locate with a bad ID: %v", err)
	}
}

// The shard and rebalance commands parse as docs/rebalancing.md writes them.
func TestRebalanceCommandsParse(t *testing.T) {
	var c cli
	p, err := kong.New(&c, kong.Name("shardctl"), kong.Exit(func(int) { t.Fatal("exit") }))
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"shard", "add", "shard-4", "--dsn", "postgres://h/db", "--weight", "2"},
		{"shard", "drain", "shard-4"},
		{"shard", "remove", "shard-4", "--force"},
		{"rebalance", "plan", "--json"},
		{"rebalance", "start", "--max-parallel", "3", "--freeze-budget", "50ms", "--wait"},
		{"rebalance", "status"},
		{"rebalance", "cancel"},
		{"verify", "17"},
	} {
		if _, err := p.Parse(args); err != nil {
			t.Errorf("%v: %v", args, err)
		}
	}
}
