package shards

import (
	"context"
	"time"
)

// OutboxBacklog is what of a shard's outbox awaits its relay.
type OutboxBacklog struct {
	// Rows is the number of undelivered events, counted up to
	// BacklogCountCap (a larger backlog reads as the cap).
	Rows int64
	// Oldest is when the oldest undelivered event committed; zero when
	// nothing waits.
	Oldest time.Time
}

// BacklogCountCap bounds the rows OutboxBacklog counts, so that asking
// about a huge backlog (a relay down for hours) stays cheap.
const BacklogCountCap = 1_000_000

// outboxBacklogSQL counts the undelivered outbox rows (up to $1) and finds
// the oldest. Delivered rows stay for the retention window, so undelivered
// means above the partition's delivered tick; like the relay's read, it
// visits only partitions whose clock is past that tick, through the
// (partition, tick) index.
const outboxBacklogSQL = `
WITH pending AS (
    SELECT c.partition, coalesce(d.tick, 0) AS delivered
    FROM outbox_clock AS c
    LEFT JOIN outbox_delivered AS d ON d.partition = c.partition
    WHERE c.tick > coalesce(d.tick, 0)
)
SELECT (SELECT count(*) FROM (
            SELECT 1 FROM pending AS p JOIN outbox AS o ON o.partition = p.partition AND o.tick > p.delivered
            LIMIT $1) AS x),
       (SELECT min(o.committed_at) FROM pending AS p JOIN outbox AS o ON o.partition = p.partition AND o.tick > p.delivered)`

// OutboxBacklog reports the shard's undelivered events: how many and how
// old the oldest is. The one place that defines "undelivered".
func (s *Shard) OutboxBacklog(ctx context.Context) (OutboxBacklog, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return OutboxBacklog{}, s.wrap("outbox backlog", err)
	}
	defer c.Release()
	var (
		b      OutboxBacklog
		oldest *time.Time
	)
	if err := c.QueryRow(ctx, outboxBacklogSQL, BacklogCountCap).Scan(&b.Rows, &oldest); err != nil {
		return OutboxBacklog{}, s.wrap("outbox backlog", err)
	}
	if oldest != nil {
		b.Oldest = *oldest
	}
	return b, nil
}
