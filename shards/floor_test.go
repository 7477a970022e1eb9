package shards

import (
	"errors"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// The floor trigger refuses a created row at or below its partition's
// floor, with the code the writers retry on, and lets an update of a live
// row below the floor pass.
func TestFloorTriggerRefusesCreatesAtOrBelowTheFloor(t *testing.T) {
	t.Parallel()
	s := newShard(t, 5)
	ctx := testCtx(t)
	putUsers(t, s, 5, "live")
	exec(t, s, `UPDATE outbox_clock SET version_floor = 10 WHERE partition = 5`)
	// A partition without a clock row has no floor.
	exec(t, s, `INSERT INTO users (partition, user_id, profile, version) VALUES (6, 'x', '{}', 1)`)

	for _, c := range []struct {
		sql  string
		want bool // accepted
	}{
		{`INSERT INTO users (partition, user_id, profile, version) VALUES (5, 'a', '{}', 10)`, false},
		{`INSERT INTO users (partition, user_id, profile, version) VALUES (5, 'a', '{}', 3)`, false},
		{`INSERT INTO items (partition, user_id, collection, key, value, version) VALUES (5, 'live', 'c', 'k', '1', 10)`, false},
		{`INSERT INTO users (partition, user_id, profile, version) VALUES (5, 'a', '{}', 11)`, true},
		{`INSERT INTO items (partition, user_id, collection, key, value, version) VALUES (5, 'live', 'c', 'k', '1', 11)`, true},
		{`UPDATE users SET version = version + 1 WHERE partition = 5 AND user_id = 'live'`, true},
		{`INSERT INTO users AS u (partition, user_id, profile, version) VALUES (5, 'live', '{}', 1)
			ON CONFLICT (partition, user_id) DO UPDATE SET version = u.version + 1`, true},
	} {
		_, err := s.pool.Exec(ctx, c.sql)
		var pg *pgconn.PgError
		switch {
		case c.want && err != nil:
			t.Errorf("%s: %v", c.sql, err)
		case !c.want && (!errors.As(err, &pg) || pg.Code != "40001"):
			t.Errorf("%s: err %v, want serialization_failure", c.sql, err)
		}
	}
	var v int64
	if err := s.pool.QueryRow(ctx, `SELECT version FROM users WHERE partition = 5 AND user_id = 'live'`).Scan(&v); err != nil || v != 3 {
		t.Fatalf("live user at %d, %v; want 3", v, err)
	}

	// Through the API: creates start above the floor, updates of a live
	// row below it continue from the row.
	if v, err := s.PutUser(ctx, 5, "new", []byte(`{}`), nil); err != nil || v != 11 {
		t.Fatalf("new user: version %d, %v; want 11", v, err)
	}
	if v, err := s.PutItem(ctx, 5, "live", "c", "new", []byte(`1`), ver(0)); err != nil || v != 11 {
		t.Fatalf("new item (create-only): version %d, %v; want 11", v, err)
	}
	if v, err := s.PutUser(ctx, 5, "live", []byte(`{}`), ver(3)); err != nil || v != 4 {
		t.Fatalf("update of a live user below the floor: version %d, %v; want 4", v, err)
	}
	if v, err := s.PutItem(ctx, 5, "live", "c", "k", []byte(`2`), nil); err != nil || v != 12 {
		t.Fatalf("update of a live item: version %d, %v; want 12", v, err)
	}
}
