package shards

import (
	"errors"
	"fmt"
	"testing"
)

func TestImportUsersAndItems(t *testing.T) {
	ctx := testCtx(t)
	s := newShard(t, 1, 2)

	// A user deleted before keeps rising from its tombstone; a partition
	// whose floor was raised starts above it.
	if _, err := s.PutUser(ctx, 1, "old", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DeleteUser(ctx, 1, "old", nil); err != nil {
		t.Fatal(err)
	}
	exec(t, s, `INSERT INTO outbox_clock (partition, tick, version_floor) VALUES (2, 0, 40)`)
	exec(t, s, `DELETE FROM outbox`)

	users := []ImportUser{
		{Partition: 1, UserID: "old", Profile: []byte(`{"a": 1}`)},
		{Partition: 1, UserID: "u1", Profile: []byte(`{"a": 1}`)},
		{Partition: 2, UserID: "u2", Profile: []byte(`{"a": 2}`)},
		{Partition: 1, UserID: "u1", Profile: []byte(`{"a": 3}`)}, // the last of a key wins
	}
	res, err := s.ImportUsers(ctx, users, false)
	if err != nil || res.Written != 3 {
		t.Fatalf("import users: %+v %v", res, err)
	}
	for _, tc := range []struct {
		p       int32
		id      string
		profile string
		version int64
	}{{1, "old", `{"a": 1}`, 3}, {1, "u1", `{"a": 3}`, 1}, {2, "u2", `{"a": 2}`, 41}} {
		u, err := s.GetUser(ctx, tc.p, tc.id)
		if err != nil || string(u.Profile) != tc.profile || u.Version != tc.version {
			t.Fatalf("%s: %s v%d %v, want %s v%d", tc.id, u.Profile, u.Version, err, tc.profile, tc.version)
		}
	}
	if c := countRows(t, s); c.Outbox != 0 {
		t.Fatalf("events written without being asked: %+v", c)
	}
	// Written again unchanged: nothing changes, no event; changed: the
	// next version, with its event when asked.
	res, err = s.ImportUsers(ctx, []ImportUser{users[2], {Partition: 1, UserID: "u1", Profile: []byte(`{"a": 4}`)}}, true)
	if err != nil || res.Written != 1 {
		t.Fatalf("again: %+v %v", res, err)
	}
	if u, _ := s.GetUser(ctx, 1, "u1"); u.Version != 2 || string(u.Profile) != `{"a": 4}` {
		t.Fatalf("u1 %+v", u)
	}
	if c := countRows(t, s); c.Outbox != 1 {
		t.Fatalf("events %+v, want 1", c)
	}

	// Items need their user: refused whole, or the others written.
	items := []ImportItem{
		{Partition: 1, UserID: "u1", Collection: "c", Key: "k", Value: []byte(`1`)},
		{Partition: 2, UserID: "nobody", Collection: "c", Key: "k", Value: []byte(`2`)},
	}
	_, err = s.ImportItems(ctx, items, false, false)
	var mu *MissingUsersError
	if !errors.As(err, &mu) || len(mu.Users) != 1 || mu.Users[0] != (UserRef{2, "nobody"}) || !errors.Is(err, ErrUserNotFound) {
		t.Fatalf("missing user: %v", err)
	}
	if c := countRows(t, s); c.Items != 0 {
		t.Fatalf("half-written: %+v", c)
	}
	res, err = s.ImportItems(ctx, items, false, true)
	if err != nil || res.Written != 1 || len(res.MissingUsers) != 1 {
		t.Fatalf("skip missing: %+v %v", res, err)
	}
	if it, err := s.GetItem(ctx, 1, "u1", "c", "k"); err != nil || string(it.Value) != "1" || it.Version != 1 {
		t.Fatalf("item %+v %v", it, err)
	}

	// Fenced: a batch with a partition the shard does not own writes
	// nothing and names the partition.
	exec(t, s, `UPDATE ownership SET state = 'frozen' WHERE partition = 2`)
	_, err = s.ImportUsers(ctx, []ImportUser{{Partition: 1, UserID: "x", Profile: []byte(`{}`)}, {Partition: 2, UserID: "y", Profile: []byte(`{}`)}, {Partition: 3, UserID: "z", Profile: []byte(`{}`)}}, false)
	if p, ok := IsWrongShardBatch(err); !ok || fmt.Sprint(p) != "[2 3]" || !errors.Is(err, ErrWrongShard) {
		t.Fatalf("fenced: %v", err)
	}
	if _, err := s.GetUser(ctx, 1, "x"); err == nil {
		t.Fatal("a refused batch wrote a row")
	}
}

// A batch is first tried as a plain INSERT; one that meets an existing row
// is written again as an upsert, with the same outcome as an upsert alone:
// new rows created, changed rows at their next version, unchanged rows
// left alone, one event per row written, nothing of the failed attempt.
func TestImportInsertFallsBackToUpsert(t *testing.T) {
	for _, events := range []bool{true, false} {
		t.Run(fmt.Sprintf("events=%v", events), func(t *testing.T) { testImportInsertFallsBack(t, events) })
	}
}

func testImportInsertFallsBack(t *testing.T, events bool) {
	ctx := testCtx(t)
	s := newShard(t, 1, 2)
	perEvent := int64(0)
	if events {
		perEvent = 1
	}
	users := []ImportUser{
		{Partition: 1, UserID: "u1", Profile: []byte(`{"a": 1}`)},
		{Partition: 2, UserID: "u2", Profile: []byte(`{"a": 2}`)},
	}
	if res, err := s.ImportUsers(ctx, users, events); err != nil || res.Written != 2 {
		t.Fatalf("insert: %+v %v", res, err)
	}
	if n := s.importUpserts.Load(); n != 0 {
		t.Fatalf("new rows made the shard upsert (%d)", n)
	}
	items := []ImportItem{
		{Partition: 1, UserID: "u1", Collection: "c", Key: "k1", Value: []byte(`1`)},
		{Partition: 2, UserID: "u2", Collection: "c", Key: "k2", Value: []byte(`2`)},
	}
	if res, err := s.ImportItems(ctx, items, events, false); err != nil || res.Written != 2 {
		t.Fatalf("insert items: %+v %v", res, err)
	}
	// The plain INSERT path refuses a batch with a missing user whole.
	_, err := s.ImportItems(ctx, []ImportItem{{Partition: 1, UserID: "u1", Collection: "c", Key: "new", Value: []byte(`0`)},
		{Partition: 2, UserID: "nobody", Collection: "c", Key: "k", Value: []byte(`0`)}}, events, false)
	var mu *MissingUsersError
	if !errors.As(err, &mu) || len(mu.Users) != 1 || mu.Users[0] != (UserRef{2, "nobody"}) {
		t.Fatalf("missing user: %v", err)
	}
	if c := countRows(t, s); c.Users != 2 || c.Items != 2 || c.Outbox != 4*perEvent {
		t.Fatalf("after inserts: %+v", c)
	}

	// Existing rows: u1 unchanged, u2 changed, u3 new.
	users = []ImportUser{
		{Partition: 1, UserID: "u1", Profile: []byte(`{"a": 1}`)},
		{Partition: 2, UserID: "u2", Profile: []byte(`{"a": 22}`)},
		{Partition: 2, UserID: "u3", Profile: []byte(`{"a": 3}`)},
	}
	if res, err := s.ImportUsers(ctx, users, events); err != nil || res.Written != 2 {
		t.Fatalf("upsert: %+v %v", res, err)
	}
	if n := s.importUpserts.Load(); n != importUpsertRun {
		t.Fatalf("after a conflict the shard upserts the next %d batches, want %d", n, importUpsertRun)
	}
	s.importUpserts.Store(0) // the items' INSERT meets rows too
	items = []ImportItem{
		{Partition: 1, UserID: "u1", Collection: "c", Key: "k1", Value: []byte(`1`)},
		{Partition: 2, UserID: "u2", Collection: "c", Key: "k2", Value: []byte(`22`)},
		{Partition: 2, UserID: "u3", Collection: "c", Key: "k3", Value: []byte(`3`)},
	}
	if res, err := s.ImportItems(ctx, items, events, false); err != nil || res.Written != 2 {
		t.Fatalf("upsert items: %+v %v", res, err)
	}
	if n := s.importUpserts.Load(); n != importUpsertRun {
		t.Fatalf("the items' INSERT did not meet their rows (%d)", n)
	}
	for _, tc := range []struct {
		p       int32
		id      string
		profile string
		version int64
	}{{1, "u1", `{"a": 1}`, 1}, {2, "u2", `{"a": 22}`, 2}, {2, "u3", `{"a": 3}`, 1}} {
		if u, err := s.GetUser(ctx, tc.p, tc.id); err != nil || string(u.Profile) != tc.profile || u.Version != tc.version {
			t.Fatalf("%s: %s v%d %v, want %s v%d", tc.id, u.Profile, u.Version, err, tc.profile, tc.version)
		}
	}
	for _, tc := range []struct {
		p            int32
		id, key, val string
		version      int64
	}{{1, "u1", "k1", `1`, 1}, {2, "u2", "k2", `22`, 2}, {2, "u3", "k3", `3`, 1}} {
		if it, err := s.GetItem(ctx, tc.p, tc.id, "c", tc.key); err != nil || string(it.Value) != tc.val || it.Version != tc.version {
			t.Fatalf("%s/%s: %s v%d %v, want %s v%d", tc.id, tc.key, it.Value, it.Version, err, tc.val, tc.version)
		}
	}
	if c := countRows(t, s); c.Users != 3 || c.Items != 3 || c.Outbox != 8*perEvent {
		t.Fatalf("after upserts: %+v (want 3 users, 3 items, %d events)", c, 8*perEvent)
	}
}
