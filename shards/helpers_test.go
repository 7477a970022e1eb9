package shards

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/internal/versioning"
	"github.com/shardgate/shardgate/migrations"
)

// newShard opens a shard on a fresh, migrated database whose ownership table
// lists owned as owned.
func newShard(t testing.TB, owned ...int32) *Shard {
	t.Helper()
	return newShardAt(t, testenv.NewDatabase(t), PoolOptions{}, owned...)
}

// newShardAt migrates the database at dsn, opens it as a shard with opts
// and lists owned as owned.
func newShardAt(t testing.TB, dsn string, opts PoolOptions, owned ...int32) *Shard {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := migrations.Up(ctx, dsn, migrations.Shard); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	s, err := Open(ctx, "test", dsn, opts)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(s.Close)
	if err := s.SetOwnership(ctx, owned, Owned); err != nil {
		t.Fatalf("set ownership: %v", err)
	}
	return s
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func ver(n int64) *int64 { return &n }

func tokenHash(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

// exec runs SQL directly on the shard, for setup that the API does not offer.
func exec(t testing.TB, s *Shard, sql string, args ...any) {
	t.Helper()
	if _, err := s.pool.Exec(testCtx(t), sql, args...); err != nil {
		t.Fatalf("exec %q: %v", sql, err)
	}
}

// rowCounts counts the rows of every data table and the outbox.
type rowCounts struct{ Users, Sessions, Items, Outbox int64 }

func countRows(t testing.TB, s *Shard) rowCounts {
	t.Helper()
	var c rowCounts
	err := s.pool.QueryRow(testCtx(t), `
SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM sessions),
       (SELECT count(*) FROM items), (SELECT count(*) FROM outbox)`).
		Scan(&c.Users, &c.Sessions, &c.Items, &c.Outbox)
	if err != nil {
		t.Fatalf("count rows: %v", err)
	}
	return c
}

// event is an outbox row without its generated columns.
type event struct {
	Partition int32
	UserID    string
	Entity    string
	Key       string
	Op        string
	Version   int64
	Payload   string // "" for NULL
}

// eventsAfter returns the outbox rows with seq > after, in seq order, and
// the highest seq seen.
func eventsAfter(t testing.TB, s *Shard, after int64) ([]event, int64) {
	t.Helper()
	rows, err := s.pool.Query(testCtx(t), `
SELECT seq, partition, user_id, entity, key, op, version, coalesce(payload::text, '')
FROM outbox WHERE seq > $1 ORDER BY seq`, after)
	if err != nil {
		t.Fatalf("read outbox: %v", err)
	}
	defer rows.Close()
	var out []event
	last := after
	for rows.Next() {
		var e event
		if err := rows.Scan(&last, &e.Partition, &e.UserID, &e.Entity, &e.Key, &e.Op, &e.Version, &e.Payload); err != nil {
			t.Fatalf("scan outbox: %v", err)
		}
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("read outbox: %v", err)
	}
	return out, last
}

// jsonEqual reports whether a and b hold the same JSON value.
func jsonEqual(t testing.TB, a, b []byte) bool {
	t.Helper()
	var va, vb any
	if err := json.Unmarshal(a, &va); err != nil {
		t.Fatalf("unmarshal %q: %v", a, err)
	}
	if err := json.Unmarshal(b, &vb); err != nil {
		t.Fatalf("unmarshal %q: %v", b, err)
	}
	return reflect.DeepEqual(va, vb)
}

// wantConflict fails unless err is a *versioning.ConflictError with these versions.
func wantConflict(t testing.TB, err error, expected, current int64) {
	t.Helper()
	var ce *versioning.ConflictError
	if !errors.As(err, &ce) || !errors.Is(err, versioning.ErrConflict) {
		t.Fatalf("err = %v, want a version conflict", err)
	}
	if ce.Expected != expected || ce.Current != current {
		t.Fatalf("conflict = {Expected %d, Current %d}, want {%d, %d}", ce.Expected, ce.Current, expected, current)
	}
}

func wantErr(t testing.TB, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("err = %v, want %v", err, target)
	}
}

// putUsers creates users in partition p, as items need their user to exist.
func putUsers(t testing.TB, s *Shard, p int32, ids ...string) {
	t.Helper()
	for _, id := range ids {
		if _, err := s.PutUser(testCtx(t), p, id, []byte(`{}`), nil); err != nil {
			t.Fatalf("put user %s: %v", id, err)
		}
	}
}
