package shards

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/migrations"
)

// newShardDSN is newShard that also returns the database's DSN.
func newShardDSN(t testing.TB, name string, owned ...int32) (*Shard, string) {
	t.Helper()
	dsn := testenv.NewDatabase(t)
	ctx := testCtx(t)
	if _, err := migrations.Up(ctx, dsn, migrations.Shard); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	s, err := Open(ctx, name, dsn, PoolOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if err := s.SetOwnership(ctx, owned, Owned); err != nil {
		t.Fatal(err)
	}
	return s, dsn
}

// movePrefix is a slot prefix of the test's own: slots are server-wide and
// tests run in parallel.
func movePrefix(t testing.TB) string {
	prefix := "sgt" + testenv.RandomHex(4)
	t.Cleanup(func() {
		// A failed test may leave a slot behind; slots outlive databases.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		admin, err := Open(ctx, "admin", testenv.AdminDSN(t), PoolOptions{MaxConns: 1})
		if err != nil {
			return
		}
		defer admin.Close()
		admin.exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
			WHERE slot_name LIKE $1 AND NOT active`, prefix+"%")
	})
	return prefix
}

func checksums(t *testing.T, s *Shard, partitions []int32) []Checksum {
	t.Helper()
	sn, err := s.BeginSnapshot(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	cks, err := sn.Checksums(testCtx(t), partitions)
	if err != nil {
		t.Fatal(err)
	}
	return cks
}

// A move done by hand with this file's API: copy at a snapshot, follow the
// changes made after it, freeze, marker, cut over, clean up. Everything of
// the moving partitions arrives (rows, tombstones, clock, undelivered
// events), nothing of the others, and no replication object is left.
func TestMovePartitionsByHand(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	src, srcDSN := newShardDSN(t, "src", 1, 2, 3)
	tgt, _ := newShardDSN(t, "tgt", 4)
	moving := []int32{1, 2}

	// Before the copy: live rows, a deleted user (tombstones), a session.
	for _, p := range []int32{1, 2, 3} {
		for i := range 20 {
			id := fmt.Sprintf("u%d-%d", p, i)
			if _, err := src.PutUser(ctx, p, id, []byte(`{"n":1}`), nil); err != nil {
				t.Fatal(err)
			}
			if _, err := src.PutItem(ctx, p, id, "c", "k", []byte(`"v"`), nil); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := src.DeleteUser(ctx, p, fmt.Sprintf("u%d-0", p), nil); err != nil {
			t.Fatal(err)
		}
		if _, err := src.CreateSession(ctx, p, fmt.Sprintf("u%d-1", p), tokenHash(fmt.Sprint("t", p)), []byte(`{}`), time.Hour); err != nil {
			t.Fatal(err)
		}
	}

	prefix := movePrefix(t)
	name := MoveObjectName(prefix, 7)
	if err := src.CreateMovePublication(ctx, name, 7, moving); err != nil {
		t.Fatal(err)
	}
	snap, err := src.StartMoveSlot(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	var reported int64
	n, err := src.CopyPartitions(ctx, snap, moving, tgt, nil, func(rows int64) { reported = rows })
	snap.Close()
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 || reported != n {
		t.Fatalf("copied %d rows, progress said %d", n, reported)
	}
	conninfo, err := Conninfo(srcDSN + "&pool_max_conns=3")
	if err != nil {
		t.Fatal(err)
	}
	if err := tgt.CreateMoveSubscription(ctx, name, conninfo); err != nil {
		t.Fatal(err)
	}

	// After the copy: changes that only replication carries.
	for _, p := range moving {
		if _, err := src.PutUser(ctx, p, fmt.Sprintf("u%d-2", p), []byte(`{"n":2}`), nil); err != nil {
			t.Fatal(err)
		}
		if _, err := src.PutUser(ctx, p, fmt.Sprintf("u%d-new", p), []byte(`{}`), nil); err != nil {
			t.Fatal(err)
		}
		if err := src.DeleteItem(ctx, p, fmt.Sprintf("u%d-3", p), "c", "k", nil); err != nil {
			t.Fatal(err)
		}
	}
	// Both relays mark what they delivered: the source's marks travel
	// (updates of the row the copy carried), the target's own mark of a
	// partition is an update too, so the subscription never conflicts.
	// Pruned events leave the outbox; the delete must travel too.
	exec(t, src, `UPDATE outbox_delivered SET tick = 5 WHERE partition = 1`)
	exec(t, tgt, `INSERT INTO outbox_delivered AS d (partition, tick) VALUES (2, 1)
		ON CONFLICT (partition) DO UPDATE SET tick = EXCLUDED.tick WHERE d.tick < EXCLUDED.tick`)
	exec(t, src, `DELETE FROM outbox WHERE partition = 1 AND tick <= 5`)

	// Cutover.
	if err := src.Freeze(ctx, moving, "1s"); err != nil {
		t.Fatal(err)
	}
	if _, err := src.PutUser(ctx, 1, "late", []byte(`{}`), nil); !errors.Is(err, ErrWrongShard) {
		t.Fatalf("write to a frozen partition: %v, want ErrWrongShard", err)
	}
	if _, err := src.GetUser(ctx, 1, "u1-2"); err != nil {
		t.Fatalf("read of a frozen partition: %v", err)
	}
	token, err := src.WriteMarker(ctx, 7)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = tgt.WaitForMarker(wctx, 7, token, 2*time.Millisecond)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	var marks string
	if err := tgt.pool.QueryRow(ctx, `SELECT string_agg(partition || ':' || tick, ',' ORDER BY partition)
		FROM outbox_delivered WHERE partition = ANY($1)`, moving).Scan(&marks); err != nil || marks != "1:5,2:1" {
		t.Fatalf("target's delivered ticks %q, %v; want 1:5,2:1", marks, err)
	}
	if running, errs, err := tgt.SubscriptionHealth(ctx, name); err != nil || !running || errs != 0 {
		t.Fatalf("subscription running %v with %d apply errors, %v", running, errs, err)
	}
	if a, b := checksums(t, src, moving), checksums(t, tgt, moving); !slices.Equal(a, b) || len(a) == 0 {
		t.Fatalf("checksums differ:\nsource %v\ntarget %v", a, b)
	}
	var srcOutbox, tgtOutbox []string
	for _, db := range []struct {
		s   *Shard
		out *[]string
	}{{src, &srcOutbox}, {tgt, &tgtOutbox}} {
		rows, err := db.s.pool.Query(ctx, `SELECT partition || ':' || tick || ':' || event_id FROM outbox WHERE partition = ANY($1) ORDER BY 1`, moving)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var s string
			rows.Scan(&s)
			*db.out = append(*db.out, s)
		}
		rows.Close()
	}
	if !slices.Equal(srcOutbox, tgtOutbox) || len(srcOutbox) == 0 {
		t.Fatalf("undelivered events differ:\nsource %v\ntarget %v", srcOutbox, tgtOutbox)
	}
	if err := src.MarkMoved(ctx, moving); err != nil {
		t.Fatal(err)
	}
	if err := tgt.SetOwnership(ctx, moving, Owned); err != nil {
		t.Fatal(err)
	}

	// Cleanup: subscription (with its slot), publication, source rows.
	if dropped, err := tgt.DropMoveSubscription(ctx, name); err != nil || !dropped {
		t.Fatalf("drop subscription: dropped slot %v, %v", dropped, err)
	}
	if err := src.DropMovePublication(ctx, name); err != nil {
		t.Fatal(err)
	}
	if err := src.DropMoveSlot(ctx, name); err != nil {
		t.Fatal(err)
	}
	if _, err := src.DeletePartitions(ctx, moving, 7, nil); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Shard{src, tgt} {
		mo, err := s.ListMoveObjects(ctx, prefix)
		if err != nil {
			t.Fatal(err)
		}
		if len(mo.Publications)+len(mo.Subscriptions)+len(mo.Slots) > 0 {
			t.Errorf("%s keeps %+v", s.Name(), mo)
		}
	}
	var left int
	if err := src.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM users WHERE partition <> 3) + (SELECT count(*) FROM items WHERE partition <> 3)
		+ (SELECT count(*) FROM outbox_clock WHERE partition <> 3) + (SELECT count(*) FROM ownership WHERE partition <> 3)
		+ (SELECT count(*) FROM outbox_delivered WHERE partition <> 3)`).Scan(&left); err != nil || left != 0 {
		t.Fatalf("source keeps %d rows of moved partitions (%v)", left, err)
	}
	if h, err := src.Holdings(ctx); err != nil || h.Partitions != 1 || h.Rows == 0 {
		t.Fatalf("source holdings %v, %v: want partition 3 only", h, err)
	}

	// The target carries on: versions above the tombstone, ticks after the
	// moved clock, partition 3 never arrived.
	v, err := tgt.PutUser(ctx, 1, "u1-0", []byte(`{}`), nil)
	if err != nil || v != 3 { // created at 1, deleted at 2
		t.Fatalf("recreate after move: version %d, %v; want 3", v, err)
	}
	var ticks []int64
	rows, _ := tgt.pool.Query(ctx, `SELECT tick FROM outbox WHERE partition = 1 ORDER BY tick`)
	for rows.Next() {
		var x int64
		rows.Scan(&x)
		ticks = append(ticks, x)
	}
	rows.Close()
	for i := 1; i < len(ticks); i++ {
		if ticks[i] != ticks[i-1]+1 {
			t.Fatalf("partition 1's ticks on the target have a gap: %v", ticks)
		}
	}
	if got := countRows(t, tgt); got.Users != 2*20+1 { // 20 each (one deleted, one new), one recreated
		t.Fatalf("target holds %d users, want %d", got.Users, 2*20+1)
	}
}

// A freeze waits for a write in flight and then stops the next; a freeze
// of a partition the shard does not own changes nothing; MarkMoved refuses
// partitions that were unfrozen meanwhile.
func TestFreezeAndMarkMovedRules(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newShard(t, 1, 2)
	if err := s.Freeze(ctx, []int32{1, 9}, "1s"); !errors.Is(err, ErrNotOwned) {
		t.Fatalf("freeze with an unowned partition: %v, want ErrNotOwned", err)
	}
	if st, _ := s.OwnershipOf(ctx, []int32{1}); st[1] != Owned {
		t.Fatalf("partition 1 is %s after a refused freeze, want owned", st[1])
	}
	if err := s.MarkMoved(ctx, []int32{1}); !errors.Is(err, ErrNotFrozen) {
		t.Fatalf("mark moved of an owned partition: %v, want ErrNotFrozen", err)
	}
	if err := s.Freeze(ctx, []int32{1, 2}, "1s"); err != nil {
		t.Fatal(err)
	}
	if n, err := s.Unfreeze(ctx, []int32{2}); err != nil || n != 1 {
		t.Fatalf("unfreeze = %d, %v", n, err)
	}
	if err := s.MarkMoved(ctx, []int32{1, 2}); !errors.Is(err, ErrNotFrozen) {
		t.Fatalf("mark moved with an unfrozen partition: %v, want ErrNotFrozen", err)
	}
	if err := s.MarkMoved(ctx, []int32{1}); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkMoved(ctx, []int32{1}); err != nil {
		t.Fatalf("mark moved again: %v", err)
	}
	if _, err := s.DeletePartitions(ctx, []int32{2}, 1, nil); !errors.Is(err, ErrStillServed) {
		t.Fatalf("delete of an owned partition: %v, want ErrStillServed", err)
	}

	// A write holding its ownership row delays the freeze; the lock
	// timeout bounds the wait.
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `SELECT 1 FROM ownership WHERE partition = 2 FOR SHARE`); err != nil {
		t.Fatal(err)
	}
	if err := s.Freeze(ctx, []int32{2}, "50ms"); !errors.Is(err, ErrLockTimeout) {
		t.Fatalf("freeze behind a write: %v, want lock_not_available", err)
	}
}

func TestMoveObjectNames(t *testing.T) {
	name := MoveObjectName("sg0123abcd", 42)
	if id, ok := ParseMoveObjectName("sg0123abcd", name); !ok || id != 42 {
		t.Fatalf("ParseMoveObjectName(%q) = %d, %v", name, id, ok)
	}
	for _, bad := range []string{"sg0123abcd_move_", "sg0123abcd_move_x", "sg0123abcd_move_007", "other_move_1", "sg0123abcd_move_-1"} {
		if _, ok := ParseMoveObjectName("sg0123abcd", bad); ok {
			t.Errorf("ParseMoveObjectName(%q) accepted", bad)
		}
	}
}

func TestConninfoDropsPgxParams(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://u:p@h:5/db?sslmode=disable&pool_max_conns=3":              "postgres://u:p@h:5/db?sslmode=disable",
		"host=h port=5 pool_max_conns=3 password='a b' dbname=db":             "host=h port=5 password='a b' dbname=db",
		"host=h statement_cache_capacity=0 password='it\\'s' sslmode=require": "host=h password='it\\'s' sslmode=require",
	} {
		got, err := Conninfo(in)
		if err != nil || got != want {
			t.Errorf("Conninfo(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := Conninfo("postgres://u:secret@h:notaport/db"); err == nil || errors.Is(err, nil) {
		t.Error("Conninfo accepted a bad DSN")
	}
}
