package catalog

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// ConfigOutboxRow is one undelivered config change event.
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

// readConfigOutboxSQL reads the rows with $1 < tick < $4 in tick order, at
// most $2, with payloads of at most $3 bytes as text (a larger one reads as
// NULL, flagged).
const readConfigOutboxSQL = `
SELECT tick, event_id::text, namespace, key, op, version,
       CASE WHEN octet_length(payload::text) <= $3 THEN payload END,
       payload IS NOT NULL AND octet_length(payload::text) > $3,
       committed_at
FROM config_outbox
WHERE tick > $1::bigint AND tick < $4::bigint
ORDER BY tick
LIMIT $2`

// ReadConfigOutbox appends to dst the config outbox rows with after < tick
// < before, in tick order, at most limit of them. A payload longer than
// maxPayload bytes (as text) is left out and the row marked Omitted; a
// negative maxPayload leaves out every payload. It runs on conn: the
// config relay reads on the connection that holds its advisory lock and
// LISTEN.
func ReadConfigOutbox(ctx context.Context, conn *pgx.Conn, after, before int64, limit, maxPayload int, dst []ConfigOutboxRow) ([]ConfigOutboxRow, error) {
	rows, err := conn.Query(ctx, readConfigOutboxSQL, after, limit, maxPayload, before)
	if err == nil {
		dst, err = pgx.AppendRows(dst, rows, func(row pgx.CollectableRow) (r ConfigOutboxRow, err error) {
			err = row.Scan(&r.Tick, &r.EventID, &r.Namespace, &r.Key, &r.Op, &r.Version,
				&r.Payload, &r.Omitted, &r.CommittedAt)
			return r, err
		})
	}
	if err != nil {
		return nil, fmt.Errorf("read config outbox: %w", err)
	}
	return dst, nil
}

// TrimConfigOutbox deletes delivered config outbox rows by tick. It runs
// on the caller's connection, like ReadConfigOutbox.
func TrimConfigOutbox(ctx context.Context, conn *pgx.Conn, ticks []int64) error {
	if _, err := conn.Exec(ctx, `DELETE FROM config_outbox WHERE tick = ANY ($1::bigint[])`, ticks); err != nil {
		return fmt.Errorf("trim config outbox: %w", err)
	}
	return nil
}
