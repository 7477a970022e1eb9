package shards

import (
	"testing"
	"time"
)

// A key deleted and created again continues its versions after the delete,
// whichever way it is created or deleted, so per-key versions in the event
// stream only ever rise. Sessions are exempt: their keys are never reused.
func TestVersionsRiseAcrossDeleteAndRecreate(t *testing.T) {
	t.Parallel()
	s := newShard(t, 4)
	ctx := testCtx(t)

	// User: v1, v2, delete at v3, recreate (create-only) at v4.
	if _, err := s.PutUser(ctx, 4, "bob", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutUser(ctx, 4, "bob", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutItem(ctx, 4, "bob", "c", "k", []byte(`1`), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutItem(ctx, 4, "bob", "c", "k", []byte(`2`), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSession(ctx, 4, "bob", tokenHash("4.x"), []byte(`{}`), time.Hour); err != nil {
		t.Fatal(err)
	}
	_, seq := eventsAfter(t, s, 0)
	// Deleting the user deletes its item (at v3) and session, each with an
	// event; the user's delete comes last.
	if _, err := s.DeleteUser(ctx, 4, "bob", nil); err != nil {
		t.Fatal(err)
	}
	evs, seq := eventsAfter(t, s, seq)
	if len(evs) != 3 || evs[0].Entity != "session" || evs[1] != (event{4, "bob", "item", "c/k", "delete", 3, ""}) ||
		evs[2] != (event{4, "bob", "user", "bob", "delete", 3, ""}) {
		t.Fatalf("DeleteUser events: %+v", evs)
	}
	if v, err := s.PutUser(ctx, 4, "bob", []byte(`{}`), ver(0)); err != nil || v != 4 {
		t.Fatalf("recreate user (create-only): version %d, %v; want 4", v, err)
	}
	// The item comes back after its tombstone too, unconditionally.
	if v, err := s.PutItem(ctx, 4, "bob", "c", "k", []byte(`3`), nil); err != nil || v != 4 {
		t.Fatalf("recreate item: version %d, %v; want 4", v, err)
	}
	// DeleteItem leaves a tombstone; create-only continues after it.
	if err := s.DeleteItem(ctx, 4, "bob", "c", "k", ver(4)); err != nil {
		t.Fatal(err)
	}
	if v, err := s.PutItem(ctx, 4, "bob", "c", "k", []byte(`4`), ver(0)); err != nil || v != 6 {
		t.Fatalf("recreate item (create-only): version %d, %v; want 6", v, err)
	}
	// Compare-and-set still compares with the live row: a stale expectation
	// of the old incarnation is refused.
	_, err := s.PutItem(ctx, 4, "bob", "c", "k", []byte(`5`), ver(2))
	wantConflict(t, err, 2, 6)
	// Delete the user again: its tombstone moves up, never down.
	if _, err := s.DeleteUser(ctx, 4, "bob", ver(4)); err != nil {
		t.Fatal(err)
	}
	if v, err := s.PutUser(ctx, 4, "bob", []byte(`{}`), nil); err != nil || v != 6 {
		t.Fatalf("second recreate: version %d, %v; want 6", v, err)
	}
	evs, _ = eventsAfter(t, s, seq)
	last := map[string]int64{}
	for _, e := range evs {
		k := e.Entity + "/" + e.Key
		if e.Version <= last[k] {
			t.Fatalf("version of %s went from %d to %d: %+v", k, last[k], e.Version, evs)
		}
		last[k] = e.Version
	}
}
