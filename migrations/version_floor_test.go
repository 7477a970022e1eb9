package migrations

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pressly/goose/v3"

	"github.com/shardgate/shardgate/internal/testenv"
)

// schemaFacts describes what the version-floor migrations add: the floor
// column, the floor triggers and the deleted_at indexes present.
func schemaFacts(t *testing.T, ctx context.Context, conn *pgx.Conn, clock string) string {
	t.Helper()
	var column bool
	var triggers, indexes []string
	err := conn.QueryRow(ctx, `
SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = $1 AND column_name = 'version_floor'),
       coalesce((SELECT array_agg(tgname::text ORDER BY tgname) FROM pg_trigger WHERE tgname LIKE '%above_floor'), '{}'),
       coalesce((SELECT array_agg(indexname::text ORDER BY indexname) FROM pg_indexes WHERE indexname LIKE '%tombstones_deleted'), '{}')`,
		clock).Scan(&column, &triggers, &indexes)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("floor column %v, triggers %v, indexes %v", column, triggers, indexes)
}

// The version floor migrations (shard 00006 and 00007, catalog 00006) go
// down cleanly, with floors set and a clock row a pruner created, and come
// back up.
func TestVersionFloorMigrationsDown(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		kind     Kind
		clock    string
		setFloor string
		up, down string
		// After Down: a query and its answer, statements that must work
		// (no trigger left behind reads the dropped column) and one the
		// restored constraints refuse.
		probe, probed string
		work          []string
		refused       string
		reapplied     string
	}{
		{
			kind: Shard, clock: "outbox_clock",
			setFloor: `INSERT INTO outbox_clock (partition, tick, version_floor) VALUES (1, 3, 7), (2, 0, 5)`,
			up:       "floor column true, triggers [items_above_floor users_above_floor], indexes [item_tombstones_deleted user_tombstones_deleted]",
			down:     "floor column false, triggers [], indexes []",
			// The pruner's tick-0 row is gone, the other stays.
			probe: `SELECT string_agg(partition || ':' || tick, ',') FROM outbox_clock`, probed: "1:3",
			work: []string{
				`INSERT INTO users (partition, user_id, profile, version) VALUES (1, 'u', '{}', 1)`,
				`INSERT INTO items (partition, user_id, collection, key, value, version) VALUES (1, 'u', 'c', 'k', '1', 1)`,
			},
			refused:   `INSERT INTO outbox_clock (partition, tick) VALUES (3, 0)`,
			reapplied: "[6 7 8 9 10]",
		},
		{
			kind: Catalog, clock: "config_outbox_clock",
			setFloor: `UPDATE config_outbox_clock SET version_floor = 9`,
			up:       "floor column true, triggers [config_above_floor], indexes [config_tombstones_deleted]",
			down:     "floor column false, triggers [], indexes []",
			probe:    `SELECT count(*)::text FROM config_outbox_clock`, probed: "1",
			work: []string{
				`INSERT INTO config (namespace, key, value, version) VALUES ('ns', 'k', '1', 1)`,
			},
			refused:   `SELECT version_floor FROM config_outbox_clock`,
			reapplied: "[6 7 8 9]",
		},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		dsn := testenv.NewDatabase(t)
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		if _, err := Up(ctx, dsn, c.kind); err != nil {
			t.Fatal(err)
		}
		if got := schemaFacts(t, ctx, conn, c.clock); got != c.up {
			t.Fatalf("%s after Up: %s; want %s", c.kind, got, c.up)
		}
		if _, err := conn.Exec(ctx, c.setFloor); err != nil {
			t.Fatalf("%s: %v", c.kind, err)
		}
		if err := withProvider(dsn, c.kind, func(p *goose.Provider) error { _, err := p.DownTo(ctx, 5); return err }); err != nil {
			t.Fatalf("%s down: %v", c.kind, err)
		}
		if got := schemaFacts(t, ctx, conn, c.clock); got != c.down {
			t.Fatalf("%s after Down: %s; want %s", c.kind, got, c.down)
		}
		var probed string
		if err := conn.QueryRow(ctx, c.probe).Scan(&probed); err != nil || probed != c.probed {
			t.Fatalf("%s after Down: %s = %q, %v; want %q", c.kind, c.probe, probed, err, c.probed)
		}
		for _, sql := range c.work {
			if _, err := conn.Exec(ctx, sql); err != nil {
				t.Fatalf("%s after Down: %s: %v", c.kind, sql, err)
			}
		}
		if _, err := conn.Exec(ctx, c.refused); err == nil {
			t.Fatalf("%s after Down: %s worked", c.kind, c.refused)
		}
		applied, err := Up(ctx, dsn, c.kind)
		if err != nil || fmt.Sprint(applied) != c.reapplied {
			t.Fatalf("%s: Up again applied %v, %v; want %s", c.kind, applied, err, c.reapplied)
		}
		if got := schemaFacts(t, ctx, conn, c.clock); got != c.up {
			t.Fatalf("%s after Up again: %s; want %s", c.kind, got, c.up)
		}
	}
}

// The version floor migrations run on a live database: writers keep
// writing through them (they wait for the migration's locks) and none of
// them deadlocks with it.
func TestVersionFloorMigrationsUnderLiveWrites(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		kind  Kind
		write string // $1: a key
	}{
		{Shard, `WITH u AS (
    INSERT INTO users (partition, user_id, profile, version) VALUES (1, $1, '{}', 1)
    ON CONFLICT (partition, user_id) DO UPDATE SET version = users.version + 1
    RETURNING version)
INSERT INTO outbox (partition, user_id, entity, key, op, version)
SELECT 1, $1, 'user', $1, 'upsert', version FROM u`},
		{Catalog, `WITH c AS (
    INSERT INTO config (namespace, key, value, version) VALUES ('ns', $1, '1', 1)
    ON CONFLICT (namespace, key) DO UPDATE SET version = config.version + 1
    RETURNING version)
INSERT INTO config_outbox (namespace, key, op, version)
SELECT 'ns', $1, 'upsert', version FROM c`},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		dsn := testenv.NewDatabase(t)
		if err := withProvider(dsn, c.kind, func(p *goose.Provider) error { _, err := p.UpTo(ctx, 5); return err }); err != nil {
			t.Fatal(err)
		}
		writers, stop := make(chan error, 8), make(chan struct{})
		for w := range 8 {
			go func() {
				conn, err := pgx.Connect(ctx, dsn)
				if err != nil {
					writers <- err
					return
				}
				defer conn.Close(context.Background())
				for i := 0; ; i++ {
					select {
					case <-stop:
						writers <- nil
						return
					default:
					}
					if _, err := conn.Exec(ctx, c.write, fmt.Sprintf("w%d-%d", w, i%4)); err != nil {
						writers <- fmt.Errorf("writer %d: %w", w, err)
						return
					}
				}
			}()
		}
		time.Sleep(100 * time.Millisecond) // writers in full swing
		_, err := Up(ctx, dsn, c.kind)
		close(stop)
		if err != nil {
			t.Fatalf("%s: migrating under writes: %v", c.kind, err)
		}
		for range 8 {
			if err := <-writers; err != nil {
				t.Fatalf("%s: %v", c.kind, err)
			}
		}
	}
}
