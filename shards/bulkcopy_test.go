package shards

import (
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// New rows without events are COPYed straight into their table, with the
// versions the INSERT would give them; batches the COPY cannot take (with
// events, into a partition with tombstones, items with a missing user, rows
// that exist) take the INSERT or the upsert and are written as before.
func TestImportCopiesNewRows(t *testing.T) {
	ctx := testCtx(t)
	s := newShard(t, 1, 2, 3)
	exec(t, s, `INSERT INTO outbox_clock (partition, tick, version_floor) VALUES (2, 0, 40)`)
	copies := func(want int64) {
		t.Helper()
		if n := s.importCopies.Load(); n != want {
			t.Fatalf("%d batches COPYed, want %d", n, want)
		}
	}
	userVersions := func(want map[UserRef]int64) {
		t.Helper()
		for k, v := range want {
			if u, err := s.GetUser(ctx, k.Partition, k.UserID); err != nil || u.Version != v {
				t.Fatalf("%v: v%d %v, want v%d", k, u.Version, err, v)
			}
		}
	}

	// Versions: above the floor, or the given one where it is higher.
	res, err := s.ImportUsers(ctx, []ImportUser{
		{Partition: 1, UserID: "a", Profile: []byte(`{}`)},
		{Partition: 2, UserID: "b", Profile: []byte(`{}`)},
		{Partition: 2, UserID: "c", Profile: []byte(`{}`), Version: 50},
		{Partition: 2, UserID: "d", Profile: []byte(`{}`), Version: 10},
		{Partition: 1, UserID: "e", Profile: []byte(`{"x": 1}`), Version: 7},
	}, false)
	if err != nil || res.Written != 5 {
		t.Fatalf("import users: %+v %v", res, err)
	}
	copies(1)
	userVersions(map[UserRef]int64{{1, "a"}: 1, {2, "b"}: 41, {2, "c"}: 50, {2, "d"}: 41, {1, "e"}: 7})
	if u, _ := s.GetUser(ctx, 1, "e"); string(u.Profile) != `{"x": 1}` {
		t.Fatalf("profile %s", u.Profile)
	}
	res, err = s.ImportItems(ctx, []ImportItem{
		{Partition: 2, UserID: "b", Collection: "c", Key: "k", Value: []byte(`1`)},
		{Partition: 1, UserID: "a", Collection: "c", Key: "k", Value: []byte(`2`), Version: 3},
		{Partition: 1, UserID: "a", Collection: "c", Key: "l", Value: []byte(`3`)},
	}, false, false)
	if err != nil || res.Written != 3 {
		t.Fatalf("import items: %+v %v", res, err)
	}
	copies(2)
	for _, tc := range []struct {
		p       int32
		user    string
		key     string
		version int64
	}{{2, "b", "k", 41}, {1, "a", "k", 3}, {1, "a", "l", 1}} {
		if it, err := s.GetItem(ctx, tc.p, tc.user, "c", tc.key); err != nil || it.Version != tc.version {
			t.Fatalf("%s/%s: v%d %v, want v%d", tc.user, tc.key, it.Version, err, tc.version)
		}
	}
	if c := countRows(t, s); c.Users != 5 || c.Items != 3 || c.Outbox != 0 {
		t.Fatalf("rows %+v", c)
	}

	// With events: the INSERT, which writes them.
	if res, err := s.ImportUsers(ctx, []ImportUser{{Partition: 1, UserID: "f", Profile: []byte(`{}`)}}, true); err != nil || res.Written != 1 {
		t.Fatalf("with events: %+v %v", res, err)
	}
	copies(2)
	if c := countRows(t, s); c.Outbox != 1 {
		t.Fatalf("events %+v", c)
	}

	// An item whose user is missing: refused whole and named, as before.
	_, err = s.ImportItems(ctx, []ImportItem{
		{Partition: 1, UserID: "a", Collection: "c", Key: "m", Value: []byte(`0`)},
		{Partition: 2, UserID: "nobody", Collection: "c", Key: "k", Value: []byte(`0`)},
	}, false, false)
	var mu *MissingUsersError
	if !errors.As(err, &mu) || len(mu.Users) != 1 || mu.Users[0] != (UserRef{2, "nobody"}) {
		t.Fatalf("missing user: %v", err)
	}
	copies(2)
	if c := countRows(t, s); c.Items != 3 {
		t.Fatalf("half-written: %+v", c)
	}

	// A partition with a tombstone: the INSERT, which continues after it.
	if _, err := s.PutUser(ctx, 3, "old", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DeleteUser(ctx, 3, "old", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ImportUsers(ctx, []ImportUser{{Partition: 3, UserID: "old", Profile: []byte(`{}`)}, {Partition: 1, UserID: "g", Profile: []byte(`{}`)}}, false); err != nil {
		t.Fatal(err)
	}
	copies(2)
	userVersions(map[UserRef]int64{{3, "old"}: 3, {1, "g"}: 1})

	// A row that exists: the COPY is refused and the batch upserted.
	if res, err := s.ImportUsers(ctx, []ImportUser{{Partition: 1, UserID: "a", Profile: []byte(`{"y": 1}`)}, {Partition: 1, UserID: "h", Profile: []byte(`{}`)}}, false); err != nil || res.Written != 2 {
		t.Fatalf("existing: %+v %v", res, err)
	}
	copies(2)
	if n := s.importUpserts.Load(); n != importUpsertRun {
		t.Fatalf("after a refused COPY the shard upserts the next %d batches, want %d", n, importUpsertRun)
	}
	userVersions(map[UserRef]int64{{1, "a"}: 2, {1, "h"}: 1})
}

// The COPY computes versions from floors it read; a floor a pruner raised
// after that is caught by the data tables' statement trigger, which must
// fire for COPY as for INSERT (importBatch retries the refusal).
func TestCopyBelowFloorRefused(t *testing.T) {
	ctx := testCtx(t)
	s := newShard(t, 1)
	exec(t, s, `INSERT INTO outbox_clock (partition, tick, version_floor) VALUES (1, 0, 40)`)
	exec(t, s, `INSERT INTO users (partition, user_id, profile, version) VALUES (1, 'u', '{}', 41)`)
	for _, tc := range []struct {
		table string
		cols  []string
		row   []any
	}{
		{"users", []string{"partition", "user_id", "profile", "version"}, []any{int32(1), "v", []byte(`{}`), int64(40)}},
		{"items", []string{"partition", "user_id", "collection", "key", "value", "version"}, []any{int32(1), "u", "c", "k", []byte(`1`), int64(40)}},
	} {
		_, err := s.pool.CopyFrom(ctx, pgx.Identifier{tc.table}, tc.cols, pgx.CopyFromRows([][]any{tc.row}))
		var pg *pgconn.PgError
		if !errors.As(err, &pg) || pg.Code != "40001" {
			t.Fatalf("%s: COPY below the floor: %v, want serialization_failure", tc.table, err)
		}
	}
}
