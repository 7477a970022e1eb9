package shards

import (
	"context"
)

// SizeSample is what a shard holds, estimated cheaply from PostgreSQL's
// statistics (not counted): it lags the truth by up to an autovacuum/
// analyze round, which is fine for dashboards and useless for checks.
type SizeSample struct {
	// Rows is the estimated number of live rows of users, sessions and
	// items.
	Rows int64
	// Bytes is the size of the shard's database on disk.
	Bytes int64
}

// SampleSize estimates the shard's rows and bytes (see SizeSample).
func (s *Shard) SampleSize(ctx context.Context) (SizeSample, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return SizeSample{}, s.wrap("sample size", err)
	}
	defer c.Release()
	var z SizeSample
	err = c.QueryRow(ctx, `
		SELECT coalesce((SELECT sum(n_live_tup) FROM pg_stat_user_tables
		                 WHERE schemaname = current_schema() AND relname IN ('users', 'sessions', 'items')), 0)::bigint,
		       pg_database_size(current_database())`).Scan(&z.Rows, &z.Bytes)
	if err != nil {
		return SizeSample{}, s.wrap("sample size", err)
	}
	return z, nil
}
