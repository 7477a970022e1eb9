package catalog

import (
	"context"
	"fmt"
	"time"
)

// ConfigOutboxBacklog reports the config outbox's undelivered events: how
// many (counted up to limit) and when the oldest committed (zero when
// none waits). The one place that defines "undelivered" for the config
// outbox: the rows above the relay's delivered tick (delivered ones stay
// for the retention window).
func (c *Catalog) ConfigOutboxBacklog(ctx context.Context, limit int64) (rows int64, oldest time.Time, err error) {
	var t *time.Time
	err = c.pool.QueryRow(ctx, `
		WITH pending AS (
		    SELECT tick, committed_at FROM config_outbox
		    WHERE tick > coalesce((SELECT tick FROM config_outbox_delivered), 0))
		SELECT (SELECT count(*) FROM (SELECT 1 FROM pending LIMIT $1) o),
		       (SELECT min(committed_at) FROM pending)`, limit).Scan(&rows, &t)
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("config outbox backlog: %w", err)
	}
	if t != nil {
		oldest = *t
	}
	return rows, oldest, nil
}
