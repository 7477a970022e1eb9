package shards

import (
	"fmt"
	"testing"
)

// ApplyUsers and ApplyItems keep the bulk rules in one fenced statement.
func TestApplyUsersAndItems(t *testing.T) {
	ctx := testCtx(t)
	s := newShard(t, 1, 2)
	exec(t, s, `INSERT INTO outbox_clock (partition, tick, version_floor) VALUES (2, 0, 40)`)

	res, err := s.ApplyUsers(ctx, []ImportUser{
		{Partition: 1, UserID: "u1", Profile: []byte(`{"a": 1}`)},
		{Partition: 2, UserID: "u2", Profile: []byte(`{"a": 2}`)},
	}, false)
	if err != nil || res.Written != 2 {
		t.Fatalf("apply users: %+v %v", res, err)
	}
	if u, _ := s.GetUser(ctx, 2, "u2"); u.Version != 41 {
		t.Fatalf("u2 %+v, want version 41 (above the floor)", u)
	}
	if c := countRows(t, s); c.Outbox != 0 {
		t.Fatalf("events without being asked: %+v", c)
	}
	// Unchanged: nothing written; changed: the next version and, asked
	// for, its event.
	res, err = s.ApplyUsers(ctx, []ImportUser{
		{Partition: 1, UserID: "u1", Profile: []byte(`{"a": 1}`)},
		{Partition: 2, UserID: "u2", Profile: []byte(`{"a": 3}`)},
	}, true)
	if err != nil || res.Written != 1 {
		t.Fatalf("again: %+v %v", res, err)
	}
	if u, _ := s.GetUser(ctx, 2, "u2"); u.Version != 42 {
		t.Fatalf("u2 %+v, want version 42", u)
	}
	if c := countRows(t, s); c.Outbox != 1 {
		t.Fatalf("events %+v, want 1", c)
	}

	// Items of users that do not exist are left out and listed.
	res, err = s.ApplyItems(ctx, []ImportItem{
		{Partition: 1, UserID: "u1", Collection: "c", Key: "k", Value: []byte(`1`)},
		{Partition: 1, UserID: "ghost", Collection: "c", Key: "k", Value: []byte(`1`)},
	}, false)
	if err != nil || res.Written != 1 || fmt.Sprint(res.MissingUsers) != "[{1 ghost}]" {
		t.Fatalf("apply items: %+v %v", res, err)
	}
	if it, err := s.GetItem(ctx, 1, "u1", "c", "k"); err != nil || it.Version != 1 {
		t.Fatalf("item %+v %v", it, err)
	}

	// A partition not owned: refused whole.
	_, err = s.ApplyUsers(ctx, []ImportUser{
		{Partition: 1, UserID: "x", Profile: []byte(`{}`)},
		{Partition: 3, UserID: "y", Profile: []byte(`{}`)},
	}, false)
	if p, ok := IsWrongShardBatch(err); !ok || fmt.Sprint(p) != "[3]" {
		t.Fatalf("fenced: %v", err)
	}
	_, err = s.ApplyItems(ctx, []ImportItem{{Partition: 3, UserID: "u1", Collection: "c", Key: "k2", Value: []byte(`1`)}}, false)
	if _, ok := IsWrongShardBatch(err); !ok {
		t.Fatalf("fenced items: %v", err)
	}
	if _, err := s.GetUser(ctx, 1, "x"); err == nil {
		t.Fatal("a refused batch wrote a row")
	}
}

// A version given with an imported row is kept where the rules allow.
func TestImportKeepsVersions(t *testing.T) {
	ctx := testCtx(t)
	s := newShard(t, 1)
	if _, err := s.ImportUsers(ctx, []ImportUser{{Partition: 1, UserID: "live", Profile: []byte(`{}`)}, {Partition: 1, UserID: "gone", Profile: []byte(`{}`)}}, false); err != nil {
		t.Fatal(err)
	}
	exec(t, s, `INSERT INTO user_tombstones (partition, user_id, version) VALUES (1, 'dead', 9)`)
	res, err := s.ImportUsers(ctx, []ImportUser{
		{Partition: 1, UserID: "new", Profile: []byte(`{}`), Version: 7},        // kept
		{Partition: 1, UserID: "dead", Profile: []byte(`{}`), Version: 4},       // above its tombstone: 10
		{Partition: 1, UserID: "live", Profile: []byte(`{"a": 1}`), Version: 5}, // changed, above the row: kept
		{Partition: 1, UserID: "gone", Profile: []byte(`{"a": 1}`), Version: 1}, // changed, below the row: 2
	}, false)
	if err != nil || res.Written != 4 {
		t.Fatalf("import: %+v %v", res, err)
	}
	for id, want := range map[string]int64{"new": 7, "dead": 10, "live": 5, "gone": 2} {
		if u, err := s.GetUser(ctx, 1, id); err != nil || u.Version != want {
			t.Errorf("%s: version %d %v, want %d", id, u.Version, err, want)
		}
	}
	if _, err := s.ImportItems(ctx, []ImportItem{{Partition: 1, UserID: "new", Collection: "c", Key: "k", Value: []byte(`1`), Version: 12}}, false, false); err != nil {
		t.Fatal(err)
	}
	if it, err := s.GetItem(ctx, 1, "new", "c", "k"); err != nil || it.Version != 12 {
		t.Fatalf("item %+v %v, want version 12", it, err)
	}
}
