package catalog

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// ConfigOutboxRow is one config change event.
type ConfigOutboxRow struct {
	Tick        int64 // position in the config outbox clock
	EventID     string
	Namespace   string
	Key         string
	Op          string
	Version     int64
	Payload     []byte // JSON; nil when absent or left out (see ReadConfigOutbox)
	Omitted     bool   // a payload existed but was left out
	CommittedAt time.Time
}

// configOutboxColumns are a ConfigOutboxRow's columns, payloads capped at
// $3 bytes as text (a larger one reads as NULL, flagged).
const configOutboxColumns = `tick, event_id::text, namespace, key, op, version,
       CASE WHEN octet_length(payload::text) <= $3 THEN payload END,
       payload IS NOT NULL AND octet_length(payload::text) > $3,
       committed_at`

// readConfigOutboxSQL reads the undelivered rows (above the delivered
// tick) with $1 < tick < $4 in tick order, at most $2.
const readConfigOutboxSQL = `
SELECT ` + configOutboxColumns + `
FROM config_outbox
WHERE tick > $1::bigint AND tick < $4::bigint
  AND tick > coalesce((SELECT tick FROM config_outbox_delivered), 0)
ORDER BY tick
LIMIT $2`

// readConfigRangeSQL reads the rows, delivered or not, with $1 < tick <=
// $4 in tick order, at most $2.
const readConfigRangeSQL = `
SELECT ` + configOutboxColumns + `
FROM config_outbox
WHERE tick > $1::bigint AND tick <= $4::bigint
ORDER BY tick
LIMIT $2`

func scanConfigRow(row pgx.CollectableRow) (r ConfigOutboxRow, err error) {
	err = row.Scan(&r.Tick, &r.EventID, &r.Namespace, &r.Key, &r.Op, &r.Version,
		&r.Payload, &r.Omitted, &r.CommittedAt)
	return r, err
}

// ReadConfigOutbox appends to dst the undelivered config outbox rows
// (above the delivered tick, see MarkConfigDelivered) with after < tick <
// before, in tick order, at most limit of them. A payload longer than
// maxPayload bytes (as text) is left out and the row marked Omitted; a
// negative maxPayload leaves out every payload. It runs on conn: the
// config relay reads on the connection that holds its advisory lock.
func ReadConfigOutbox(ctx context.Context, conn *pgx.Conn, after, before int64, limit, maxPayload int, dst []ConfigOutboxRow) ([]ConfigOutboxRow, error) {
	rows, err := conn.Query(ctx, readConfigOutboxSQL, after, limit, maxPayload, before)
	if err == nil {
		dst, err = pgx.AppendRows(dst, rows, scanConfigRow)
	}
	if err != nil {
		return nil, fmt.Errorf("read config outbox: %w", err)
	}
	return dst, nil
}

// ReadConfigRetained appends to dst the config outbox rows, delivered or
// not, with after < tick <= upTo, in tick order, at most limit (payloads
// as in ReadConfigOutbox): what the relay publishes again into a stream
// Redis lost. It runs on conn.
func ReadConfigRetained(ctx context.Context, conn *pgx.Conn, after, upTo int64, limit, maxPayload int, dst []ConfigOutboxRow) ([]ConfigOutboxRow, error) {
	rows, err := conn.Query(ctx, readConfigRangeSQL, after, limit, maxPayload, upTo)
	if err == nil {
		dst, err = pgx.AppendRows(dst, rows, scanConfigRow)
	}
	if err != nil {
		return nil, fmt.Errorf("read retained config outbox: %w", err)
	}
	return dst, nil
}

// MarkConfigDelivered records that the config stream has been delivered
// up to tick. The delivered tick never goes down.
func MarkConfigDelivered(ctx context.Context, conn *pgx.Conn, tick int64) error {
	if _, err := conn.Exec(ctx, `
INSERT INTO config_outbox_delivered AS d (id, tick) VALUES (true, $1)
ON CONFLICT (id) DO UPDATE SET tick = EXCLUDED.tick WHERE d.tick < EXCLUDED.tick`, tick); err != nil {
		return fmt.Errorf("mark config outbox delivered: %w", err)
	}
	return nil
}

// ConfigDelivered returns the config stream's delivered tick (0: none).
func ConfigDelivered(ctx context.Context, conn *pgx.Conn) (int64, error) {
	var t int64
	if err := conn.QueryRow(ctx, `SELECT coalesce((SELECT tick FROM config_outbox_delivered), 0)`).Scan(&t); err != nil {
		return 0, fmt.Errorf("read config delivered tick: %w", err)
	}
	return t, nil
}

// ReadConfigEvents returns up to limit config outbox rows, delivered or
// not, with ticks above after, in tick order (payloads as in
// ReadConfigOutbox), and the delivered tick: the event log a Watch reads
// when its cursor is older than the config stream. A first row above
// after+1, or none though the delivered tick is above after, means the
// events after it were pruned.
func (c *Catalog) ReadConfigEvents(ctx context.Context, after int64, limit, maxPayload int) ([]ConfigOutboxRow, int64, error) {
	tx, err := c.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, 0, fmt.Errorf("read config events: %w", err)
	}
	defer tx.Rollback(ctx)
	var delivered int64
	if err := tx.QueryRow(ctx, `SELECT coalesce((SELECT tick FROM config_outbox_delivered), 0)`).Scan(&delivered); err != nil {
		return nil, 0, fmt.Errorf("read config events: %w", err)
	}
	rows, err := tx.Query(ctx, readConfigRangeSQL, after, limit, maxPayload, int64(1<<63-1))
	if err != nil {
		return nil, 0, fmt.Errorf("read config events: %w", err)
	}
	out, err := pgx.CollectRows(rows, scanConfigRow)
	if err != nil {
		return nil, 0, fmt.Errorf("read config events: %w", err)
	}
	return out, delivered, nil
}

// pruneConfigOutboxSQL is shards' pruneOutboxSQL for config_outbox.
const pruneConfigOutboxSQL = `
WITH w AS (
    SELECT seq, tick, committed_at FROM config_outbox WHERE seq > $1 ORDER BY seq LIMIT $2
), del AS (
    DELETE FROM config_outbox AS o
    USING w, config_outbox_delivered AS d
    WHERE o.seq = w.seq AND w.committed_at < $3 AND w.tick <= d.tick
    RETURNING 1
)
SELECT (SELECT count(*) FROM del), coalesce((SELECT max(seq) FROM w), $1),
       (SELECT count(*) FROM w), coalesce((SELECT bool_or(committed_at >= $3) FROM w), false)`

// PruneConfigOutbox is shards.PruneOutbox for the config outbox.
func PruneConfigOutbox(ctx context.Context, conn *pgx.Conn, cutoff time.Time, after int64, window int) (deleted, next int64, err error) {
	var (
		last, seen int64
		young      bool
	)
	if err := conn.QueryRow(ctx, pruneConfigOutboxSQL, after, window, cutoff).Scan(&deleted, &last, &seen, &young); err != nil {
		return 0, 0, fmt.Errorf("prune config outbox: %w", err)
	}
	if young || seen < int64(window) {
		return deleted, 0, nil
	}
	return deleted, last, nil
}
