package shards

import (
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
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

// A recreate whose statement started before a concurrent delete committed
// computed its version without the delete's tombstone; the outbox trigger
// refuses it and the put runs again, so the version still rises (found by
// review: the outbox read "upsert 3, delete 4, upsert 1").
func TestRecreateRacingDeleteStillRises(t *testing.T) {
	t.Parallel()
	s := newShard(t, 4)
	ctx := testCtx(t)
	for range 3 {
		if _, err := s.PutUser(ctx, 4, "bob", []byte(`{}`), nil); err != nil {
			t.Fatal(err)
		}
	}
	_, seq := eventsAfter(t, s, 0)

	// Hold the partition's clock so the delete stops just before committing.
	hold, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, `SELECT tick FROM outbox_clock WHERE partition = 4 FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	deleted := make(chan error, 1)
	go func() { _, err := s.DeleteUser(ctx, 4, "bob", nil); deleted <- err }()
	testenv.WaitForLockWaiters(t, ctx, s.pool, 1)
	// The put's snapshot predates the delete's commit: it sees no tombstone.
	type put struct {
		v   int64
		err error
	}
	recreated := make(chan put, 1)
	go func() { v, err := s.PutUser(ctx, 4, "bob", []byte(`{"again":true}`), nil); recreated <- put{v, err} }()
	testenv.WaitForLockWaiters(t, ctx, s.pool, 2)
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	r := <-recreated
	if r.err != nil || r.v != 5 {
		t.Fatalf("recreate racing the delete: version %d, %v; want 5 (after the delete's 4)", r.v, r.err)
	}
	evs, _ := eventsAfter(t, s, seq)
	if len(evs) != 2 || evs[0].Op != "delete" || evs[0].Version != 4 || evs[1].Op != "upsert" || evs[1].Version != 5 {
		t.Fatalf("events: %+v", evs)
	}
}
