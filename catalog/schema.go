package catalog

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/pglock"
	"github.com/shardgate/shardgate/internal/versioning"
)

// SetConfigChecked writes a value like SetConfig, after check has accepted
// it against the namespace's schema (check is not called for a namespace
// without one). The schema cannot change between the check and the write:
// both run in one transaction holding the namespace's lock in share mode.
func (c *Catalog) SetConfigChecked(ctx context.Context, namespace, key string, value []byte, expected *int64, check func(schema string) error) (int64, error) {
	var version int64
	err := versioning.RetryBelowTombstone(func() error {
		return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
			// Two statements, so the schema is read after the lock is held
			// (one statement's snapshot would predate the wait).
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock_shared($1, hashtext($2))`, pglock.ClassConfigSchema, namespace); err != nil {
				return fmt.Errorf("lock config namespace: %w", err)
			}
			var schema string
			err := tx.QueryRow(ctx, `SELECT schema FROM config_schemas WHERE namespace = $1`, namespace).Scan(&schema)
			switch {
			case errors.Is(err, pgx.ErrNoRows):
			case err != nil:
				return fmt.Errorf("read config schema: %w", err)
			default:
				if err := check(schema); err != nil {
					return err
				}
			}
			version, err = c.setConfig(ctx, tx, namespace, key, value, expected)
			return err
		})
	})
	return version, err
}

// SetConfigSchema sets (schema != "") or removes (schema == "") the schema
// of a namespace. Before setting one it passes every value already in the
// namespace to check, in key order, and gives up at the first error; it
// holds the namespace's lock exclusively meanwhile, so no SetConfigChecked
// can write a value the check did not see.
func (c *Catalog) SetConfigSchema(ctx context.Context, namespace, schema string, check func(key string, value []byte) error) error {
	return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, hashtext($2))`, pglock.ClassConfigSchema, namespace); err != nil {
			return fmt.Errorf("lock config namespace: %w", err)
		}
		if schema == "" {
			_, err := tx.Exec(ctx, `DELETE FROM config_schemas WHERE namespace = $1`, namespace)
			return err
		}
		rows, err := tx.Query(ctx, `SELECT key, value FROM config WHERE namespace = $1 ORDER BY key`, namespace)
		if err != nil {
			return fmt.Errorf("read config values: %w", err)
		}
		var key string
		var value []byte
		_, err = pgx.ForEachRow(rows, []any{&key, &value}, func() error { return check(key, value) })
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `
			INSERT INTO config_schemas (namespace, schema) VALUES ($1, $2)
			ON CONFLICT (namespace) DO UPDATE SET schema = EXCLUDED.schema, updated_at = now()`, namespace, schema)
		if err != nil {
			return fmt.Errorf("write config schema: %w", err)
		}
		return nil
	})
}

// GetConfigSchema returns a namespace's schema; versioning.ErrNotFound if it
// has none.
func (c *Catalog) GetConfigSchema(ctx context.Context, namespace string) (string, time.Time, error) {
	var schema string
	var at time.Time
	err := c.pool.QueryRow(ctx, `SELECT schema, updated_at FROM config_schemas WHERE namespace = $1`, namespace).Scan(&schema, &at)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", time.Time{}, fmt.Errorf("config schema %s: %w", namespace, versioning.ErrNotFound)
	}
	if err != nil {
		return "", time.Time{}, fmt.Errorf("get config schema: %w", err)
	}
	return schema, at, nil
}
