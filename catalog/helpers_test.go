package catalog_test

import (
	"context"
	"testing"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// newCluster creates a cluster of the named shards, each in a fresh
// database, and returns the catalog DSN and an open Catalog.
func newCluster(t *testing.T, ctx context.Context, partitions int, names ...string) (string, *catalog.Catalog) {
	t.Helper()
	catDSN := testenv.NewDatabase(t)
	specs := make([]catalog.ShardSpec, len(names))
	for i, name := range names {
		specs[i] = catalog.ShardSpec{Name: name, DSN: testenv.NewDatabase(t)}
	}
	if err := catalog.CreateCluster(ctx, catDSN, router.RingConfig{PartitionCount: partitions}, specs); err != nil {
		t.Fatal(err)
	}
	return catDSN, openCatalog(t, ctx, catDSN)
}

// openCatalog opens the catalog at dsn, closed when the test ends.
func openCatalog(t *testing.T, ctx context.Context, dsn string) *catalog.Catalog {
	t.Helper()
	cat, err := catalog.Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	return cat
}

// checkShardsAgree fails unless every shard's ownership table says exactly
// "owned" for the partitions the catalog gives it, and nothing else: the
// invariant fencing rests on.
func checkShardsAgree(t *testing.T, ctx context.Context, topo catalog.Topology) {
	t.Helper()
	for _, rec := range topo.Shards {
		sh, err := shards.Open(ctx, rec.Name, rec.DSN, shards.PoolOptions{})
		if err != nil {
			t.Fatal(err)
		}
		own, err := sh.Ownership(ctx)
		sh.Close()
		if err != nil {
			t.Fatal(err)
		}
		if want := topo.Table.Counts()[rec.Name]; len(own) != want {
			t.Fatalf("%s owns %d partitions, the catalog says %d", rec.Name, len(own), want)
		}
		for p, st := range own {
			if st != shards.Owned || topo.Table.Owner(p) != rec.Name {
				t.Fatalf("%s: partition %d is %s there, catalog owner %s", rec.Name, p, st, topo.Table.Owner(p))
			}
		}
	}
}
