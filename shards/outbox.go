package shards

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// OutboxRow is one change event in a shard's outbox.
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

// outboxColumns are an OutboxRow's columns of outbox AS o, payloads capped
// at $4 bytes as text (a larger one reads as NULL, flagged).
const outboxColumns = `o.partition, o.tick, o.event_id::text, o.user_id, o.entity, o.key, o.op, o.version,
       CASE WHEN octet_length(o.payload::text) <= $4 THEN o.payload END,
       o.payload IS NOT NULL AND octet_length(o.payload::text) > $4,
       o.committed_at`

// readOutboxSQL reads the undelivered rows after ($1, $2) and before ($5,
// $6) in (partition, tick) order, at most $3. Delivered rows stay for the
// retention window, so it starts from the partitions whose clock is past
// their delivered tick, in partition order, and reads each from that tick
// on through the (partition, tick) index: the retained rows are never
// scanned, and the partitions after the first $3 rows are not read at all.
// The bounds are on tick alone inside the lateral read, so the index scan
// stops at the limit (a row comparison there reads the partition's whole
// backlog and sorts it); the relay's connection turns bitmap scans off for
// the same reason (see events.Relay).
const readOutboxSQL = `
SELECT ` + outboxColumns + `
FROM (
    SELECT c.partition, coalesce(d.tick, 0) AS delivered
    FROM outbox_clock AS c
    LEFT JOIN outbox_delivered AS d ON d.partition = c.partition
    WHERE c.tick > coalesce(d.tick, 0) AND c.partition >= $1::integer AND c.partition <= $5::integer
    ORDER BY c.partition
) AS c
CROSS JOIN LATERAL (
    SELECT * FROM outbox AS o
    WHERE o.partition = c.partition
      AND o.tick > greatest(c.delivered, CASE WHEN c.partition = $1::integer THEN $2::bigint ELSE 0 END)
      AND o.tick < CASE WHEN c.partition = $5::integer THEN $6::bigint ELSE 9223372036854775807 END
    ORDER BY o.tick
    LIMIT $3
) AS o
ORDER BY c.partition, o.tick
LIMIT $3`

func scanOutboxRow(row pgx.CollectableRow) (r OutboxRow, err error) {
	err = row.Scan(&r.Partition, &r.Tick, &r.EventID, &r.UserID, &r.Entity, &r.Key, &r.Op, &r.Version,
		&r.Payload, &r.Omitted, &r.CommittedAt)
	return r, err
}

// ReadOutbox appends to dst the undelivered outbox rows (above their
// partition's delivered tick) after `after` and before end, in (partition,
// tick) order, at most limit of them. A payload longer than maxPayload
// bytes (as text) is left out and the row marked Omitted; a negative
// maxPayload leaves out every payload. It runs on conn: an outbox relay
// reads on the connection that holds its advisory lock.
func ReadOutbox(ctx context.Context, conn *pgx.Conn, after, end OutboxPos, limit, maxPayload int, dst []OutboxRow) ([]OutboxRow, error) {
	rows, err := conn.Query(ctx, readOutboxSQL, after.Partition, after.Tick, limit, maxPayload, end.Partition, end.Tick)
	if err == nil {
		dst, err = pgx.AppendRows(dst, rows, scanOutboxRow)
	}
	if err != nil {
		return nil, fmt.Errorf("read shard outbox: %w", err)
	}
	return dst, nil
}

// readOutboxPartitionsSQL is readOutboxSQL for the partitions $1 only,
// each from its delivered tick: what a relay reads when wake-ups named the
// partitions written (events.Relay). It reads just their clock rows, where
// readOutboxSQL reads every partition's, the most of a busy relay's cost.
// Each partition's rows are looked up by key from the array: as a join
// (partition = ANY($1)), the generic plan hashed all of outbox_delivered,
// costing what a whole pass does.
var readOutboxPartitionsSQL = `
SELECT ` + strings.ReplaceAll(outboxColumns, "$4", "$3") + `
FROM (
    SELECT c.partition, c.delivered FROM (
        SELECT c.partition, c.tick,
               coalesce((SELECT d.tick FROM outbox_delivered AS d WHERE d.partition = c.partition), 0) AS delivered
        FROM unnest($1::integer[]) AS h (partition)
        JOIN outbox_clock AS c ON c.partition = h.partition
    ) AS c
    WHERE c.tick > c.delivered
    ORDER BY c.partition
) AS c
CROSS JOIN LATERAL (
    SELECT * FROM outbox AS o
    WHERE o.partition = c.partition AND o.tick > c.delivered
    ORDER BY o.tick
    LIMIT $2
) AS o
ORDER BY c.partition, o.tick
LIMIT $2`

