// Package catalog reads and writes the catalog database: the cluster's
// shape, its shards, the actual partition → shard map with its topology
// version, and global config. It also creates clusters and keeps a
// router.Router current as the topology changes.
package catalog

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/shardgate/shardgate/router"
)

// ErrNoCluster means the catalog database holds no cluster yet.
var ErrNoCluster = errors.New("the catalog holds no cluster: create one with 'shardgate init' (or run 'shardgate dev')")

// Shard states, as stored in the catalog.
const (
	ShardActive   = "active"
	ShardDraining = "draining"
)

// TopologyChannel is the LISTEN/NOTIFY channel a topology change is announced on.
const TopologyChannel = "shardgate_topology"

// Catalog is a connection pool to the catalog database.
type Catalog struct {
	pool *pgxpool.Pool
}

// Open returns a Catalog for dsn. It connects lazily; use Ping to check.
func Open(ctx context.Context, dsn string) (*Catalog, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("catalog DSN: %w", err)
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("catalog: %w", err)
	}
	return &Catalog{pool: pool}, nil
}

// Pool returns the underlying pool.
func (c *Catalog) Pool() *pgxpool.Pool { return c.pool }

// Close closes the pool.
func (c *Catalog) Close() { c.pool.Close() }

// Ping checks that the catalog answers.
func (c *Catalog) Ping(ctx context.Context) error {
	if err := c.pool.Ping(ctx); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	return nil
}

// ShardRecord is a shard as the catalog records it.
type ShardRecord struct {
	Name   string
	DSN    string // as stored: may reference ${ENV} variables, see ExpandDSN
	State  string // ShardActive or ShardDraining
	Weight int    // ring members: a shard of weight N gets N times the share
}

// Topology is one consistent read of the catalog's routing state.
type Topology struct {
	Version        int64
	PartitionCount int
	Shards         []ShardRecord // every registered shard, in name order
	Table          *router.Table
}

// LoadTopology reads shards and the partition map in one snapshot.
func (c *Catalog) LoadTopology(ctx context.Context) (Topology, error) {
	var topo Topology
	err := pgx.BeginTxFunc(ctx, c.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		var (
			owners      []string
			lowP, highP *int32
		)
		err := tx.QueryRow(ctx, `
			SELECT t.version, c.partition_count,
			       (SELECT array_agg(shard ORDER BY partition) FROM partitions),
			       (SELECT min(partition) FROM partitions), (SELECT max(partition) FROM partitions)
			FROM topology t CROSS JOIN cluster c`).Scan(&topo.Version, &topo.PartitionCount, &owners, &lowP, &highP)
		if errors.Is(err, pgx.ErrNoRows) {
			return ErrNoCluster
		}
		if err != nil {
			return err
		}
		// Partitions are unique (primary key), so count and bounds together
		// say the map is exactly 0..P-1 with nothing missing.
		if len(owners) != topo.PartitionCount || lowP == nil || *lowP != 0 || int(*highP) != topo.PartitionCount-1 {
			return fmt.Errorf("partition map is not exactly partitions 0..%d (%d rows)", topo.PartitionCount-1, len(owners))
		}
		rows, err := tx.Query(ctx, `SELECT name, dsn, state, weight FROM shards ORDER BY name`)
		if err != nil {
			return err
		}
		topo.Shards, err = pgx.CollectRows(rows, pgx.RowToStructByPos[ShardRecord])
		if err != nil {
			return err
		}
		topo.Table, err = router.NewTable(topo.Version, owners)
		return err
	})
	if err != nil {
		if errors.Is(err, ErrNoCluster) {
			return Topology{}, err
		}
		return Topology{}, fmt.Errorf("load topology: %w", err)
	}
	return topo, nil
}

// TopologyVersion reads the current topology version: a cheap check before
// a full reload.
func (c *Catalog) TopologyVersion(ctx context.Context) (int64, error) {
	var v int64
	if err := c.pool.QueryRow(ctx, `SELECT version FROM topology`).Scan(&v); err != nil {
		return 0, fmt.Errorf("topology version: %w", err)
	}
	return v, nil
}

var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

// ExpandDSN replaces ${NAME} references in a stored DSN with environment
// variables, so the catalog need not hold shard passwords. A reference to an
// unset variable is an error naming the variable.
func ExpandDSN(dsn string) (string, error) {
	var missing string
	out := envRef.ReplaceAllStringFunc(dsn, func(ref string) string {
		name := envRef.FindStringSubmatch(ref)[1]
		v, ok := os.LookupEnv(name)
		if !ok && missing == "" {
			missing = name
		}
		return v
	})
	if missing != "" {
		return "", fmt.Errorf("DSN references ${%s}, which is not set", missing)
	}
	return out, nil
}
