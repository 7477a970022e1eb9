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
