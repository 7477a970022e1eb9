package shards

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/pglock"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/internal/versioning"
)

// age makes tombstones look deleted an hour ago, as time passing would:
// the user tombstones that users selects and the item tombstones that
// items selects (SQL conditions; "false" for none).
func age(t testing.TB, s *Shard, users, items string) {
	t.Helper()
	exec(t, s, `UPDATE user_tombstones SET deleted_at = now() - interval '1 hour' WHERE `+users)
	exec(t, s, `UPDATE item_tombstones SET deleted_at = now() - interval '1 hour' WHERE `+items)
}

// floorOf reads the partition's version floor (0 without a clock row).
func floorOf(t testing.TB, s *Shard, p int32) int64 {
	t.Helper()
	var f int64
	if err := s.pool.QueryRow(testCtx(t), `SELECT coalesce((SELECT version_floor FROM outbox_clock WHERE partition = $1), 0)`, p).Scan(&f); err != nil {
		t.Fatal(err)
	}
	return f
}

// tombstones lists the tombstones left, as "partition/user[/collection/key]@version".
func tombstones(t testing.TB, s *Shard) []string {
	t.Helper()
	rows, err := s.pool.Query(testCtx(t), `
SELECT partition || '/' || user_id || '@' || version FROM user_tombstones
UNION ALL
SELECT partition || '/' || user_id || '/' || collection || '/' || key || '@' || version FROM item_tombstones
ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// putItemAt writes the item n times, so it ends at version n.
func putItemAt(t testing.TB, s *Shard, p int32, user, coll, key string, n int) {
	t.Helper()
	for range n {
		if _, err := s.PutItem(testCtx(t), p, user, coll, key, []byte(`1`), nil); err != nil {
			t.Fatal(err)
		}
	}
}

// Only tombstones older than the age given go; the partition's floor rises
// to the largest version pruned there, and another partition's stays.
func TestPruneTombstones(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2)
	ctx := testCtx(t)
	putUsers(t, s, 1, "old", "young")
	putUsers(t, s, 2, "u2")
	putItemAt(t, s, 1, "young", "c", "old", 6)
	putItemAt(t, s, 1, "young", "c", "young", 9)
	putItemAt(t, s, 2, "u2", "c", "young", 2)
	if _, err := s.DeleteUser(ctx, 1, "old", nil); err != nil {
		t.Fatal(err)
	}
	for _, k := range []struct {
		p         int32
		user, key string
	}{{1, "young", "old"}, {1, "young", "young"}, {2, "u2", "young"}} {
		if err := s.DeleteItem(ctx, k.p, k.user, "c", k.key, nil); err != nil {
			t.Fatal(err)
		}
	}
	age(t, s, `user_id = 'old'`, `key = 'old'`)

	n, err := s.PruneTombstones(ctx, time.Minute, versioning.DefaultPruneLimit)
	if err != nil || n != 2 {
		t.Fatalf("PruneTombstones = %d, %v; want 2", n, err)
	}
	if got, want := tombstones(t, s), []string{"1/young/c/young@10", "2/u2/c/young@3"}; !equalStrings(got, want) {
		t.Fatalf("tombstones left %v, want %v", got, want)
	}
	// The user's tombstone was at 2, the item's at 7.
	if f := floorOf(t, s, 1); f != 7 {
		t.Fatalf("floor of partition 1 = %d, want 7", f)
	}
	if f := floorOf(t, s, 2); f != 0 {
		t.Fatalf("floor of partition 2 = %d, want 0", f)
	}
	if n, err := s.PruneTombstones(ctx, time.Minute, versioning.DefaultPruneLimit); err != nil || n != 0 {
		t.Fatalf("second prune = %d, %v; want 0", n, err)
	}
	// Age 0: everything written before the prune's transaction began.
	if n, err := s.PruneTombstones(ctx, 0, versioning.DefaultPruneLimit); err != nil || n != 2 {
		t.Fatalf("prune of age 0 = %d, %v; want 2", n, err)
	}
	if f1, f2 := floorOf(t, s, 1), floorOf(t, s, 2); f1 != 10 || f2 != 3 {
		t.Fatalf("floors %d, %d; want 10, 3", f1, f2)
	}
	if _, err := s.PruneTombstones(ctx, -time.Second, versioning.DefaultPruneLimit); err == nil {
		t.Fatal("a negative age was accepted")
	}
}

// A user or item deleted, pruned and created again gets a version above
// its last one, whichever way it is created; so does a key the partition
// never saw, and an update of a live row below the floor is not refused.
func TestRecreateAfterPruneRises(t *testing.T) {
	t.Parallel()
	s := newShard(t, 3)
	ctx := testCtx(t)
	putUsers(t, s, 3, "live", "bob", "carol")
	putItemAt(t, s, 3, "live", "c", "k", 8)
	if err := s.DeleteItem(ctx, 3, "live", "c", "k", nil); err != nil { // tombstone 9
		t.Fatal(err)
	}
	for range 4 {
		putUsers(t, s, 3, "bob")
	}
	if _, err := s.DeleteUser(ctx, 3, "bob", nil); err != nil { // tombstone 6
		t.Fatal(err)
	}
	if _, err := s.DeleteUser(ctx, 3, "carol", nil); err != nil { // tombstone 2
		t.Fatal(err)
	}
	_, seq := eventsAfter(t, s, 0)
	age(t, s, "true", "true")
	if n, err := s.PruneTombstones(ctx, time.Minute, versioning.DefaultPruneLimit); err != nil || n != 3 {
		t.Fatalf("PruneTombstones = %d, %v; want 3", n, err)
	}
	if f := floorOf(t, s, 3); f != 9 {
		t.Fatalf("floor %d, want 9", f)
	}

	for _, c := range []struct {
		name string
		put  func() (int64, error)
	}{
		{"item (unconditional)", func() (int64, error) { return s.PutItem(ctx, 3, "live", "c", "k", []byte(`2`), nil) }},
		{"user (create-only)", func() (int64, error) { return s.PutUser(ctx, 3, "bob", []byte(`{}`), ver(0)) }},
		{"user (unconditional)", func() (int64, error) { return s.PutUser(ctx, 3, "carol", []byte(`{}`), nil) }},
		{"new user", func() (int64, error) { return s.PutUser(ctx, 3, "dave", []byte(`{}`), nil) }},
		{"new item (create-only)", func() (int64, error) { return s.PutItem(ctx, 3, "live", "c", "new", []byte(`1`), ver(0)) }},
	} {
		if v, err := c.put(); err != nil || v != 10 {
			t.Errorf("%s: version %d, %v; want 10 (above the floor 9)", c.name, v, err)
		}
	}
	// "live" was created at 1, below the floor; updating it continues from it.
	if v, err := s.PutUser(ctx, 3, "live", []byte(`{"x":1}`), ver(1)); err != nil || v != 2 {
		t.Fatalf("update of a live user below the floor: version %d, %v; want 2", v, err)
	}
	if v, err := s.PutUser(ctx, 3, "live", []byte(`{"x":2}`), nil); err != nil || v != 3 {
		t.Fatalf("unconditional update of a live user below the floor: version %d, %v; want 3", v, err)
	}

	evs, _ := eventsAfter(t, s, 0)
	last := map[string]int64{}
	for _, e := range evs {
		k := e.Entity + "/" + e.Key
		if e.Version <= last[k] {
			t.Fatalf("version of %s went from %d to %d (events after %d: %+v)", k, last[k], e.Version, seq, evs)
		}
		last[k] = e.Version
	}
}

// Only owned partitions are pruned: frozen and moved ones, and partitions
// the shard does not list, keep their tombstones and floors.
func TestPruneOnlyOwnedPartitions(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2, 3)
	ctx := testCtx(t)
	for _, p := range []int32{1, 2, 3} {
		u := fmt.Sprintf("u%d", p)
		putUsers(t, s, p, u)
		if _, err := s.DeleteUser(ctx, p, u, nil); err != nil {
			t.Fatal(err)
		}
	}
	exec(t, s, `INSERT INTO user_tombstones (partition, user_id, version) VALUES (4, 'stray', 5)`)
	age(t, s, "true", "true")
	if err := s.SetOwnership(ctx, []int32{2}, Frozen); err != nil {
		t.Fatal(err)
	}
	if err := s.SetOwnership(ctx, []int32{3}, Moved); err != nil {
		t.Fatal(err)
	}
	if n, err := s.PruneTombstones(ctx, time.Minute, versioning.DefaultPruneLimit); err != nil || n != 1 {
		t.Fatalf("PruneTombstones = %d, %v; want 1", n, err)
	}
	if got, want := tombstones(t, s), []string{"2/u2@2", "3/u3@2", "4/stray@5"}; !equalStrings(got, want) {
		t.Fatalf("tombstones left %v, want %v", got, want)
	}
	for p, want := range map[int32]int64{1: 2, 2: 0, 3: 0, 4: 0} {
		if f := floorOf(t, s, p); f != want {
			t.Errorf("floor of partition %d = %d, want %d", p, f, want)
		}
	}
}

// A partition without a clock row (its tombstones arrived without events,
// as after a restore) gets one at tick 0 with the floor; its first event
// still gets tick 1.
func TestPruneCreatesMissingClockRow(t *testing.T) {
	t.Parallel()
	s := newShard(t, 7)
	ctx := testCtx(t)
	exec(t, s, `INSERT INTO user_tombstones (partition, user_id, version, deleted_at) VALUES (7, 'gone', 4, now() - interval '1 hour')`)
	if n, err := s.PruneTombstones(ctx, time.Minute, versioning.DefaultPruneLimit); err != nil || n != 1 {
		t.Fatalf("PruneTombstones = %d, %v; want 1", n, err)
	}
	var tick, floor int64
	if err := s.pool.QueryRow(ctx, `SELECT tick, version_floor FROM outbox_clock WHERE partition = 7`).Scan(&tick, &floor); err != nil || tick != 0 || floor != 4 {
		t.Fatalf("clock row: tick %d, floor %d, %v; want 0, 4", tick, floor, err)
	}
	if v, err := s.PutUser(ctx, 7, "gone", []byte(`{}`), nil); err != nil || v != 5 {
		t.Fatalf("recreate: version %d, %v; want 5", v, err)
	}
	if err := s.pool.QueryRow(ctx, `SELECT tick FROM outbox WHERE partition = 7`).Scan(&tick); err != nil || tick != 1 {
		t.Fatalf("first event at tick %d, %v; want 1", tick, err)
	}
}

// A batch prunes at most limit tombstones, users' and items' together;
// batches continue where the last stopped, and a short one means done.
func TestPruneLimit(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2)
	ctx := testCtx(t)
	putUsers(t, s, 1, "keeper")
	for i := range 13 {
		if _, err := s.PutItem(ctx, 1, "keeper", "c", fmt.Sprint(i), []byte(`1`), nil); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteItem(ctx, 1, "keeper", "c", fmt.Sprint(i), nil); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 12 {
		u := fmt.Sprintf("u%d", i)
		putUsers(t, s, 2, u)
		if _, err := s.DeleteUser(ctx, 2, u, nil); err != nil {
			t.Fatal(err)
		}
	}
	age(t, s, "true", "true")
	for i, want := range []int{10, 10, 5, 0} {
		if n, err := s.PruneTombstones(ctx, time.Minute, 10); err != nil || n != want {
			t.Fatalf("batch %d = %d, %v; want %d", i, n, err, want)
		}
	}
	if left := tombstones(t, s); len(left) != 0 {
		t.Fatalf("tombstones left: %v", left)
	}
	for _, limit := range []int{0, -1, versioning.MaxPruneLimit + 1} {
		if _, err := s.PruneTombstones(ctx, time.Minute, limit); err == nil {
			t.Errorf("limit %d accepted", limit)
		}
	}
}

// While another transaction holds the shard's prune lock, a prune returns 0
// at once and deletes nothing; the session sweeper's lock does not stop it.
func TestPruneLockHeldElsewhere(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1)
	ctx := testCtx(t)
	putUsers(t, s, 1, "u")
	if _, err := s.DeleteUser(ctx, 1, "u", nil); err != nil {
		t.Fatal(err)
	}
	age(t, s, "true", "true")
	for _, c := range []struct {
		key  int32
		want int
	}{{pglock.KeyPrune, 0}, {pglock.KeySweep, 1}} {
		hold, err := s.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := hold.Exec(ctx, `SELECT pg_advisory_xact_lock($1, $2)`, pglock.ClassMaintenance, c.key); err != nil {
			t.Fatal(err)
		}
		if n, err := s.PruneTombstones(ctx, time.Minute, versioning.DefaultPruneLimit); err != nil || n != c.want {
			t.Fatalf("prune while lock (%#x, %d) is held = %d, %v; want %d", pglock.ClassMaintenance, c.key, n, err, c.want)
		}
		if err := hold.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// A create whose statement took its snapshot while a prune was under way
// (the prune waits for the partition's clock, the create then queues behind
// it) computed its version from the tombstone the prune deletes; the floor
// the prune raised is higher, so the create is refused, runs again and ends
// above the floor.
func TestCreateRacingPruneEndsAboveTheFloor(t *testing.T) {
	t.Parallel()
	s := newShard(t, 4)
	ctx := testCtx(t)
	putUsers(t, s, 4, "bob", "high")
	for range 9 {
		putUsers(t, s, 4, "high")
	}
	if _, err := s.DeleteUser(ctx, 4, "bob", nil); err != nil { // tombstone 2
		t.Fatal(err)
	}
	if _, err := s.DeleteUser(ctx, 4, "high", nil); err != nil { // tombstone 11
		t.Fatal(err)
	}
	age(t, s, "true", "true")
	_, seq := eventsAfter(t, s, 0)

	hold, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, `SELECT tick FROM outbox_clock WHERE partition = 4 FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	type result struct {
		n   int64
		err error
	}
	pruned := make(chan result, 1)
	go func() {
		n, err := s.PruneTombstones(ctx, time.Minute, versioning.DefaultPruneLimit)
		pruned <- result{int64(n), err}
	}()
	testenv.WaitForLockWaiters(t, ctx, s.pool, 1)
	// The create's snapshot still holds bob's tombstone: it computes 3.
	created := make(chan result, 1)
	go func() { v, err := s.PutUser(ctx, 4, "bob", []byte(`{}`), nil); created <- result{v, err} }()
	testenv.WaitForLockWaiters(t, ctx, s.pool, 2)
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if r := <-pruned; r.err != nil || r.n != 2 {
		t.Fatalf("prune = %d, %v; want 2", r.n, r.err)
	}
	if r := <-created; r.err != nil || r.n != 12 {
		t.Fatalf("create racing the prune: version %d, %v; want 12 (above the floor 11)", r.n, r.err)
	}
	evs, _ := eventsAfter(t, s, seq)
	if len(evs) != 1 || evs[0].Key != "bob" || evs[0].Version != 12 {
		t.Fatalf("events: %+v", evs)
	}
}

// The case the floor exists for: a create whose statement took its snapshot
// while the key was still live, and whose key was then deleted and its
// tombstone pruned before the create got to its insert, computed version 1
// (no tombstone, no floor in its snapshot). The floor trigger refuses it,
// and the put runs again above the pruned delete's version.
func TestCreateBehindDeleteAndPruneStillRises(t *testing.T) {
	t.Parallel()
	s := newShard(t, 4)
	ctx := testCtx(t)
	putUsers(t, s, 4, "bob")
	putItemAt(t, s, 4, "bob", "c", "k", 3)
	_, seq := eventsAfter(t, s, 0)

	// PutItem takes FOR KEY SHARE on its user's row after its snapshot:
	// holding the row stops the put there, with the item still live in
	// its snapshot.
	hold, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, `SELECT 1 FROM users WHERE partition = 4 AND user_id = 'bob' FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	type put struct {
		v   int64
		err error
	}
	recreated := make(chan put, 1)
	go func() { v, err := s.PutItem(ctx, 4, "bob", "c", "k", []byte(`"again"`), nil); recreated <- put{v, err} }()
	testenv.WaitForLockWaiters(t, ctx, s.pool, 1)
	if err := s.DeleteItem(ctx, 4, "bob", "c", "k", nil); err != nil { // tombstone 4
		t.Fatal(err)
	}
	age(t, s, "true", "true")
	if n, err := s.PruneTombstones(ctx, time.Minute, versioning.DefaultPruneLimit); err != nil || n != 1 {
		t.Fatalf("PruneTombstones = %d, %v; want 1", n, err)
	}
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if r := <-recreated; r.err != nil || r.v != 5 {
		t.Fatalf("create behind the delete and the prune: version %d, %v; want 5 (after the delete's 4)", r.v, r.err)
	}
	evs, _ := eventsAfter(t, s, seq)
	if len(evs) != 2 || evs[0].Op != "delete" || evs[0].Version != 4 || evs[1].Op != "upsert" || evs[1].Version != 5 {
		t.Fatalf("events: %+v", evs)
	}
}

// A prune waits for a writer holding a partition's clock and then goes
// on; writers waiting behind the prune go on once it commits. Nothing
// deadlocks with deletes running in the pruned partitions meanwhile.
func TestPruneBesideDeletes(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2, 3, 4)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, p := range []int32{1, 2, 3, 4} {
		putUsers(t, s, p, fmt.Sprintf("u%d", p))
	}
	errs := make(chan error, 4)
	stop := make(chan struct{})
	for _, p := range []int32{1, 2, 3, 4} {
		go func() {
			u := fmt.Sprintf("u%d", p)
			for i := 0; ; i++ {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				k := fmt.Sprint(i % 20)
				if _, err := s.PutItem(ctx, p, u, "c", k, []byte(`1`), nil); err != nil {
					errs <- err
					return
				}
				if err := s.DeleteItem(ctx, p, u, "c", k, nil); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	pruned := 0
	for pruned < 100 {
		select {
		case err := <-errs:
			t.Fatalf("writer: %v", err)
		default:
		}
		n, err := s.PruneTombstones(ctx, 0, 10)
		if err != nil {
			t.Fatal(err)
		}
		pruned += n
	}
	close(stop)
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatalf("writer: %v", err)
		}
	}
	// Per key, versions only rose.
	evs, _ := eventsAfter(t, s, 0)
	last := map[string]int64{}
	for _, e := range evs {
		k := fmt.Sprintf("%d/%s/%s", e.Partition, e.Entity, e.Key)
		if e.Version <= last[k] {
			t.Fatalf("version of %s went from %d to %d", k, last[k], e.Version)
		}
		last[k] = e.Version
	}
}
