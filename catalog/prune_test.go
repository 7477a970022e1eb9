package catalog_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/pglock"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/internal/versioning"
)

// configFloor reads the config version floor.
func configFloor(t *testing.T, cat *catalog.Catalog) int64 {
	t.Helper()
	var f int64
	if err := cat.Pool().QueryRow(context.Background(), `SELECT version_floor FROM config_outbox_clock`).Scan(&f); err != nil {
		t.Fatal(err)
	}
	return f
}

func configExec(t *testing.T, cat *catalog.Catalog, sql string, args ...any) {
	t.Helper()
	if _, err := cat.Pool().Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("exec %q: %v", sql, err)
	}
}

// setConfigTimes sets the value n times, so it ends at version n.
func setConfigTimes(t *testing.T, cat *catalog.Catalog, ns, key string, n int) {
	t.Helper()
	for range n {
		if _, err := cat.SetConfig(context.Background(), ns, key, []byte(`1`), nil); err != nil {
			t.Fatal(err)
		}
	}
}

// Only config tombstones older than the age go; the floor rises to the
// largest version pruned; a value set again, and a value never seen, get
// versions above it, and an update of a live value below it is not refused.
func TestPruneConfigTombstones(t *testing.T) {
	t.Parallel()
	cat := openConfigCatalog(t)
	ctx := context.Background()
	setConfigTimes(t, cat, "ns", "old", 4)
	setConfigTimes(t, cat, "ns", "young", 7)
	setConfigTimes(t, cat, "ns", "live", 1)
	for _, k := range []string{"old", "young"} {
		if err := cat.DeleteConfig(ctx, "ns", k, nil); err != nil {
			t.Fatal(err)
		}
	}
	configExec(t, cat, `UPDATE config_tombstones SET deleted_at = now() - interval '1 hour' WHERE key = 'old'`)

	if n, err := cat.PruneConfigTombstones(ctx, time.Minute, versioning.DefaultPruneLimit); err != nil || n != 1 {
		t.Fatalf("PruneConfigTombstones = %d, %v; want 1", n, err)
	}
	var left []string
	rows, err := cat.Pool().Query(ctx, `SELECT key || '@' || version FROM config_tombstones ORDER BY key`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		left = append(left, s)
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	if fmt.Sprint(left) != "[young@8]" {
		t.Fatalf("tombstones left %v, want [young@8]", left)
	}
	if f := configFloor(t, cat); f != 5 {
		t.Fatalf("floor %d, want 5", f)
	}
	if n, err := cat.PruneConfigTombstones(ctx, time.Minute, versioning.DefaultPruneLimit); err != nil || n != 0 {
		t.Fatalf("second prune = %d, %v; want 0", n, err)
	}

	if v, err := cat.SetConfig(ctx, "ns", "old", []byte(`2`), ptr(0)); err != nil || v != 6 {
		t.Fatalf("recreate after the prune: version %d, %v; want 6 (above the floor 5)", v, err)
	}
	if v, err := cat.SetConfig(ctx, "ns", "new", []byte(`2`), nil); err != nil || v != 6 {
		t.Fatalf("new value: version %d, %v; want 6", v, err)
	}
	// "young" still has its tombstone: it continues after it.
	if v, err := cat.SetConfig(ctx, "ns", "young", []byte(`2`), nil); err != nil || v != 9 {
		t.Fatalf("recreate with a tombstone: version %d, %v; want 9", v, err)
	}
	if v, err := cat.SetConfig(ctx, "ns", "live", []byte(`2`), ptr(1)); err != nil || v != 2 {
		t.Fatalf("update of a live value below the floor: version %d, %v; want 2", v, err)
	}
	if v, err := cat.SetConfig(ctx, "ns", "live", []byte(`3`), nil); err != nil || v != 3 {
		t.Fatalf("unconditional update of a live value below the floor: version %d, %v; want 3", v, err)
	}

	// The trigger itself: a created value at or below the floor is refused
	// with the code the writers retry on.
	_, err = cat.Pool().Exec(ctx, `INSERT INTO config (namespace, key, value, version) VALUES ('ns', 'raw', '1', 5)`)
	var pg *pgconn.PgError
	if !errors.As(err, &pg) || pg.Code != "40001" {
		t.Fatalf("insert below the floor: %v, want serialization_failure", err)
	}

	for _, limit := range []int{0, versioning.MaxPruneLimit + 1} {
		if _, err := cat.PruneConfigTombstones(ctx, time.Minute, limit); err == nil {
			t.Errorf("limit %d accepted", limit)
		}
	}
	if _, err := cat.PruneConfigTombstones(ctx, -time.Minute, 1); err == nil {
		t.Error("negative age accepted")
	}
}

// Batches of limit; a prune finding the lock held returns 0 at once.
func TestPruneConfigTombstonesBatchesAndLock(t *testing.T) {
	t.Parallel()
	cat := openConfigCatalog(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 7 {
		k := fmt.Sprint(i)
		setConfigTimes(t, cat, "ns", k, 1)
		if err := cat.DeleteConfig(ctx, "ns", k, nil); err != nil {
			t.Fatal(err)
		}
	}
	configExec(t, cat, `UPDATE config_tombstones SET deleted_at = now() - interval '1 hour'`)

	hold, err := cat.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, `SELECT pg_advisory_xact_lock($1, $2)`, pglock.ClassMaintenance, pglock.KeyPrune); err != nil {
		t.Fatal(err)
	}
	if n, err := cat.PruneConfigTombstones(ctx, time.Minute, 3); err != nil || n != 0 {
		t.Fatalf("prune while the lock is held = %d, %v; want 0", n, err)
	}
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	for i, want := range []int{3, 3, 1, 0} {
		if n, err := cat.PruneConfigTombstones(ctx, time.Minute, 3); err != nil || n != want {
			t.Fatalf("batch %d = %d, %v; want %d", i, n, err, want)
		}
	}
}

// A set whose statement took its snapshot while a prune waited for the
// config clock (and then queued behind the prune) computed its version from
// the tombstone the prune deletes; the floor the prune raised is higher, so
// the set is refused, runs again and ends above the floor.
func TestConfigCreateRacingPruneEndsAboveTheFloor(t *testing.T) {
	t.Parallel()
	cat := openConfigCatalog(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	setConfigTimes(t, cat, "ns", "k", 1)
	setConfigTimes(t, cat, "ns", "high", 9)
	for _, k := range []string{"k", "high"} { // tombstones 2 and 10
		if err := cat.DeleteConfig(ctx, "ns", k, nil); err != nil {
			t.Fatal(err)
		}
	}
	configExec(t, cat, `UPDATE config_tombstones SET deleted_at = now() - interval '1 hour'`)

	hold, err := cat.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, `SELECT tick FROM config_outbox_clock FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	type result struct {
		n   int64
		err error
	}
	pruned := make(chan result, 1)
	go func() {
		n, err := cat.PruneConfigTombstones(ctx, time.Minute, versioning.DefaultPruneLimit)
		pruned <- result{int64(n), err}
	}()
	testenv.WaitForLockWaiters(t, ctx, cat.Pool(), 1)
	set := make(chan result, 1)
	go func() { v, err := cat.SetConfig(ctx, "ns", "k", []byte(`2`), nil); set <- result{v, err} }()
	testenv.WaitForLockWaiters(t, ctx, cat.Pool(), 2)
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if r := <-pruned; r.err != nil || r.n != 2 {
		t.Fatalf("prune = %d, %v; want 2", r.n, r.err)
	}
	if r := <-set; r.err != nil || r.n != 11 {
		t.Fatalf("set racing the prune: version %d, %v; want 11 (above the floor 10)", r.n, r.err)
	}
}
