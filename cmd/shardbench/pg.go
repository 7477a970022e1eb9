package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/shardgate/shardgate/router"
)

// The PostgreSQL baselines write and read a scratch table shaped like a
// shard's items table, directly through pgx: what put-item and get-user cost
// in the database alone, without Shardgate's statements, triggers, outbox,
// routing or gRPC.

// pgTableDDL has the columns and primary key of the shard items table
// (migrations/shard/00001_init.sql) and nothing else: no triggers, no
// outbox. Not UNLOGGED: its inserts commit like a shard write, WAL included.
const pgTableDDL = `CREATE TABLE %s (
    partition  integer NOT NULL,
    user_id    text NOT NULL,
    collection text NOT NULL,
    key        text COLLATE "C" NOT NULL,
    value      jsonb NOT NULL,
    version    bigint NOT NULL CHECK (version > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, user_id, collection, key)
)`

// pgTableName is the scratch table of a run.
func pgTableName(runID string) string { return "shardbench_" + runID }

// usesPG reports whether a scenario needs -pg.
func usesPG(name string) bool { return name == "pg-insert" || name == "pg-get" }

// ensurePGTable connects to -pg with one connection per caller, like pgbench
// -c, and creates the run's scratch table.
func (e *env) ensurePGTable(ctx context.Context) error {
	if e.pgTable != "" {
		return nil
	}
	if e.cfg.PG == "" {
		return errors.New("-pg is required")
	}
	cfg, err := pgxpool.ParseConfig(e.cfg.PG)
	if err != nil {
		return fmt.Errorf("-pg: %w", err)
	}
	cfg.MaxConns = int32(e.cfg.Concurrency)
	if cfg.ConnConfig.RuntimeParams["application_name"] == "" {
		cfg.ConnConfig.RuntimeParams["application_name"] = "shardbench"
	}
	db := cfg.ConnConfig.Database
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect to -pg database %s: %w", db, err)
	}
	e.pg = pool
	// The first query connects: an unreachable database fails within -timeout.
	cctx, cancel := context.WithTimeout(ctx, e.cfg.Timeout)
	defer cancel()
	var syncCommit string
	if err := pool.QueryRow(cctx, `SHOW synchronous_commit`).Scan(&syncCommit); err != nil {
		return fmt.Errorf("connect to -pg database %s: %w", db, err)
	}
	table := pgTableName(e.runID)
	if _, err := pool.Exec(cctx, fmt.Sprintf(pgTableDDL, pgx.Identifier{table}.Sanitize())); err != nil {
		return fmt.Errorf("create table %s in %s: %w", table, db, err)
	}
	e.pgTable = table
	fmt.Fprintf(e.log, "shardbench: table %s in database %s (synchronous_commit=%s)\n", table, db, syncCommit)
	return nil
}

// ensurePGRows fills the scratch table with one row per user (key k0, as
// ensureUsers gives each user one item) for pg-get to read.
func (e *env) ensurePGRows(ctx context.Context) error {
	if err := e.ensurePGTable(ctx); err != nil || e.pgRows {
		return err
	}
	rows := make([][]any, e.cfg.Users)
	for i := range rows {
		user := e.userID(i)
		rows[i] = []any{router.Partition(user, router.DefaultPartitions), user, itemCollection, "k0", []byte(`{"n":0}`), int64(1)}
	}
	_, err := e.pg.CopyFrom(ctx, pgx.Identifier{e.pgTable},
		[]string{"partition", "user_id", "collection", "key", "value", "version"}, pgx.CopyFromRows(rows))
	if err != nil {
		return fmt.Errorf("fill table %s: %w", e.pgTable, err)
	}
	e.pgRows = true
	return nil
}

// cleanupPG drops the scratch table.
func (e *env) cleanupPG(ctx context.Context) error {
	if e.pgTable == "" {
		return nil
	}
	if _, err := e.pg.Exec(ctx, "DROP TABLE IF EXISTS "+pgx.Identifier{e.pgTable}.Sanitize()); err != nil {
		return fmt.Errorf("drop table %s: %w", e.pgTable, err)
	}
	return nil
}

// setupPGInsert returns one committed single-row INSERT per call (autocommit:
// one round trip) of a row the size of a put-item write: a run user's ID,
// the same collection, and a {"n":…} value below 2^20. Keys come from one
// counter per run, so no two calls, callers or scenarios collide.
func setupPGInsert(ctx context.Context, e *env) (op, error) {
	if err := e.ensurePGTable(ctx); err != nil {
		return nil, err
	}
	sql := fmt.Sprintf(`INSERT INTO %s (partition, user_id, collection, key, value, version) VALUES ($1, $2, $3, $4, $5, $6)`,
		pgx.Identifier{e.pgTable}.Sanitize())
	return func(ctx context.Context, c *caller) error {
		user := e.userID(c.rng.IntN(e.cfg.Users))
		n := e.pgNext.Add(1)
		value := strconv.AppendInt([]byte(`{"n":`), int64(c.rng.IntN(1<<20)), 10)
		_, err := e.pg.Exec(ctx, sql, router.Partition(user, router.DefaultPartitions), user, itemCollection,
			"k"+strconv.FormatInt(n, 10), append(value, '}'), n)
		return err
	}, nil
}

// setupPGGet returns one primary-key read of a random user's row per call,
// its non-key columns scanned.
func setupPGGet(ctx context.Context, e *env) (op, error) {
	if err := e.ensurePGRows(ctx); err != nil {
		return nil, err
	}
	sql := fmt.Sprintf(`SELECT value, version, created_at, updated_at FROM %s
WHERE partition = $1 AND user_id = $2 AND collection = $3 AND key = $4`, pgx.Identifier{e.pgTable}.Sanitize())
	return func(ctx context.Context, c *caller) error {
		user := e.userID(c.rng.IntN(e.cfg.Users))
		var (
			value              []byte
			version            int64
			created, updatedAt time.Time
		)
		return e.pg.QueryRow(ctx, sql, router.Partition(user, router.DefaultPartitions), user, itemCollection, "k0").
			Scan(&value, &version, &created, &updatedAt)
	}, nil
}
