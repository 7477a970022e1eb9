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
