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

// Import states, as stored in the catalog.
const (
	ImportBulk      = "bulk"      // copying the snapshot
	ImportFollowing = "following" // snapshot copied; source changes are applied
	ImportCutOver   = "cut_over"  // done: following stopped, slot dropped
	ImportCancelled = "cancelled"
)

// ErrNoImport means the catalog has no import of that name.
var ErrNoImport = errors.New("no such import")

// ImportRecord is an import as the catalog records it.
type ImportRecord struct {
	Name             string
	State            string
	MappingHash      string
	SourceID         string
	Publication      string
	Slot             string
	StartLSN         string // "" until the slot exists
	AppliedLSN       string // "" until the follower confirmed something
	AppliedAt        time.Time
	Events           bool
	CutoverRequested bool
	Error            string
	CreatedAt        time.Time
	UpdatedAt        time.Time
}

// ImportTable is one mapped table's progress.
type ImportTable struct {
	Name         string
	Position     int
	TotalRows    int64
	LastKey      []string // nil: nothing copied yet
	RowsCopied   int64
	RowsRejected int64
	Done         bool
	Inserts      int64
	Updates      int64
	Deletes      int64
	PendingSince time.Time // zero: nothing pending
	PendingLSN   string
}

// CreateImport records a new import and its tables (in mapping order). An
// import of that name that exists is an error, unless it was cancelled or
// cut over, in which case it is replaced.
func (c *Catalog) CreateImport(ctx context.Context, rec ImportRecord, tables []string) error {
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `DELETE FROM imports WHERE name = $1 AND state IN ('cancelled', 'cut_over')`, rec.Name); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `
			INSERT INTO imports (name, mapping_hash, source_id, publication, slot, events)
			VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING`,
			rec.Name, rec.MappingHash, rec.SourceID, rec.Publication, rec.Slot, rec.Events)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("import %s exists", rec.Name)
		}
		for i, t := range tables {
			if _, err := tx.Exec(ctx, `INSERT INTO import_tables (import, name, position) VALUES ($1, $2, $3)`, rec.Name, t, i); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("create import: %w", err)
	}
	return nil
}

// GetImport reads an import and its tables; ErrNoImport if there is none.
func (c *Catalog) GetImport(ctx context.Context, name string) (ImportRecord, []ImportTable, error) {
	var (
		r       ImportRecord
		tables  []ImportTable
		start   *string
		applied *string
		at      *time.Time
		errText *string
	)
	err := pgx.BeginTxFunc(ctx, c.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `
			SELECT name, state, mapping_hash, source_id, publication, slot, start_lsn, applied_lsn, applied_at,
			       events, cutover_requested, error, created_at, updated_at
			FROM imports WHERE name = $1`, name).Scan(&r.Name, &r.State, &r.MappingHash, &r.SourceID, &r.Publication,
			&r.Slot, &start, &applied, &at, &r.Events, &r.CutoverRequested, &errText, &r.CreatedAt, &r.UpdatedAt)
		if err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `
			SELECT name, position, total_rows, last_key, rows_copied, rows_rejected, done,
			       inserts, updates, deletes, coalesce(pending_since, 'epoch'), coalesce(pending_lsn, '')
			FROM import_tables WHERE import = $1 ORDER BY position`, name)
		if err != nil {
			return err
		}
		tables, err = pgx.CollectRows(rows, pgx.RowToStructByPos[ImportTable])
		return err
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return ImportRecord{}, nil, fmt.Errorf("import %s: %w", name, ErrNoImport)
	}
	if err != nil {
		return ImportRecord{}, nil, fmt.Errorf("get import: %w", err)
	}
	for i := range tables {
		if tables[i].PendingSince.Equal(time.Unix(0, 0)) {
			tables[i].PendingSince = time.Time{}
		}
	}
	if start != nil {
		r.StartLSN = *start
	}
	if applied != nil {
		r.AppliedLSN = *applied
	}
	if at != nil {
		r.AppliedAt = *at
	}
	if errText != nil {
		r.Error = *errText
	}
	return r, tables, nil
}

// SetImportStart records the LSN the import's slot was created at.
func (c *Catalog) SetImportStart(ctx context.Context, name, lsn string) error {
	return c.execImport(ctx, "set import start", `UPDATE imports SET start_lsn = $2, updated_at = now() WHERE name = $1`, name, lsn)
}

// SetImportState moves an import to state; errText ("" for none) is kept
// as its last error.
func (c *Catalog) SetImportState(ctx context.Context, name, state, errText string) error {
	return c.execImport(ctx, "set import state", `
		UPDATE imports SET state = $2, error = nullif($3, ''), updated_at = now() WHERE name = $1`, name, state, errText)
}

// SetImportError records the error that stopped an import ("" clears it).
func (c *Catalog) SetImportError(ctx context.Context, name, errText string) error {
	return c.execImport(ctx, "set import error", `UPDATE imports SET error = nullif($2, ''), updated_at = now() WHERE name = $1`, name, errText)
}

