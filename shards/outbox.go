package shards

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// OutboxRow is one undelivered change event in a shard's outbox.
type OutboxRow struct {
	Partition   int32
	Tick        int64 // position in the partition's outbox clock
	EventID     string
	UserID      string
	Entity      string
	Key         string
	Op          string
	Version     int64
	Payload     []byte // JSON; nil when absent or left out (see ReadOutbox)
	Omitted     bool   // a payload existed but was left out
	CommittedAt time.Time
}

// OutboxPos is a place in the outbox's (partition, tick) order.
type OutboxPos struct {
	Partition int32
	Tick      int64
}

// readOutboxSQL reads the rows after ($1, $2) and before ($5, $6) in
// (partition, tick) order, at most $3, with payloads of at most $4 bytes
// as text (a larger one reads as NULL, flagged).
const readOutboxSQL = `
SELECT partition, tick, event_id::text, user_id, entity, key, op, version,
       CASE WHEN octet_length(payload::text) <= $4 THEN payload END,
       payload IS NOT NULL AND octet_length(payload::text) > $4,
       committed_at
FROM outbox
WHERE (partition, tick) > ($1::integer, $2::bigint) AND (partition, tick) < ($5::integer, $6::bigint)
ORDER BY partition, tick
LIMIT $3`

// ReadOutbox appends to dst the outbox rows after `after` and before end,
// in (partition, tick) order, at most limit of them. A payload longer than
// maxPayload bytes (as text) is left out and the row marked Omitted; a
// negative maxPayload leaves out every payload. It runs on conn: an outbox
// relay reads on the connection that holds its advisory lock and LISTEN.
func ReadOutbox(ctx context.Context, conn *pgx.Conn, after, end OutboxPos, limit, maxPayload int, dst []OutboxRow) ([]OutboxRow, error) {
	rows, err := conn.Query(ctx, readOutboxSQL, after.Partition, after.Tick, limit, maxPayload, end.Partition, end.Tick)
	if err == nil {
		dst, err = pgx.AppendRows(dst, rows, func(row pgx.CollectableRow) (r OutboxRow, err error) {
			err = row.Scan(&r.Partition, &r.Tick, &r.EventID, &r.UserID, &r.Entity, &r.Key, &r.Op, &r.Version,
				&r.Payload, &r.Omitted, &r.CommittedAt)
			return r, err
		})
	}
	if err != nil {
		return nil, fmt.Errorf("read shard outbox: %w", err)
	}
	return dst, nil
}

// TrimOutbox deletes delivered outbox rows: row i is (partitions[i],
// ticks[i]). It runs on the caller's connection, like ReadOutbox.
func TrimOutbox(ctx context.Context, conn *pgx.Conn, partitions []int32, ticks []int64) error {
	if _, err := conn.Exec(ctx, `DELETE FROM outbox WHERE (partition, tick) IN (SELECT * FROM unnest($1::integer[], $2::bigint[]))`,
		partitions, ticks); err != nil {
		return fmt.Errorf("trim shard outbox: %w", err)
	}
	return nil
}
