package migrations

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/shardgate/shardgate/internal/testenv"
)

// Shard migration 00011 checks the version floor once per statement: a
// statement that creates many rows is refused whole if any of them is at
// or below its partition's floor, and rows it updates (ON CONFLICT DO
// UPDATE) are not checked, however many there are.
func TestFloorCheckPerStatement(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dsn := testenv.NewDatabase(t)
	if _, err := Up(ctx, dsn, Shard); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var level string
	if err := conn.QueryRow(ctx, `SELECT string_agg(DISTINCT CASE WHEN tgtype & 1 = 1 THEN 'row' ELSE 'statement' END, ',')
		FROM pg_trigger WHERE tgname LIKE '%above_floor'`).Scan(&level); err != nil || level != "statement" {
		t.Fatalf("floor triggers are %q, %v; want statement", level, err)
	}
	for _, sql := range []string{
		`INSERT INTO outbox_clock (partition, tick, version_floor) VALUES (1, 0, 10), (2, 0, 0)`,
		`INSERT INTO users (partition, user_id, profile, version) VALUES (2, 'live', '{}', 1), (1, 'live', '{}', 11)`,
		`UPDATE users SET version = 2 WHERE partition = 1 AND user_id = 'live'`, // a live row below the floor
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	for _, c := range []struct {
		sql  string
		want bool // accepted
	}{
		// One row of many at the floor: the statement is refused whole.
		{`INSERT INTO users (partition, user_id, profile, version)
			SELECT 1, 'u' || g, '{}', CASE WHEN g = 500 THEN 10 ELSE 11 END FROM generate_series(1, 1000) AS g`, false},
		{`INSERT INTO items (partition, user_id, collection, key, value, version)
			SELECT 1, 'live', 'c', 'k' || g, '1', CASE WHEN g = 1000 THEN 3 ELSE 11 END FROM generate_series(1, 1000) AS g`, false},
		// Updates below the floor with creates above it pass.
		{`INSERT INTO users AS u (partition, user_id, profile, version)
			VALUES (1, 'live', '{"a": 1}', 11), (1, 'new', '{}', 11), (2, 'live', '{}', 1)
			ON CONFLICT (partition, user_id) DO UPDATE SET version = u.version + 1`, true},
		{`INSERT INTO items (partition, user_id, collection, key, value, version)
			SELECT 2, 'live', 'c', 'k' || g, '1', 1 FROM generate_series(1, 1000) AS g`, true},
	} {
		_, err := conn.Exec(ctx, c.sql)
		var pg *pgconn.PgError
		switch {
		case c.want && err != nil:
			t.Errorf("%s: %v", c.sql, err)
		case !c.want && (!errors.As(err, &pg) || pg.Code != "40001"):
			t.Errorf("%s: err %v, want serialization_failure", c.sql, err)
		}
	}
	var users, items, liveVersion int64
	if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM items),
		(SELECT version FROM users WHERE partition = 1 AND user_id = 'live')`).Scan(&users, &items, &liveVersion); err != nil {
		t.Fatal(err)
	}
	if users != 3 || items != 1000 || liveVersion != 3 {
		t.Fatalf("users %d items %d, live user at version %d; want 3, 1000, 3", users, items, liveVersion)
	}
}
