package importer

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/testenv"
)

// heavy skips unless SHARDGATE_IMPORT_HEAVY is set: the 200k-row runs that
// measure the import (go test ./importer -run Heavy -v with it set).
func heavy(t *testing.T) {
	if os.Getenv("SHARDGATE_IMPORT_HEAVY") == "" {
		t.Skip("set SHARDGATE_IMPORT_HEAVY=1 for the 200k-row measurements")
	}
}

// TestImportHeavyBulk imports 200k rows (100k users, 100k items) into four
// shards and, as the baseline, COPYs the same mapped rows into one table
// of one PostgreSQL, reporting both rates and their ratio.
func TestImportHeavyBulk(t *testing.T) {
	heavy(t)
	ctx := context.Background()
	const n = 100_000
	src := legacy(t, n)
	cl, _, dsns := newCluster(t)
	m := legacyMapping(t)

	base := copyBaseline(t, src, m)

	start := time.Now()
	var usersDone time.Duration
	progress := func(p Progress) {
		if p.Table == "accounts" && p.Done {
			usersDone = time.Since(start)
		}
	}
	if err := Start(ctx, cl, m, src, Options{Parallel: 2, Progress: progress}); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	users, items, _, _ := shardCounts(t, dsns)
	if users != n || items != n {
		t.Fatalf("users %d items %d", users, items)
	}
	rate := float64(2*n) / took.Seconds()
	t.Logf("bulk import: %d rows into 4 shards in %s (users %s, items %s): %.0f rows/s; bare COPY into one table: %.0f rows/s; ratio %.2f",
		2*n, took.Round(time.Millisecond), usersDone.Round(time.Millisecond), (took - usersDone).Round(time.Millisecond), rate, base, rate/base)
}

// copyBaseline reads the mapped rows of every table and COPYs them into a
// plain table of one database: the speed of the same data with no
// routing, fencing or versions. It returns rows/s.
func copyBaseline(t *testing.T, src string, m *Mapping) float64 {
	ctx := context.Background()
	dst := connect(t, testenv.NewDatabase(t))
	if _, err := dst.Exec(ctx, `CREATE TABLE baseline (k text, user_id text, profile jsonb)`); err != nil {
		t.Fatal(err)
	}
	conn, err := connectSource(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	start := time.Now()
	var rows int64
	for i := range m.Tables {
		st, err := describe(ctx, conn, &m.Tables[i])
		if err != nil {
			t.Fatal(err)
		}
		r, err := conn.Query(ctx, st.selectSQL(false))
		if err != nil {
			t.Fatal(err)
		}
		var batch [][]any
		for r.Next() {
			rec, bad := st.scanRecord(r, DefaultMaxJSONBytes)
			if bad != nil {
				t.Fatal(bad)
			}
			batch = append(batch, []any{rec.Key[0], rec.UserID, rec.JSON})
		}
		if err := r.Err(); err != nil {
			t.Fatal(err)
		}
		n, err := dst.CopyFrom(ctx, pgx.Identifier{"baseline"}, []string{"k", "user_id", "profile"}, pgx.CopyFromRows(batch))
		if err != nil {
			t.Fatal(err)
		}
		rows += n
	}
	return float64(rows) / time.Since(start).Seconds()
}
