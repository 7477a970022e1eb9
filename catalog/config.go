package catalog

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/versioning"
)

// ConfigEntry is one global config value.
type ConfigEntry struct {
	Namespace string
	Key       string
	Value     []byte // raw JSON
	Version   int64
	UpdatedAt time.Time
}

// MaxConfigList bounds one ListConfig query.
const MaxConfigList = 10000

// GetConfig reads one value; versioning.ErrNotFound if absent.
func (c *Catalog) GetConfig(ctx context.Context, namespace, key string) (ConfigEntry, error) {
	e := ConfigEntry{Namespace: namespace, Key: key}
	err := c.pool.QueryRow(ctx, `SELECT value, version, updated_at FROM config WHERE namespace = $1 AND key = $2`,
		namespace, key).Scan(&e.Value, &e.Version, &e.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return ConfigEntry{}, fmt.Errorf("config %s/%s: %w", namespace, key, versioning.ErrNotFound)
	}
	if err != nil {
		return ConfigEntry{}, fmt.Errorf("get config: %w", err)
	}
	return e, nil
}

// ListConfig lists up to limit (at most MaxConfigList) values of a
// namespace with keys after after ("" for the start), in key order.
func (c *Catalog) ListConfig(ctx context.Context, namespace, after string, limit int) ([]ConfigEntry, error) {
	if limit <= 0 || limit > MaxConfigList {
		return nil, fmt.Errorf("list config: limit %d outside 1..%d", limit, MaxConfigList)
	}
	rows, err := c.pool.Query(ctx, `
		SELECT namespace, key, value, version, updated_at FROM config
		WHERE namespace = $1 AND key > $2 ORDER BY key LIMIT $3`, namespace, after, limit)
	if err != nil {
		return nil, fmt.Errorf("list config: %w", err)
	}
	list, err := pgx.CollectRows(rows, pgx.RowToStructByPos[ConfigEntry])
	if err != nil {
		return nil, fmt.Errorf("list config: %w", err)
	}
	return list, nil
}

// The three ways to write a value, each one statement that also writes the
// change's outbox row. $4 is the expected version where there is one. A
// value created again after a delete continues after the delete's version
// (kept in config_tombstones) or, once that tombstone was pruned, above the
// config version floor (see PruneConfigTombstones).
const (
	setConfigAny = `
		WITH up AS (
			INSERT INTO config (namespace, key, value, version)
			VALUES ($1, $2, $3, greatest((SELECT version FROM config_tombstones WHERE namespace = $1 AND key = $2),
				(SELECT version_floor FROM config_outbox_clock), 0) + 1)
			ON CONFLICT (namespace, key) DO UPDATE
				SET value = EXCLUDED.value, version = config.version + 1, updated_at = now()
			RETURNING version, value
		), ev AS (
			INSERT INTO config_outbox (namespace, key, op, version, payload)
			SELECT $1, $2, 'upsert', version, value FROM up
		)
		SELECT (SELECT version FROM up), 0::bigint`
	setConfigCreate = `
		WITH up AS (
			INSERT INTO config (namespace, key, value, version)
			VALUES ($1, $2, $3, greatest((SELECT version FROM config_tombstones WHERE namespace = $1 AND key = $2),
				(SELECT version_floor FROM config_outbox_clock), 0) + 1)
			ON CONFLICT (namespace, key) DO NOTHING
			RETURNING version, value
		), ev AS (
			INSERT INTO config_outbox (namespace, key, op, version, payload)
			SELECT $1, $2, 'upsert', version, value FROM up
		)
		SELECT (SELECT version FROM up),
		       coalesce((SELECT version FROM config WHERE namespace = $1 AND key = $2), 0)`
	setConfigUpdate = `
		WITH up AS (
			UPDATE config SET value = $3, version = version + 1, updated_at = now()
			WHERE namespace = $1 AND key = $2 AND version = $4
			RETURNING version, value
		), ev AS (
			INSERT INTO config_outbox (namespace, key, op, version, payload)
			SELECT $1, $2, 'upsert', version, value FROM up
		)
		SELECT (SELECT version FROM up),
		       coalesce((SELECT version FROM config WHERE namespace = $1 AND key = $2), 0)`
	deleteConfig = `
		WITH del AS (
			DELETE FROM config WHERE namespace = $1 AND key = $2 AND ($3::bigint IS NULL OR version = $3)
			RETURNING version
		), tomb AS (
			INSERT INTO config_tombstones AS t (namespace, key, version)
			SELECT $1, $2, version + 1 FROM del
			ON CONFLICT (namespace, key) DO UPDATE
				SET version = greatest(t.version, EXCLUDED.version), deleted_at = now()
		), ev AS (
			INSERT INTO config_outbox (namespace, key, op, version)
			SELECT $1, $2, 'delete', version + 1 FROM del
		)
		SELECT EXISTS (SELECT 1 FROM del),
		       coalesce((SELECT version FROM config WHERE namespace = $1 AND key = $2), 0)`
)

