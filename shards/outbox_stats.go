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
// the oldest. Every row in the outbox is undelivered: the relay deletes a
// row once it is in Redis.
const outboxBacklogSQL = `
SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT $1) o),
       (SELECT min(committed_at) FROM outbox)`

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
