package catalog

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/shardgate/shardgate/migrations"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// Errors of the shard set's changes; the server maps them to gRPC codes.
var (
	// ErrShardExists means a shard of that name is already registered.
	ErrShardExists = errors.New("a shard of that name already exists")
	// ErrUnknownShard means no shard of that name is registered.
	ErrUnknownShard = errors.New("no such shard")
	// ErrShardInUse means the shard still owns partitions or takes part in
	// a move that has not ended, or its database still holds rows.
	ErrShardInUse = errors.New("shard is in use")
	// ErrShardNotEmpty means a database offered as a new shard already
	// holds partitions or rows (another cluster's shard, or a used one).
	ErrShardNotEmpty = errors.New("shard database is not empty")
	// ErrLastShard means the change would leave no active shard.
	ErrLastShard = errors.New("the cluster needs at least one active shard")
	// ErrShardRefused means a new shard's server answered but refused the
	// connection (no such database, bad password, no permission).
	ErrShardRefused = errors.New("the shard's server refused the connection")
	// ErrBadDSN means a shard's DSN cannot be used: it does not parse, or
	// references an environment variable that is not set.
	ErrBadDSN = errors.New("unusable DSN")
)

// ClusterShape is how the cluster places partitions.
type ClusterShape struct {
	Ring router.RingConfig
	// SlotPrefix starts the names of the cluster's replication slots,
	// publications and subscriptions ("sg" + 8 hex digits): slots are
	// server-wide, so two clusters sharing a PostgreSQL server must not
	// share names.
	SlotPrefix string
}

// Shape reads the cluster's ring settings and slot prefix.
func (c *Catalog) Shape(ctx context.Context) (ClusterShape, error) {
	var sh ClusterShape
	err := c.pool.QueryRow(ctx, `SELECT partition_count, replication_factor, load, slot_prefix FROM cluster`).
		Scan(&sh.Ring.PartitionCount, &sh.Ring.ReplicationFactor, &sh.Ring.Load, &sh.SlotPrefix)
	if errors.Is(err, pgx.ErrNoRows) {
		return ClusterShape{}, ErrNoCluster
	}
	if err != nil {
		return ClusterShape{}, fmt.Errorf("cluster shape: %w", err)
	}
	return sh, nil
}

