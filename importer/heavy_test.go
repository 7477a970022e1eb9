package importer

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

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
// shards with one reader per table and with the default (two), and before
// each, as the baseline, COPYs the same mapped rows into one table of one
// PostgreSQL, reporting the rates and their ratio.
func TestImportHeavyBulk(t *testing.T) {
	heavy(t)
	ctx := context.Background()
	const n = 100_000
	src := legacy(t, n)
	m := legacyMapping(t)
	for _, readers := range []int{1, 0} {
		base := copyBaseline(t, src, m)
		cl, _, dsns := newCluster(t)
		start := time.Now()
		var usersDone time.Duration
		progress := func(p Progress) {
			if p.Table == "accounts" && p.Done {
				usersDone = time.Since(start)
			}
		}
		if err := Start(ctx, cl, m, src, Options{Parallel: 2, Readers: readers, Progress: progress}); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		users, items, _, _ := shardCounts(t, dsns)
		if users != n || items != n {
			t.Fatalf("users %d items %d", users, items)
		}
		if _, err := Cancel(ctx, cl, "default", CancelOptions{SourceDSN: src}); err != nil {
			t.Fatal(err)
		}
		rate := float64(2*n) / took.Seconds()
		t.Logf("bulk import (readers %d): %d rows into 4 shards in %s (users %s, items %s): %.0f rows/s; bare COPY into one table: %.0f rows/s; ratio %.2f",
			readers, 2*n, took.Round(time.Millisecond), usersDone.Round(time.Millisecond), (took - usersDone).Round(time.Millisecond), rate, base, rate/base)
	}
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

// TestImportHeavyFollowLag follows 1k source changes/s (updates of random
// accounts, in single-row transactions) for 10 s after a 200k-row import and
// reports the apply lag (commit on the source to applied in Shardgate).
func TestImportHeavyFollowLag(t *testing.T) {
	heavy(t)
	ctx := context.Background()
	const n = 100_000
	src := legacy(t, n)
	cl, _, _ := newCluster(t)
	m := legacyMapping(t)
	if err := Start(ctx, cl, m, src, Options{}); err != nil {
		t.Fatal(err)
	}
	fctx, stop := context.WithCancel(ctx)
	defer stop()
	var (
		mu   sync.Mutex
		lags []time.Duration
	)
	done := make(chan error, 1)
	go func() {
		done <- Follow(fctx, cl, m, src, "default", FollowOptions{OnApply: func(_ string, lag time.Duration) {
			mu.Lock()
			lags = append(lags, lag)
			mu.Unlock()
		}})
	}()
	pool, err := pgxpool.New(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	const rate, seconds = 1000, 10
	tick := time.NewTicker(time.Second / rate)
	defer tick.Stop()
	var g errgroup.Group
	g.SetLimit(16)
	for i := range rate * seconds {
		<-tick.C
		g.Go(func() error {
			_, err := pool.Exec(ctx, `UPDATE accounts SET name = $2 WHERE id = $1`, rand.IntN(n)+1, fmt.Sprint("name ", i))
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		mu.Lock()
		got := len(lags)
		mu.Unlock()
		if got >= rate*seconds {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d changes applied", got, rate*seconds)
		}
		time.Sleep(100 * time.Millisecond)
	}
	stop()
	<-done
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(lags)
	q := func(f float64) time.Duration { return lags[int(f*float64(len(lags)-1))].Round(time.Millisecond) }
	t.Logf("follow lag over %d changes at %d/s: p50 %s, p99 %s, max %s", len(lags), rate, q(0.5), q(0.99), lags[len(lags)-1].Round(time.Millisecond))
}
