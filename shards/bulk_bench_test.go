package shards

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
)

// BenchmarkImportUsers writes batches of new users through ImportUsers and,
// as baselines on the same database in the same run, COPYs the same rows
// into a plain table ("copy") and imports them with the per-row floor
// trigger of shard migration 00006 in place of 00011's per-statement one
// ("row-trigger"). Compare rows/s across the sub-benchmarks:
//
//	go test ./shards -run '^$' -bench ImportUsers -count 3
func BenchmarkImportUsers(b *testing.B) {
	const batch = 5000
	parts := make([]int32, 64)
	for i := range parts {
		parts[i] = int32(i)
	}
	profile := []byte(`{"email": "someone@example.com", "name": "Some One", "created_at": "2020-01-01T00:00:00Z"}`)
	rows := func(prefix string, n int) []ImportUser {
		out := make([]ImportUser, batch)
		for i := range out {
			out[i] = ImportUser{Partition: int32(i % len(parts)), UserID: fmt.Sprintf("%s-%d-%d", prefix, n, i), Profile: profile}
		}
		return out
	}
	s := newShard(b, parts...)
	ctx := context.Background() // testCtx's 30 s are too short for -count
	exec(b, s, `INSERT INTO outbox_clock (partition, tick, version_floor) SELECT p, 0, 5 FROM generate_series(0, 63) AS p`)
	exec(b, s, `CREATE TABLE baseline (partition integer, user_id text, profile jsonb)`)
	report := func(b *testing.B) {
		b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "rows/s")
	}

	b.Run("import", func(b *testing.B) {
		for n := range b.N {
			if _, err := s.ImportUsers(ctx, rows("s", n), false); err != nil {
				b.Fatal(err)
			}
		}
		report(b)
	})
	b.Run("row-trigger", func(b *testing.B) {
		exec(b, s, `DROP TRIGGER users_above_floor ON users;
			CREATE TRIGGER users_above_floor AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION created_above_floor()`)
		defer exec(b, s, `DROP TRIGGER users_above_floor ON users;
			CREATE TRIGGER users_above_floor AFTER INSERT ON users REFERENCING NEW TABLE AS created
			FOR EACH STATEMENT EXECUTE FUNCTION created_rows_above_floor()`)
		for n := range b.N {
			if _, err := s.ImportUsers(ctx, rows("r", n), false); err != nil {
				b.Fatal(err)
			}
		}
		report(b)
	})
	b.Run("items", func(b *testing.B) {
		for n := range b.N {
			b.StopTimer() // the users the items need are not measured
			us := rows("i", n)
			if _, err := s.ImportUsers(ctx, us, false); err != nil {
				b.Fatal(err)
			}
			items := make([]ImportItem, len(us))
			for i, u := range us {
				items[i] = ImportItem{Partition: u.Partition, UserID: u.UserID, Collection: "settings", Key: "theme", Value: []byte(`{"dark": true, "size": 3}`)}
			}
			b.StartTimer()
			if _, err := s.ImportItems(ctx, items, false, false); err != nil {
				b.Fatal(err)
			}
		}
		report(b)
	})
	b.Run("copy", func(b *testing.B) {
		for n := range b.N {
			rs := rows("c", n)
			_, err := s.pool.CopyFrom(ctx, pgx.Identifier{"baseline"}, []string{"partition", "user_id", "profile"},
				pgx.CopyFromSlice(len(rs), func(i int) ([]any, error) {
					return []any{rs[i].Partition, rs[i].UserID, rs[i].Profile}, nil
				}))
			if err != nil {
				b.Fatal(err)
			}
		}
		report(b)
	})
}
