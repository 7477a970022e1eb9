// Package testcluster serves a throwaway Shardgate cluster on loopback for
// the tests of the commands (shardctl, shardbench), which talk to it over
// gRPC exactly as they would to a deployed one.
package testcluster

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/server"
)

// Cluster is a running cluster: its gRPC address and catalog DSN.
type Cluster struct {
	Addr       string
	CatalogDSN string
	Server     *server.Server
}

// Start creates a catalog and shardCount shard databases, and serves them on a
// free loopback port until the test ends. A nil Logger in opts discards logs.
func Start(t testing.TB, shardCount int, opts server.Options, gopts server.GRPCOptions) *Cluster {
	t.Helper()
	dsns := make([]string, shardCount)
	for i := range dsns {
		dsns[i] = testenv.NewDatabase(t)
	}
	return StartOn(t, dsns, opts, gopts)
}

// StartOn is Start with the shards' databases given: shard-i is at
// shardDSNs[i] (a database of a testenv.PGCluster, say, to stop it).
func StartOn(t testing.TB, shardDSNs []string, opts server.Options, gopts server.GRPCOptions) *Cluster {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	catalogDSN := testenv.NewDatabase(t)
	var specs []catalog.ShardSpec
	for i, dsn := range shardDSNs {
		specs = append(specs, catalog.ShardSpec{Name: fmt.Sprintf("shard-%d", i), DSN: dsn})
	}
	if err := catalog.CreateCluster(ctx, catalogDSN, router.RingConfig{}, specs); err != nil {
		t.Fatal(err)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s, err := server.New(ctx, catalogDSN, opts)
	if err != nil {
		t.Fatal(err)
	}
	g, hs := server.NewGRPCServer(s, gopts)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- server.Serve(ctx, g, hs, lis, time.Second, 0) }()
	t.Cleanup(func() { cancel(); <-done; s.Close() })
	return &Cluster{Addr: lis.Addr().String(), CatalogDSN: catalogDSN, Server: s}
}