// ReadOutboxPartitions is ReadOutbox for the undelivered rows of
// partitions only, in (partition, tick) order, at most limit of them.
func ReadOutboxPartitions(ctx context.Context, conn *pgx.Conn, partitions []int32, limit, maxPayload int, dst []OutboxRow) ([]OutboxRow, error) {
	rows, err := conn.Query(ctx, readOutboxPartitionsSQL, partitions, limit, maxPayload)
	if err == nil {
		dst, err = pgx.AppendRows(dst, rows, scanOutboxRow)
	}
	if err != nil {
		return nil, fmt.Errorf("read shard outbox partitions: %w", err)
	}
	return dst, nil
}

// MarkDelivered records that partition partitions[i] has been delivered
// up to ticks[i] (one entry per partition). A partition's delivered tick
// never goes down: an older relay's late write changes nothing.
//
// Only partitions whose clock row is here, and not being deleted, are
// marked. A move that is cancelled or cleaned up deletes a partition's
// rows table by table, the clock first (DeletePartitions); a relay that
// read the partition's events before that and marked them after it
// re-created its delivered row, which then stayed on a shard that no
// longer holds the partition. The mark takes the clock row FOR KEY SHARE
// (writers' tick updates do not conflict with it), so a deletion waits for
// the mark and then deletes its row too; a clock row already being
// deleted is skipped, not waited for, so the relay never waits on a
// cleanup. A skipped mark at worst publishes events again, which Redis
// refuses as copies.
func MarkDelivered(ctx context.Context, conn *pgx.Conn, partitions []int32, ticks []int64) error {
	if _, err := conn.Exec(ctx, `
INSERT INTO outbox_delivered AS d (partition, tick)
SELECT u.partition, u.tick FROM unnest($1::integer[], $2::bigint[]) AS u (partition, tick)
WHERE EXISTS (SELECT FROM outbox_clock AS c WHERE c.partition = u.partition FOR KEY SHARE SKIP LOCKED)
ON CONFLICT (partition) DO UPDATE SET tick = EXCLUDED.tick WHERE d.tick < EXCLUDED.tick`,
		partitions, ticks); err != nil {
		return fmt.Errorf("mark shard outbox delivered: %w", err)
	}
	return nil
}

// DeliveredTicks returns every partition's delivered tick above 0.
func DeliveredTicks(ctx context.Context, conn *pgx.Conn) (map[int32]int64, error) {
	rows, err := conn.Query(ctx, `SELECT partition, tick FROM outbox_delivered WHERE tick > 0`)
	if err != nil {
		return nil, fmt.Errorf("read delivered ticks: %w", err)
	}
	out := map[int32]int64{}
	var (
		p int32
		t int64
	)
	if _, err := pgx.ForEachRow(rows, []any{&p, &t}, func() error { out[p] = t; return nil }); err != nil {
		return nil, fmt.Errorf("read delivered ticks: %w", err)
	}
	return out, nil
}

// readRetainedSQL reads partition $1's rows with $2 < tick <= $5, at most
// $3, payloads as in readOutboxSQL.
const readRetainedSQL = `
SELECT ` + outboxColumns + `
FROM outbox AS o
WHERE o.partition = $1 AND o.tick > $2 AND o.tick <= $5
ORDER BY o.tick
LIMIT $3`

// ReadRetained appends to dst partition's outbox rows, delivered or not,
// with after < tick <= upTo, in tick order, at most limit (payloads as in
// ReadOutbox): what a relay publishes again into a stream Redis lost. It
// runs on conn, like ReadOutbox.
func ReadRetained(ctx context.Context, conn *pgx.Conn, partition int32, after, upTo int64, limit, maxPayload int, dst []OutboxRow) ([]OutboxRow, error) {
	rows, err := conn.Query(ctx, readRetainedSQL, partition, after, limit, maxPayload, upTo)
	if err == nil {
		dst, err = pgx.AppendRows(dst, rows, scanOutboxRow)
	}
	if err != nil {
		return nil, fmt.Errorf("read retained shard outbox: %w", err)
	}
	return dst, nil
}

