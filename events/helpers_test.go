package events

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/internal/versioning"
	"github.com/shardgate/shardgate/migrations"
	"github.com/shardgate/shardgate/shards"
)

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// testShard is a migrated shard database owning partitions.
type testShard struct {
	dsn string
	sh  *shards.Shard
	db  *pgxpool.Pool // raw SQL for the tests' own checks and faults
}

func newTestShard(t testing.TB, name string, owned ...int32) testShard {
	t.Helper()
	dsn := testenv.NewDatabase(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := migrations.Up(ctx, dsn, migrations.Shard); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	sh, err := shards.Open(ctx, name, dsn, shards.PoolOptions{MaxConns: 16})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sh.Close)
	if err := sh.SetOwnership(ctx, owned, shards.Owned); err != nil {
		t.Fatal(err)
	}
	db, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	return testShard{dsn: dsn, sh: sh, db: db}
}

func (s testShard) pool() *pgxpool.Pool { return s.db }

// newRedis returns a client and a key prefix of the test's own.
func newRedis(t testing.TB) (rueidis.Client, string) {
	t.Helper()
	addr, prefix := testenv.Redis(t)
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, prefix
}

func testCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// readStream returns every entry of a stream, decoded, in stream order.
func readStream(t testing.TB, c rueidis.Client, keys Keys, stream int32) []Event {
	t.Helper()
	entries, err := c.Do(context.Background(), c.B().Xrange().Key(keys.Stream(stream)).Start("-").End("+").Build()).AsXRange()
	if err != nil && !rueidis.IsRedisNil(err) {
		t.Fatal(err)
	}
	out := make([]Event, 0, len(entries))
	for _, en := range entries {
		e, err := decodeEntry(stream, en.ID, en.FieldValues)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

// waitFor polls cond until it holds or the test's patience ends.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// undelivered counts a shard's outbox rows above their partition's
// delivered tick.
const undeliveredSQL = `SELECT count(*) FROM outbox AS o
WHERE o.tick > coalesce((SELECT d.tick FROM outbox_delivered AS d WHERE d.partition = o.partition), 0)`

// outboxCount counts a shard's undelivered outbox rows.
func outboxCount(t testing.TB, s testShard) int {
	t.Helper()
	var n int
	if err := s.pool().QueryRow(context.Background(), undeliveredSQL).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// terminateRelays kills the relay connections on a shard's database.
func terminateRelays(t testing.TB, s testShard) int {
	t.Helper()
	var n int
	err := s.pool().QueryRow(context.Background(), `
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1`, RelayApplicationName).Scan(&n)
	if err != nil && !strings.Contains(err.Error(), "terminat") {
		t.Fatal(err)
	}
	return n
}

func eventKey(e Event) string { return fmt.Sprintf("%s/%s/%s", e.UserID, e.Entity, e.Key) }

func isConflict(err error) bool { return errors.Is(err, versioning.ErrConflict) }
func isNotFound(err error) bool { return errors.Is(err, versioning.ErrNotFound) }

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// testenvCatalog returns a migrated catalog database.
func testenvCatalog(t testing.TB) string {
	t.Helper()
	dsn := testenv.NewDatabase(t)
	if _, err := migrations.Up(context.Background(), dsn, migrations.Catalog); err != nil {
		t.Fatal(err)
	}
	return dsn
}

func openCatalog(t testing.TB, dsn string) *catalog.Catalog {
	t.Helper()
	c, err := catalog.Open(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}