// AddShard registers a new shard of the given weight. It migrates the
// shard's database first and refuses one that already lists partitions or
// holds rows. The new shard owns nothing until a rebalance moves
// partitions to it; routers open a pool for it at once.
func (c *Catalog) AddShard(ctx context.Context, name, dsn string, weight int) error {
	if err := router.ValidateShardName(name); err != nil {
		return fmt.Errorf("add shard: %w", err)
	}
	if weight < 1 || weight > router.MaxWeight {
		return fmt.Errorf("add shard %s: weight %d outside 1..%d", name, weight, router.MaxWeight)
	}
	if dsn == "" {
		return fmt.Errorf("add shard %s: empty DSN", name)
	}
	var exists bool
	if err := c.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM shards WHERE name = $1)`, name).Scan(&exists); err != nil {
		return fmt.Errorf("add shard %s: %w", name, err)
	}
	if exists {
		return fmt.Errorf("add shard %s: %w", name, ErrShardExists)
	}
	expanded, err := ExpandDSN(dsn)
	if err != nil {
		return fmt.Errorf("add shard %s: %w: %v", name, ErrBadDSN, err)
	}
	sh, err := shards.Open(ctx, name, expanded, shards.PoolOptions{MaxConns: 2})
	if err != nil {
		return fmt.Errorf("add shard: %w: %v", ErrBadDSN, err)
	}
	defer sh.Close()
	if err := sh.Ping(ctx); err != nil {
		// The server's own message (e.g. database "x" does not exist)
		// names nothing the admin did not give; the host stays out.
		var pe *pgconn.PgError
		if errors.As(err, &pe) {
			return fmt.Errorf("add shard %s: %w: %s", name, ErrShardRefused, pe.Message)
		}
		return fmt.Errorf("add shard: %w", err)
	}
	if _, err := migrations.Up(ctx, expanded, migrations.Shard); err != nil {
		return fmt.Errorf("add shard %s: %w", name, err)
	}
	held, err := sh.Holdings(ctx)
	if err != nil {
		return fmt.Errorf("add shard: %w", err)
	}
	if !held.Empty() {
		return fmt.Errorf("add shard %s: %w: %s", name, ErrShardNotEmpty, held)
	}
	_, err = c.pool.Exec(ctx, `INSERT INTO shards (name, dsn, weight) VALUES ($1, $2, $3)`, name, dsn, weight)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23505" { // a concurrent add of the same name
		return fmt.Errorf("add shard %s: %w", name, ErrShardExists)
	}
	if err != nil {
		return fmt.Errorf("add shard %s: %w", name, err)
	}
	return nil
}

// DrainShard marks a shard draining: the next rebalance moves all its
// partitions to the active shards. It refuses to drain the last active
// shard. Draining a draining shard is a no-op.
func (c *Catalog) DrainShard(ctx context.Context, name string) error {
	return c.setShardState(ctx, name, ShardDraining)
}

// ActivateShard undoes DrainShard: the shard takes partitions again in the
// next rebalance.
func (c *Catalog) ActivateShard(ctx context.Context, name string) error {
	return c.setShardState(ctx, name, ShardActive)
}

func (c *Catalog) setShardState(ctx context.Context, name, state string) error {
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		var cur string
		err := tx.QueryRow(ctx, `SELECT state FROM shards WHERE name = $1 FOR UPDATE`, name).Scan(&cur)
		if errors.Is(err, pgx.ErrNoRows) {
			return ErrUnknownShard
		}
		if err != nil || cur == state {
			return err
		}
		if state == ShardDraining {
			var others int
			if err := tx.QueryRow(ctx, `SELECT count(*) FROM shards WHERE state = 'active' AND name <> $1`, name).Scan(&others); err != nil {
				return err
			}
			if others == 0 {
				return ErrLastShard
			}
		}
		_, err = tx.Exec(ctx, `UPDATE shards SET state = $2 WHERE name = $1`, name, state)
		return err
	})
	if err != nil {
		return fmt.Errorf("set shard %s %s: %w", name, state, err)
	}
	return nil
}

// RemoveShard unregisters a shard that owns no partition and takes part in
// no unfinished move. Unless force is set it also checks that the shard's
// database holds no rows (no data, no undelivered events), so nothing is
// lost with it; force skips that check, for a shard whose database is gone.
// The database itself is left for the operator to drop.
func (c *Catalog) RemoveShard(ctx context.Context, name string, force bool) error {
	var (
		dsn            string
		owned, pending int
	)
	err := c.pool.QueryRow(ctx, `
		SELECT s.dsn,
		       (SELECT count(*) FROM partitions WHERE shard = s.name),
		       (SELECT count(*) FROM moves WHERE (source = s.name OR target = s.name)
		            AND state NOT IN ('cleaned_up', 'failed', 'cancelled'))
		FROM shards AS s WHERE s.name = $1`, name).Scan(&dsn, &owned, &pending)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("remove shard %s: %w", name, ErrUnknownShard)
	}
	if err != nil {
		return fmt.Errorf("remove shard %s: %w", name, err)
	}
	switch {
	case owned > 0:
		return fmt.Errorf("remove shard %s: %w: it owns %d partitions (drain it and rebalance first)", name, ErrShardInUse, owned)
	case pending > 0:
		return fmt.Errorf("remove shard %s: %w: %d moves to or from it have not finished", name, ErrShardInUse, pending)
	}
	if !force {
		if err := checkEmpty(ctx, name, dsn); err != nil {
			return fmt.Errorf("remove shard %s: %w", name, err)
		}
	}
	// The map may have changed since the check: the delete fails on the
	// partitions' foreign key if the shard owns anything now.
	tag, err := c.pool.Exec(ctx, `DELETE FROM shards WHERE name = $1`, name)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23503" {
		return fmt.Errorf("remove shard %s: %w: it owns partitions again", name, ErrShardInUse)
	}
	if err != nil {
		return fmt.Errorf("remove shard %s: %w", name, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("remove shard %s: %w", name, ErrUnknownShard)
	}
	return nil
}

// checkEmpty opens the shard and fails unless it holds nothing.
func checkEmpty(ctx context.Context, name, dsn string) error {
	expanded, err := ExpandDSN(dsn)
	if err != nil {
		return err
	}
	sh, err := shards.Open(ctx, name, expanded, shards.PoolOptions{MaxConns: 1})
	if err != nil {
		return err
	}
	defer sh.Close()
	held, err := sh.Holdings(ctx)
	if err != nil {
		return fmt.Errorf("cannot check that the shard is empty (use force for a database that is gone): %w", err)
	}
	if !held.Empty() {
		return fmt.Errorf("%w: its database still holds %s", ErrShardInUse, held)
	}
	return nil
}