// SetConfig writes a value. expected nil writes unconditionally; 0 creates
// only; N updates only version N. A mismatch is a *versioning.ConflictError.
func (c *Catalog) SetConfig(ctx context.Context, namespace, key string, value []byte, expected *int64) (version int64, err error) {
	err = versioning.RetryBelowTombstone(func() (err error) {
		version, err = c.setConfig(ctx, c.pool, namespace, key, value, expected)
		return err
	})
	return version, err
}

// rowQuerier is a pool or a transaction.
type rowQuerier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func (c *Catalog) setConfig(ctx context.Context, q rowQuerier, namespace, key string, value []byte, expected *int64) (int64, error) {
	var (
		version *int64
		current int64
		err     error
	)
	switch {
	case expected == nil:
		err = q.QueryRow(ctx, setConfigAny, namespace, key, value).Scan(&version, &current)
	case *expected == 0:
		err = q.QueryRow(ctx, setConfigCreate, namespace, key, value).Scan(&version, &current)
	default:
		err = q.QueryRow(ctx, setConfigUpdate, namespace, key, value, *expected).Scan(&version, &current)
	}
	if err != nil {
		return 0, fmt.Errorf("set config: %w", err)
	}
	if version == nil {
		if expected == nil { // an unconditional upsert always returns a row
			return 0, fmt.Errorf("set config %s/%s: no row written", namespace, key)
		}
		current = c.currentIfRaced(ctx, namespace, key, *expected, current)
		return 0, fmt.Errorf("set config %s/%s: %w", namespace, key, &versioning.ConflictError{Expected: *expected, Current: current})
	}
	return *version, nil
}

// currentIfRaced returns the value's version for a conflict report. The
// statement's snapshot says current; if that equals expected, a concurrent
// write committed after the snapshot was taken, so read it again.
func (c *Catalog) currentIfRaced(ctx context.Context, namespace, key string, expected, current int64) int64 {
	if current != expected {
		return current
	}
	var v int64
	if err := c.pool.QueryRow(ctx, `SELECT coalesce((SELECT version FROM config WHERE namespace = $1 AND key = $2), 0)`,
		namespace, key).Scan(&v); err != nil {
		return current // the write was refused either way; Current is informational
	}
	return v
}

// DeleteConfig removes a value, with the shards' delete semantics: expected
// nil deletes whatever the version; N > 0 only version N (a
// *versioning.ConflictError otherwise, Current 0 if absent); 0 never deletes (a
// conflict if the value exists). versioning.ErrNotFound if absent and expected
// is nil or 0.
func (c *Catalog) DeleteConfig(ctx context.Context, namespace, key string, expected *int64) error {
	var (
		deleted bool
		current int64
	)
	if err := c.pool.QueryRow(ctx, deleteConfig, namespace, key, expected).Scan(&deleted, &current); err != nil {
		return fmt.Errorf("delete config: %w", err)
	}
	switch {
	case deleted:
		return nil
	case expected == nil || (current == 0 && *expected == 0):
		return fmt.Errorf("config %s/%s: %w", namespace, key, versioning.ErrNotFound)
	default:
		current = c.currentIfRaced(ctx, namespace, key, *expected, current)
		return fmt.Errorf("delete config %s/%s: %w", namespace, key, &versioning.ConflictError{Expected: *expected, Current: current})
	}
}