// readEventsSQL reads, fenced like every read, partition $1's rows after
// tick $2, at most $3, payloads as in readOutboxSQL, with the partition's
// state and delivered tick on every row (one row of NULL events if none).
const readEventsSQL = `
SELECT ow.state, coalesce((SELECT tick FROM outbox_delivered WHERE partition = $1), 0),
       o.partition, o.tick, o.event_id, o.user_id, o.entity, o.key, o.op, o.version, o.payload, o.omitted, o.committed_at
FROM ownership AS ow
LEFT JOIN LATERAL (
    SELECT o.partition, o.tick, o.event_id::text AS event_id, o.user_id, o.entity, o.key, o.op, o.version,
           CASE WHEN octet_length(o.payload::text) <= $4 THEN o.payload END AS payload,
           o.payload IS NOT NULL AND octet_length(o.payload::text) > $4 AS omitted,
           o.committed_at
    FROM outbox AS o
    WHERE o.partition = $1 AND o.tick > $2
    ORDER BY o.tick
    LIMIT $3
) AS o ON true
WHERE ow.partition = $1
ORDER BY o.tick`

// ReadEvents returns up to limit of partition's outbox rows, delivered or
// not, with ticks above after, in tick order (payloads as in ReadOutbox),
// and the partition's delivered tick: the event log a Watch reads when its
// cursor is older than the stream. A first row above after+1, or none
// though the delivered tick is above after, means the events after it
// were pruned. ErrWrongShard unless the partition is owned or frozen.
func (s *Shard) ReadEvents(ctx context.Context, partition int32, after int64, limit, maxPayload int) ([]OutboxRow, int64, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return nil, 0, s.wrap("read events", err)
	}
	defer c.Release()
	rows, err := c.Query(ctx, readEventsSQL, partition, after, limit, maxPayload)
	if err != nil {
		return nil, 0, s.wrap("read events", err)
	}
	var (
		out       []OutboxRow
		state     string
		delivered int64
		seen      bool
	)
	for rows.Next() {
		seen = true
		var (
			r                         OutboxRow
			part                      pgtype.Int4
			tick, version             pgtype.Int8
			id, user, entity, key, op pgtype.Text
			omitted                   pgtype.Bool
			committed                 pgtype.Timestamptz
		)
		if err := rows.Scan(&state, &delivered, &part, &tick, &id, &user, &entity, &key, &op, &version,
			&r.Payload, &omitted, &committed); err != nil {
			return nil, 0, s.wrap("read events", err)
		}
		if !readable(state) {
			rows.Close()
			return nil, 0, s.wrap("read events", wrongShard(partition))
		}
		if !tick.Valid {
			continue // no events after `after`
		}
		r.Partition, r.Tick, r.EventID, r.UserID, r.Entity, r.Key, r.Op, r.Version = part.Int32, tick.Int64,
			id.String, user.String, entity.String, key.String, op.String, version.Int64
		r.Omitted, r.CommittedAt = omitted.Bool, committed.Time
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, 0, s.wrap("read events", err)
	}
	if !seen {
		return nil, 0, s.wrap("read events", wrongShard(partition))
	}
	return out, delivered, nil
}

// pruneOutboxSQL looks at the $2 outbox rows after seq $1 (seq order is
// about commit order) and deletes those committed before $3 that are
// delivered. It returns how many it deleted, the window's last seq, its
// size, and whether it reached a row committed at or after $3.
const pruneOutboxSQL = `
WITH w AS (
    SELECT partition, seq, tick, committed_at FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2
), del AS (
    DELETE FROM outbox AS o
    USING w JOIN outbox_delivered AS d ON d.partition = w.partition
    WHERE o.partition = w.partition AND o.seq = w.seq AND w.committed_at < $3 AND w.tick <= d.tick
    RETURNING 1
)
SELECT (SELECT count(*) FROM del), coalesce((SELECT max(seq) FROM w), $1),
       (SELECT count(*) FROM w), coalesce((SELECT bool_or(committed_at >= $3) FROM w), false)`

// PruneOutbox deletes delivered outbox rows committed before cutoff,
// looking at up to window rows after seq `after` in seq order. It returns
// the rows deleted and, when more may be prunable past the window, the
// seq to go on after (0 when done: the window reached rows younger than
// cutoff, or the end). Rows undelivered (a quarantined partition's) are
// passed over and stay. The deletes wait for no writer: no trigger fires
// on them and writers never touch old rows. It runs on conn.
func PruneOutbox(ctx context.Context, conn *pgx.Conn, cutoff time.Time, after int64, window int) (deleted, next int64, err error) {
	var (
		last, seen int64
		young      bool
	)
	if err := conn.QueryRow(ctx, pruneOutboxSQL, after, window, cutoff).Scan(&deleted, &last, &seen, &young); err != nil {
		return 0, 0, fmt.Errorf("prune shard outbox: %w", err)
	}
	if young || seen < int64(window) {
		return deleted, 0, nil
	}
	return deleted, last, nil
}