// RequestCutover asks the import's follower to stop once caught up.
func (c *Catalog) RequestCutover(ctx context.Context, name string) error {
	return c.execImport(ctx, "request cutover", `UPDATE imports SET cutover_requested = true, updated_at = now() WHERE name = $1`, name)
}

// SetImportTableTotal records how many rows a table has to copy.
func (c *Catalog) SetImportTableTotal(ctx context.Context, name, table string, total int64) error {
	return c.execImport(ctx, "set import table total", `
		UPDATE import_tables SET total_rows = $3 WHERE import = $1 AND name = $2`, name, table, total)
}

// CheckpointImportTable records that every source row of table up to
// lastKey is written (rows copied and rejected so far, in total), and with
// done that the table is copied.
func (c *Catalog) CheckpointImportTable(ctx context.Context, name, table string, lastKey []string, copied, rejected int64, done bool) error {
	return c.execImport(ctx, "checkpoint import", `
		UPDATE import_tables SET last_key = coalesce($3, last_key), rows_copied = $4, rows_rejected = $5, done = $6
		WHERE import = $1 AND name = $2`, name, table, lastKey, copied, rejected, done)
}

// FollowTableProgress is what a follower adds to a table's counters.
type FollowTableProgress struct {
	Name                      string
	Inserts, Updates, Deletes int64
	PendingSince              time.Time // zero: nothing pending
	PendingLSN                string
}

// RecordFollow records the follower's confirmed position and per-table
// progress in one transaction.
func (c *Catalog) RecordFollow(ctx context.Context, name, appliedLSN string, appliedAt time.Time, tables []FollowTableProgress) error {
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `UPDATE imports SET applied_lsn = $2, applied_at = $3, updated_at = now() WHERE name = $1`,
			name, appliedLSN, appliedAt); err != nil {
			return err
		}
		for _, t := range tables {
			var since *time.Time
			if !t.PendingSince.IsZero() {
				since = &t.PendingSince
			}
			if _, err := tx.Exec(ctx, `
				UPDATE import_tables SET inserts = inserts + $3, updates = updates + $4, deletes = deletes + $5,
				       pending_since = $6, pending_lsn = nullif($7, '')
				WHERE import = $1 AND name = $2`, name, t.Name, t.Inserts, t.Updates, t.Deletes, since, t.PendingLSN); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("record follow: %w", err)
	}
	return nil
}

// DeleteImport removes an import's records.
func (c *Catalog) DeleteImport(ctx context.Context, name string) error {
	return c.execImport(ctx, "delete import", `DELETE FROM imports WHERE name = $1`, name)
}

func (c *Catalog) execImport(ctx context.Context, op, sql string, args ...any) error {
	tag, err := c.pool.Exec(ctx, sql, args...)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%s: import %v: %w", op, args[0], ErrNoImport)
	}
	return nil
}

// ImportConfigEntry is one config value of a bulk import.
type ImportConfigEntry struct {
	Namespace string
	Key       string
	Value     []byte // JSON
}

// importConfigSQL upserts config values (the last of a key wins) with
// PutConfig's version rules; an unchanged value keeps its version. Unlike
// user data, config always writes its events: they are what invalidates the
// routers' cached copies.
const importConfigSQL = `
WITH src AS (
    SELECT DISTINCT ON (namespace, key) namespace, key, value
    FROM unnest($1::text[], $2::text[], $3::jsonb[]) WITH ORDINALITY AS s (namespace, key, value, seq)
    ORDER BY namespace, key, seq DESC
), up AS (
    INSERT INTO config AS c (namespace, key, value, version)
    SELECT * FROM (
        SELECT s.namespace, s.key, s.value,
               greatest(t.version, (SELECT version_floor FROM config_outbox_clock), 0) + 1
        FROM src AS s LEFT JOIN config_tombstones AS t ON t.namespace = s.namespace AND t.key = s.key
    ) AS n
    ON CONFLICT (namespace, key) DO UPDATE
        SET value = EXCLUDED.value, version = c.version + 1, updated_at = now()
        WHERE c.value IS DISTINCT FROM EXCLUDED.value
    RETURNING c.namespace, c.key, c.version, c.value
), ev AS (
    INSERT INTO config_outbox (namespace, key, op, version, payload)
    SELECT namespace, key, 'upsert', version, value FROM up ORDER BY namespace, key
)
SELECT count(*) FROM up`

// ImportConfig writes a batch of config values in one transaction and
// returns how many it inserted or changed.
func (c *Catalog) ImportConfig(ctx context.Context, entries []ImportConfigEntry) (int64, error) {
	ns := make([]string, len(entries))
	keys := make([]string, len(entries))
	vals := make([]string, len(entries))
	for i, e := range entries {
		ns[i], keys[i], vals[i] = e.Namespace, e.Key, string(e.Value)
	}
	var n int64
	err := versioning.RetryBelowTombstone(func() error {
		return c.pool.QueryRow(ctx, importConfigSQL, ns, keys, vals).Scan(&n)
	})
	if err != nil {
		return 0, fmt.Errorf("import config: %w", err)
	}
	return n, nil
}

