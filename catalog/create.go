package catalog

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/pglock"
	"github.com/shardgate/shardgate/migrations"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// ErrClusterExists means CreateCluster found a cluster already in the catalog.
var ErrClusterExists = errors.New("the catalog already holds a cluster")

// ShardSpec names a shard and where it lives.
type ShardSpec struct {
	Name string
	DSN  string // may reference ${ENV} variables
}

// CreateCluster migrates the catalog and every shard, places the partitions
// on the shards with the ring, tells each shard which partitions it owns,
// and finally records shards and map in the catalog in one transaction.
// Until that commit no router can route, so a crash part-way is repaired by
// running it again. It returns ErrClusterExists if the catalog already
// holds a cluster, whatever its shape.
func CreateCluster(ctx context.Context, catalogDSN string, cfg router.RingConfig, specs []ShardSpec) error {
	cfg = cfg.WithDefaults()
	names := make([]string, len(specs))
	for i, s := range specs {
		names[i] = s.Name
	}
	ring, err := router.NewRing(names, cfg)
	if err != nil {
		return fmt.Errorf("create cluster: %w", err)
	}
	// One creator at a time: two inits with different shard sets would
	// otherwise both pass the exists check and fight over the shards.
	lock, err := pgx.Connect(ctx, catalogDSN)
	if err != nil {
		return fmt.Errorf("create cluster: %w", err)
	}
	defer lock.Close(context.Background())
	if _, err := lock.Exec(ctx, `SELECT pg_advisory_lock($1)`, pglock.CreateCluster); err != nil {
		return fmt.Errorf("create cluster: lock: %w", err)
	}
	if _, err := migrations.Up(ctx, catalogDSN, migrations.Catalog); err != nil {
		return fmt.Errorf("create cluster: %w", err)
	}
	cat, err := Open(ctx, catalogDSN)
	if err != nil {
		return err
	}
	defer cat.Close()
	var exists bool
	if err := cat.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM cluster)`).Scan(&exists); err != nil {
		return fmt.Errorf("create cluster: %w", err)
	}
	if exists {
		return ErrClusterExists
	}

	owners := ring.Map()
	for _, s := range specs {
		var mine []int32
		for p, o := range owners {
			if o == s.Name {
				mine = append(mine, int32(p))
			}
		}
		if err := claimPartitions(ctx, s, mine); err != nil {
			return fmt.Errorf("create cluster: shard %s: %w", s.Name, err)
		}
	}

	err = pgx.BeginFunc(ctx, cat.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO cluster (partition_count, replication_factor, load) VALUES ($1, $2, $3)`,
			cfg.PartitionCount, cfg.ReplicationFactor, cfg.Load); err != nil {
			return err
		}
		dsns := make([]string, len(specs))
		for i, s := range specs {
			dsns[i] = s.DSN
		}
		if _, err := tx.Exec(ctx, `INSERT INTO shards (name, dsn) SELECT * FROM unnest($1::text[], $2::text[])`, names, dsns); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `INSERT INTO partitions (partition, shard) SELECT p - 1, s FROM unnest($1::text[]) WITH ORDINALITY AS m(s, p)`, owners)
		return err
	})
	if err != nil {
		return fmt.Errorf("create cluster: record topology: %w", err)
	}
	return nil
}

// claimPartitions migrates a new shard and makes its ownership table say
// exactly "owned: these partitions", undoing what an interrupted earlier
// attempt with another shard set may have left.
func claimPartitions(ctx context.Context, spec ShardSpec, partitions []int32) error {
	dsn, err := ExpandDSN(spec.DSN)
	if err != nil {
		return err
	}
	if _, err := migrations.Up(ctx, dsn, migrations.Shard); err != nil {
		return err
	}
	sh, err := shards.Open(ctx, spec.Name, dsn, shards.PoolOptions{MaxConns: 2})
	if err != nil {
		return err
	}
	defer sh.Close()
	return sh.ResetOwnership(ctx, partitions)
}
