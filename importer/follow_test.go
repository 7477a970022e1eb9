package importer

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/versioning"
	"github.com/shardgate/shardgate/router"
)

func TestFollowAndCutover(t *testing.T) {
	ctx := context.Background()
	const n = 500
	src := legacy(t, n)
	cl, _, dsns := newCluster(t)
	m := legacyMapping(t)
	sconn := connect(t, src)

	// A change committed between the slot's creation and the bulk copy's
	// read is in the snapshot or in the slot, never in neither: made here
	// after the import, it must arrive through the slot.
	if err := Start(ctx, cl, m, src, Options{}); err != nil {
		t.Fatal(err)
	}
	fctx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan error, 1)
	var applied atomic.Int64
	go func() {
		done <- Follow(fctx, cl, m, src, "default", FollowOptions{OnApply: func(string, time.Duration) { applied.Add(1) }})
	}()

	for _, q := range []string{
		`INSERT INTO accounts VALUES (1001, 'new@example.com', 'New', '2021-01-01Z')`,
		`INSERT INTO account_settings VALUES (1001, 'lang', '"de"')`,
		`UPDATE accounts SET name = 'Renamed' WHERE id = 2`,
		`DELETE FROM accounts WHERE id = 3`,
		`UPDATE account_settings SET name = 'colour' WHERE account_id = 4 AND name = 'theme'`,
		`UPDATE account_settings SET value = '{"dark": "maybe"}' WHERE account_id = 5`,
	} {
		if _, err := sconn.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	user := func(id string) (string, error) {
		p := router.Partition(id, cl.Partitions())
		u, err := cl.Owner(p).GetUser(ctx, p, id)
		return string(u.Profile), err
	}
	item := func(id, key string) (string, error) {
		p := router.Partition(id, cl.Partitions())
		it, err := cl.Owner(p).GetItem(ctx, p, id, "settings", key)
		return string(it.Value), err
	}
	// Seven changes: the delete of account 3 cascades to its setting.
	// Different users' changes apply in parallel, so wait for them all.
	deadline := time.Now().Add(30 * time.Second)
	for applied.Load() < 7 {
		if time.Now().After(deadline) {
			t.Fatalf("%d of 7 changes applied", applied.Load())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if v, err := item("acct-5", "theme"); err != nil || v != `{"dark": "maybe"}` {
		t.Fatalf("updated item: %s %v", v, err)
	}
	if p, err := user("acct-1001"); err != nil || p != `{"name": "New", "email": "new@example.com", "created_at": "2021-01-01T00:00:00+00:00"}` {
		t.Fatalf("inserted user: %s %v", p, err)
	}
	if v, err := item("acct-1001", "lang"); err != nil || v != `"de"` {
		t.Fatalf("inserted item: %s %v", v, err)
	}
	if p, _ := user("acct-2"); p != `{"name": "Renamed", "email": "user2@example.com", "created_at": "2020-01-01T00:02:00+00:00"}` {
		t.Fatalf("updated user: %s", p)
	}
	if _, err := user("acct-3"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("deleted user: %v", err)
	}
	if _, err := item("acct-3", "theme"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("deleted user's item: %v", err)
	}
	if _, err := item("acct-4", "theme"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("renamed item's old key: %v", err)
	}
	if v, err := item("acct-4", "colour"); err != nil || v != `{"dark": true, "size": 4}` {
		t.Fatalf("renamed item: %s %v", v, err)
	}
	// The import runs without --events: the changes it follows publish
	// nothing either.
	if _, _, outbox, _ := shardCounts(t, dsns); outbox != 0 {
		t.Fatalf("%d change events written without --events", outbox)
	}

	st, err := GetStatus(ctx, cl, src, "default")
	if err != nil {
		t.Fatal(err)
	}
	if st.State != catalog.ImportFollowing || !st.SlotActive || st.Tables[0].Inserts+st.Tables[0].Updates+st.Tables[0].Deletes == 0 && st.Heartbeat > time.Second {
		t.Fatalf("status %+v", st)
	}

	res, err := Cutover(ctx, cl, m, src, "default", CutoverOptions{Timeout: 30 * time.Second})
	if err != nil {
		t.Fatalf("cutover: %v (%+v)", err, res)
	}
	if !res.Verify.OK || len(res.Steps) == 0 {
		t.Fatalf("cutover %+v", res)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("follow: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the follower did not stop at cutover")
	}
	var slots int
	if err := sconn.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots`).Scan(&slots); err != nil || slots != 0 {
		t.Fatalf("slots after cutover: %d %v", slots, err)
	}
	rec, _, _ := cl.Catalog.GetImport(ctx, "default")
	if rec.State != catalog.ImportCutOver {
		t.Fatalf("state %s", rec.State)
	}
}

// With --events, the follow phase writes a change event for each change
// it applies, as the bulk phase does for each row.
func TestFollowEvents(t *testing.T) {
	ctx := context.Background()
	const n = 10
	src := legacy(t, n)
	cl, _, dsns := newCluster(t)
	m := legacyMapping(t)
	if err := Start(ctx, cl, m, src, Options{Events: true}); err != nil {
		t.Fatal(err)
	}
	if _, _, outbox, _ := shardCounts(t, dsns); outbox != 2*n {
		t.Fatalf("bulk events %d, want %d", outbox, 2*n)
	}
	fctx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan error, 1)
	var applied atomic.Int64
	go func() {
		done <- Follow(fctx, cl, m, src, "default", FollowOptions{OnApply: func(string, time.Duration) { applied.Add(1) }})
	}()
	sconn := connect(t, src)
	for _, q := range []string{
		`UPDATE accounts SET name = 'Renamed' WHERE id = 2`,
		`DELETE FROM account_settings WHERE account_id = 3`,
	} {
		if _, err := sconn.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for applied.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d of 2 changes applied", applied.Load())
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, _, outbox, _ := shardCounts(t, dsns); outbox != 2*n+2 {
		t.Fatalf("events %d, want %d (an upsert and a delete)", outbox, 2*n+2)
	}
}

// A TRUNCATE of a mapped table stops the follower after applying what came
// before it, with an error naming the table, also recorded for status.
func TestFollowStopsAtTruncate(t *testing.T) {
	ctx := context.Background()
	src := legacy(t, 10)
	cl, _, _ := newCluster(t)
	m := legacyMapping(t)
	if err := Start(ctx, cl, m, src, Options{}); err != nil {
		t.Fatal(err)
	}
	sconn := connect(t, src)
	for _, q := range []string{
		`UPDATE accounts SET name = 'Before' WHERE id = 2`,
		`TRUNCATE account_settings`,
	} {
		if _, err := sconn.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err := Follow(fctx, cl, m, src, "default", FollowOptions{})
	if !errors.Is(err, ErrTruncated) || !strings.Contains(err.Error(), "public.account_settings (table account_settings)") ||
		!strings.Contains(err.Error(), "import cancel") {
		t.Fatalf("follow: %v", err)
	}
	p := router.Partition("acct-2", cl.Partitions())
	if u, err := cl.Owner(p).GetUser(ctx, p, "acct-2"); err != nil || !strings.Contains(string(u.Profile), "Before") {
		t.Fatalf("the change before the TRUNCATE: %s %v", u.Profile, err)
	}
	st, err := GetStatus(ctx, cl, src, "default")
	if err != nil || !strings.Contains(st.Error, "TRUNCATE of public.account_settings") {
		t.Fatalf("status error %q, %v", st.Error, err)
	}
	// Started again, it stops there again.
	if err := Follow(fctx, cl, m, src, "default", FollowOptions{}); !errors.Is(err, ErrTruncated) {
		t.Fatalf("follow again: %v", err)
	}
}