// LookupConfig returns the values of those of the keys (namespace, key
// pairs) that exist.
func (c *Catalog) LookupConfig(ctx context.Context, namespaces, keys []string) (map[[2]string][]byte, error) {
	rows, err := c.pool.Query(ctx, `
		SELECT c.namespace, c.key, c.value FROM unnest($1::text[], $2::text[]) AS k (namespace, key)
		JOIN config AS c ON c.namespace = k.namespace AND c.key = k.key`, namespaces, keys)
	if err != nil {
		return nil, fmt.Errorf("lookup config: %w", err)
	}
	out := map[[2]string][]byte{}
	var (
		ns, k string
		v     []byte
	)
	_, err = pgx.ForEachRow(rows, []any{&ns, &k, &v}, func() error {
		out[[2]string{ns, k}] = v
		v = nil
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("lookup config: %w", err)
	}
	return out, nil
}

// CountConfig counts the config values of the given namespaces.
func (c *Catalog) CountConfig(ctx context.Context, namespaces []string) (int64, error) {
	var n int64
	if err := c.pool.QueryRow(ctx, `SELECT count(*) FROM config WHERE namespace = ANY($1)`, namespaces).Scan(&n); err != nil {
		return 0, fmt.Errorf("count config: %w", err)
	}
	return n, nil
}

// PurgeConfig deletes config values, with tombstones and delete events.
func (c *Catalog) PurgeConfig(ctx context.Context, namespaces, keys []string) (int64, error) {
	var n int64
	err := c.pool.QueryRow(ctx, `
		WITH k AS (SELECT DISTINCT namespace, key FROM unnest($1::text[], $2::text[]) AS k (namespace, key)),
		del AS (
			DELETE FROM config AS c USING k WHERE c.namespace = k.namespace AND c.key = k.key
			RETURNING c.namespace, c.key, c.version
		), tomb AS (
			INSERT INTO config_tombstones AS t (namespace, key, version)
			SELECT namespace, key, version + 1 FROM del
			ON CONFLICT (namespace, key) DO UPDATE SET version = greatest(t.version, EXCLUDED.version), deleted_at = now()
		), ev AS (
			INSERT INTO config_outbox (namespace, key, op, version)
			SELECT namespace, key, 'delete', version + 1 FROM del ORDER BY namespace, key
		)
		SELECT count(*) FROM del`, namespaces, keys).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("purge config: %w", err)
	}
	return n, nil
}

// ExportConfig hands every config value to fn, in (namespace, key) order,
// from one snapshot.
func (c *Catalog) ExportConfig(ctx context.Context, fn func(ConfigEntry) error) error {
	rows, err := c.pool.Query(ctx, `SELECT namespace, key, value, version, updated_at FROM config ORDER BY namespace, key`)
	if err != nil {
		return fmt.Errorf("export config: %w", err)
	}
	var e ConfigEntry
	if _, err := pgx.ForEachRow(rows, []any{&e.Namespace, &e.Key, &e.Value, &e.Version, &e.UpdatedAt}, func() error {
		return fn(e)
	}); err != nil {
		return fmt.Errorf("export config: %w", err)
	}
	return nil
}

// ErrImportBusy means another process runs the import's bulk or follow
// phase.
var ErrImportBusy = errors.New("another process is running this import (its bulk or follow phase)")

// importLockGrace is how long LockImport keeps trying a taken lock. A
// process killed a moment ago holds it until Postgres notices that its
// connection closed, and restarting a killed import at once is the normal
// thing to do.
const importLockGrace = 5 * time.Second

// LockImport admits one process at a time to an import's bulk or follow
// phase: it holds a session advisory lock on a catalog connection until
// release is called (or the process dies). ErrImportBusy if it is still
// taken after importLockGrace.
func (c *Catalog) LockImport(ctx context.Context, name string) (release func(), err error) {
	conn, err := c.pool.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("lock import: %w", err)
	}
	deadline := time.Now().Add(importLockGrace)
	for {
		var ok bool
		if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, pglock.ClassImport, name).Scan(&ok); err != nil {
			conn.Release()
			return nil, fmt.Errorf("lock import: %w", err)
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			conn.Release()
			return nil, fmt.Errorf("import %s: %w", name, ErrImportBusy)
		}
		select {
		case <-ctx.Done():
			conn.Release()
			return nil, fmt.Errorf("lock import: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := conn.Exec(ctx, `SELECT pg_advisory_unlock($1, hashtext($2))`, pglock.ClassImport, name); err != nil {
			// A lock left on a pooled connection would outlive us: drop it.
			conn.Conn().Close(ctx)
		}
		conn.Release()
	}, nil
}
