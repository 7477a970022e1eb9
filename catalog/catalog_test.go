package catalog_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/router"
)

func TestCreateClusterAgreesWithShards(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	catDSN := testenv.NewDatabase(t)
	var specs []catalog.ShardSpec
	for i := range 3 {
		specs = append(specs, catalog.ShardSpec{Name: fmt.Sprintf("s%d", i), DSN: testenv.NewDatabase(t)})
	}
	cfg := router.RingConfig{PartitionCount: 512}
	if err := catalog.CreateCluster(ctx, catDSN, cfg, specs); err != nil {
		t.Fatal(err)
	}
	if err := catalog.CreateCluster(ctx, catDSN, cfg, specs); !errors.Is(err, catalog.ErrClusterExists) {
		t.Fatalf("second CreateCluster = %v, want ErrClusterExists", err)
	}
	cat := openCatalog(t, ctx, catDSN)
	topo, err := cat.LoadTopology(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if topo.PartitionCount != 512 || len(topo.Shards) != 3 || topo.Table.PartitionCount() != 512 {
		t.Fatalf("topology %+v", topo)
	}
	if v, err := cat.TopologyVersion(ctx); err != nil || v != topo.Version {
		t.Fatalf("TopologyVersion = %d, %v; LoadTopology said %d", v, err, topo.Version)
	}
	checkShardsAgree(t, ctx, topo)
	// Migrating again applies nothing.
	res, err := catalog.MigrateAll(ctx, catDSN)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if len(r.Applied) != 0 {
			t.Fatalf("MigrateAll applied %v to %s on a current cluster", r.Applied, r.Name)
		}
	}
}

func TestCreateClusterRefusesBadShapes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	catDSN := testenv.NewDatabase(t)
	for _, tc := range []struct {
		name  string
		specs []catalog.ShardSpec
		cfg   router.RingConfig
	}{
		{"no shards", nil, router.RingConfig{}},
		{"bad name", []catalog.ShardSpec{{Name: "Bad Name", DSN: "x"}}, router.RingConfig{}},
		{"too few partitions", []catalog.ShardSpec{{Name: "a", DSN: "x"}, {Name: "b", DSN: "y"}}, router.RingConfig{PartitionCount: 1}},
	} {
		if err := catalog.CreateCluster(ctx, catDSN, tc.cfg, tc.specs); !errors.Is(err, router.ErrInvalidRing) {
			t.Errorf("%s: CreateCluster = %v, want ErrInvalidRing", tc.name, err)
		}
	}
	if _, err := openCatalog(t, ctx, catDSN).LoadTopology(ctx); err == nil {
		t.Fatal("a refused cluster left a topology behind")
	}
}

func TestLoadTopologyWithoutCluster(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := testenv.NewDatabase(t)
	if _, err := catalog.MigrateAll(ctx, dsn); !errors.Is(err, catalog.ErrNoCluster) {
		t.Fatalf("MigrateAll on an empty catalog = %v, want ErrNoCluster", err)
	}
	if _, err := openCatalog(t, ctx, dsn).LoadTopology(ctx); !errors.Is(err, catalog.ErrNoCluster) {
		t.Fatalf("LoadTopology = %v, want ErrNoCluster", err)
	}
}

func TestExpandDSN(t *testing.T) {
	t.Setenv("SG_TEST_PW", "s3cret")
	got, err := catalog.ExpandDSN("postgres://u:${SG_TEST_PW}@h/db")
	if err != nil || got != "postgres://u:s3cret@h/db" {
		t.Fatalf("ExpandDSN = %q, %v", got, err)
	}
	if got, err := catalog.ExpandDSN("postgres://u@h/db?x=$HOME"); err != nil || !strings.Contains(got, "$HOME") {
		t.Fatalf("a bare $NAME must stay as it is: %q, %v", got, err)
	}
	_, err = catalog.ExpandDSN("postgres://u:${SG_TEST_MISSING}@h/db")
	if err == nil || !strings.Contains(err.Error(), "SG_TEST_MISSING") {
		t.Fatalf("missing variable: %v", err)
	}
}

// A map with a hole and a stray partition has the right row count but must
// not load: it would shift every partition after the hole.
func TestLoadTopologyRefusesAMapWithHoles(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, cat := newCluster(t, ctx, 8, "a")
	if _, err := cat.Pool().Exec(ctx, `UPDATE partitions SET partition = 8 WHERE partition = 3`); err != nil {
		t.Fatal(err)
	}
	if _, err := cat.LoadTopology(ctx); err == nil || !strings.Contains(err.Error(), "0..7") {
		t.Fatalf("LoadTopology of a map with a hole = %v", err)
	}
}

// Two creators at once: one wins, the other finds the cluster, and the
// shards agree with the catalog.
func TestConcurrentCreateCluster(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	catDSN := testenv.NewDatabase(t)
	a, b, c := testenv.NewDatabase(t), testenv.NewDatabase(t), testenv.NewDatabase(t)
	sets := [][]catalog.ShardSpec{
		{{Name: "a", DSN: a}, {Name: "b", DSN: b}},
		{{Name: "b", DSN: b}, {Name: "c", DSN: c}},
	}
	errs := make(chan error, 2)
	for _, set := range sets {
		go func() { errs <- catalog.CreateCluster(ctx, catDSN, router.RingConfig{PartitionCount: 64}, set) }()
	}
	e1, e2 := <-errs, <-errs
	if (e1 == nil) == (e2 == nil) || !(errors.Is(e1, catalog.ErrClusterExists) || errors.Is(e2, catalog.ErrClusterExists)) {
		t.Fatalf("CreateCluster results %v and %v: want one success and one ErrClusterExists", e1, e2)
	}
	topo, err := openCatalog(t, ctx, catDSN).LoadTopology(ctx)
	if err != nil {
		t.Fatal(err)
	}
	checkShardsAgree(t, ctx, topo)
}
