package catalog_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/internal/versioning"
	"github.com/shardgate/shardgate/migrations"
)

func openConfigCatalog(t *testing.T) *catalog.Catalog {
	t.Helper()
	dsn := testenv.NewDatabase(t)
	if _, err := migrations.Up(context.Background(), dsn, migrations.Catalog); err != nil {
		t.Fatal(err)
	}
	return openCatalog(t, context.Background(), dsn)
}

// Concurrent compare-and-set writers: each version is won exactly once, no
// update is lost, and a refused writer is told a version other than the one
// it expected.
func TestConfigCompareAndSetUnderContention(t *testing.T) {
	t.Parallel()
	cat := openConfigCatalog(t)
	ctx := context.Background()
	if _, err := cat.SetConfig(ctx, "ns", "counter", []byte(`0`), nil); err != nil {
		t.Fatal(err)
	}
	const writers, rounds = 8, 15
	var mu sync.Mutex
	won := map[int64]int{}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for range rounds {
				e, err := cat.GetConfig(ctx, "ns", "counter")
				if err != nil {
					t.Error(err)
					return
				}
				v, err := cat.SetConfig(ctx, "ns", "counter", []byte(fmt.Sprint(w)), &e.Version)
				var ce *versioning.ConflictError
				switch {
				case err == nil:
					mu.Lock()
					won[v]++
					mu.Unlock()
				case errors.As(err, &ce):
					if ce.Current == ce.Expected {
						t.Errorf("conflict reports current == expected == %d", ce.Current)
					}
				default:
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	final, err := cat.GetConfig(ctx, "ns", "counter")
	if err != nil {
		t.Fatal(err)
	}
	if int(final.Version) != len(won)+1 {
		t.Fatalf("final version %d after %d successful updates", final.Version, len(won))
	}
	for v, n := range won {
		if n != 1 {
			t.Fatalf("version %d won %d times", v, n)
		}
	}
}

func TestConfigExpectedSemantics(t *testing.T) {
	t.Parallel()
	cat := openConfigCatalog(t)
	ctx := context.Background()
	v0, v1, v5 := int64(0), int64(1), int64(5)
	if _, err := cat.SetConfig(ctx, "n", "k", []byte(`1`), &v1); !errors.Is(err, versioning.ErrConflict) {
		t.Fatalf("update of a missing value = %v, want conflict", err)
	}
	if v, err := cat.SetConfig(ctx, "n", "k", []byte(`1`), &v0); err != nil || v != 1 {
		t.Fatalf("create = %d, %v", v, err)
	}
	if _, err := cat.SetConfig(ctx, "n", "k", []byte(`2`), &v0); !errors.Is(err, versioning.ErrConflict) {
		t.Fatalf("second create = %v, want conflict", err)
	}
	if err := cat.DeleteConfig(ctx, "n", "k", &v5); !errors.Is(err, versioning.ErrConflict) {
		t.Fatalf("delete at the wrong version = %v, want conflict", err)
	}
	if err := cat.DeleteConfig(ctx, "n", "k", &v0); !errors.Is(err, versioning.ErrConflict) {
		t.Fatalf("delete with expected 0 of an existing value = %v, want conflict", err)
	}
	if err := cat.DeleteConfig(ctx, "n", "k", &v1); err != nil {
		t.Fatal(err)
	}
	if err := cat.DeleteConfig(ctx, "n", "k", nil); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("delete of a missing value = %v, want not found", err)
	}
	if err := cat.DeleteConfig(ctx, "n", "k", &v0); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("delete with expected 0 of a missing value = %v, want not found", err)
	}
	var ce *versioning.ConflictError
	if err := cat.DeleteConfig(ctx, "n", "k", &v5); !errors.As(err, &ce) || ce.Current != 0 {
		t.Fatalf("delete at a version of a missing value = %v, want a conflict with current 0", err)
	}
	if _, err := cat.GetConfig(ctx, "n", "k"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("get of a deleted value = %v", err)
	}
}

// A config value deleted and set again continues after the delete's
// version.
func TestConfigVersionsRiseAcrossDelete(t *testing.T) {
	t.Parallel()
	cat := openConfigCatalog(t)
	ctx := context.Background()
	for range 2 {
		if _, err := cat.SetConfig(ctx, "ns", "k", []byte(`1`), nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := cat.DeleteConfig(ctx, "ns", "k", nil); err != nil {
		t.Fatal(err)
	}
	v, err := cat.SetConfig(ctx, "ns", "k", []byte(`2`), ptr(0))
	if err != nil || v != 4 {
		t.Fatalf("recreate (create-only): version %d, %v; want 4", v, err)
	}
	if err := cat.DeleteConfig(ctx, "ns", "k", ptr(4)); err != nil {
		t.Fatal(err)
	}
	if v, err := cat.SetConfig(ctx, "ns", "k", []byte(`3`), nil); err != nil || v != 6 {
		t.Fatalf("recreate: version %d, %v; want 6", v, err)
	}
}

func ptr(v int64) *int64 { return &v }

// A recreate whose statement started before a concurrent delete committed
// still continues after the delete's version (the config twin of
// shards.TestRecreateRacingDeleteStillRises).
func TestConfigRecreateRacingDeleteStillRises(t *testing.T) {
	t.Parallel()
	cat := openConfigCatalog(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for range 3 {
		if _, err := cat.SetConfig(ctx, "ns", "k", []byte(`1`), nil); err != nil {
			t.Fatal(err)
		}
	}

	hold, err := cat.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, `SELECT tick FROM config_outbox_clock FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	deleted := make(chan error, 1)
	go func() { deleted <- cat.DeleteConfig(ctx, "ns", "k", nil) }()
	testenv.WaitForLockWaiters(t, ctx, cat.Pool(), 1)
	type set struct {
		v   int64
		err error
	}
	recreated := make(chan set, 1)
	go func() { v, err := cat.SetConfig(ctx, "ns", "k", []byte(`2`), nil); recreated <- set{v, err} }()
	testenv.WaitForLockWaiters(t, ctx, cat.Pool(), 2)
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	if r := <-recreated; r.err != nil || r.v != 5 {
		t.Fatalf("recreate racing the delete: version %d, %v; want 5 (after the delete's 4)", r.v, r.err)
	}
}
