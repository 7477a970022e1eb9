package migrations_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/migrations"
)

// Instances that start together migrate a database once: the advisory lock
// serialises them and the later ones find nothing to do.
func TestConcurrentUpAppliesOnce(t *testing.T) {
	t.Parallel()
	for _, kind := range []migrations.Kind{migrations.Catalog, migrations.Shard} {
		dsn := testenv.NewDatabase(t)
		ctx := context.Background()
		before, err := migrations.GetStatus(ctx, dsn, kind)
		if err != nil {
			t.Fatal(err)
		}
		if before.Applied != 0 || before.Latest < 1 || len(before.Pending) == 0 {
			t.Fatalf("%s on an empty database: %+v", kind, before)
		}
		var mu sync.Mutex
		applied := 0
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				vs, err := migrations.Up(ctx, dsn, kind)
				if err != nil {
					t.Error(err)
				}
				mu.Lock()
				applied += len(vs)
				mu.Unlock()
			})
		}
		wg.Wait()
		if applied != len(before.Pending) {
			t.Fatalf("%s: %d migrations applied across 4 concurrent runs, want %d", kind, applied, len(before.Pending))
		}
		after, err := migrations.GetStatus(ctx, dsn, kind)
		if err != nil {
			t.Fatal(err)
		}
		if after.Applied != after.Latest || len(after.Pending) != 0 {
			t.Fatalf("%s after Up: %+v", kind, after)
		}
	}
}

func TestBadDSN(t *testing.T) {
	if _, err := migrations.Up(context.Background(), "postgres://u:topsecret@127.0.0.1:1/x?connect_timeout=1", migrations.Shard); err == nil {
		t.Fatal("Up on an unreachable database succeeded")
	} else if strings.Contains(err.Error(), "topsecret") {
		t.Fatalf("error leaks the password: %v", err)
	}
}

// A shard DSN may carry pgxpool's own parameters (the servers' pools read
// them); migrating through it must not send them to PostgreSQL.
func TestUpAcceptsPoolParameters(t *testing.T) {
	t.Parallel()
	dsn := testenv.NewDatabase(t) + "&pool_max_conns=3&pool_min_conns=1"
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := migrations.Up(ctx, dsn, migrations.Shard); err != nil {
		t.Fatal(err)
	}
	if _, err := migrations.GetStatus(ctx, dsn, migrations.Shard); err != nil {
		t.Fatal(err)
	}
}
