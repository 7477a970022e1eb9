package importer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/router"
)

// newCluster creates a catalog with four shards and returns it opened.
func newCluster(t testing.TB) (*Cluster, string, []string) {
	t.Helper()
	ctx := context.Background()
	catalogDSN := testenv.NewDatabase(t)
	var specs []catalog.ShardSpec
	var dsns []string
	for i := range 4 {
		dsn := testenv.NewDatabase(t)
		dsns = append(dsns, dsn)
		specs = append(specs, catalog.ShardSpec{Name: fmt.Sprintf("shard-%d", i), DSN: dsn})
	}
	if err := catalog.CreateCluster(ctx, catalogDSN, router.RingConfig{}, specs); err != nil {
		t.Fatal(err)
	}
	cl, err := OpenCluster(ctx, catalogDSN, 3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl, catalogDSN, dsns
}

// shardCounts sums over the shards: users, items, outbox rows, and rows
// whose version is not 1.
func shardCounts(t testing.TB, dsns []string) (users, items, outbox, bumped int64) {
	t.Helper()
	ctx := context.Background()
	for _, dsn := range dsns {
		conn := connect(t, dsn)
		var u, i, o, b int64
		if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM items), (SELECT count(*) FROM outbox),
			(SELECT count(*) FROM users WHERE version <> 1) + (SELECT count(*) FROM items WHERE version <> 1)`).Scan(&u, &i, &o, &b); err != nil {
			t.Fatal(err)
		}
		users, items, outbox, bumped = users+u, items+i, outbox+o, bumped+b
		conn.Close(ctx)
	}
	return
}

func TestImportBulk(t *testing.T) {
	ctx := context.Background()
	const n = 2500
	src := legacy(t, n)
	cl, _, dsns := newCluster(t)
	m := legacyMapping(t)

	if err := Start(ctx, cl, m, src, Options{BatchRows: 200}); err != nil {
		t.Fatal(err)
	}
	users, items, outbox, bumped := shardCounts(t, dsns)
	if users != n || items != n || outbox != 0 || bumped != 0 {
		t.Fatalf("users %d items %d outbox %d bumped %d, want %d %d 0 0", users, items, outbox, bumped, n, n)
	}
	rec, tabs, err := cl.Catalog.GetImport(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	if rec.State != catalog.ImportFollowing || rec.StartLSN == "" || !tabs[0].Done || tabs[0].RowsCopied != n || tabs[1].RowsCopied != n || tabs[1].TotalRows != n {
		t.Fatalf("import %+v tables %+v", rec, tabs)
	}
	// The mapped values, as the API reads them.
	p := router.Partition("acct-42", cl.Partitions())
	u, err := cl.Owner(p).GetUser(ctx, p, "acct-42")
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"name": "User 42", "email": "user42@example.com", "created_at": "2020-01-01T00:42:00+00:00"}`; string(u.Profile) != want || u.Version != 1 {
		t.Fatalf("user %s v%d, want %s", u.Profile, u.Version, want)
	}
	it, err := cl.Owner(p).GetItem(ctx, p, "acct-42", "settings", "theme")
	if err != nil {
		t.Fatal(err)
	}
	if string(it.Value) != `{"dark": true, "size": 0}` {
		t.Fatalf("item %s", it.Value)
	}
	// One process at a time runs an import.
	release, err := cl.Catalog.LockImport(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	if err := Start(ctx, cl, m, src, Options{}); !errors.Is(err, catalog.ErrImportBusy) {
		t.Fatalf("a second process: %v", err)
	}
	if err := Follow(ctx, cl, m, src, "default", FollowOptions{}); !errors.Is(err, catalog.ErrImportBusy) {
		t.Fatalf("a second follower: %v", err)
	}
	release()
	// A second start has nothing left to do.
	if err := Start(ctx, cl, m, src, Options{}); err != nil {
		t.Fatal(err)
	}
	// Another mapping is refused while the import is open.
	m2 := legacyMapping(t)
	m2.Tables[0].Profile = m2.Tables[0].Profile[:1]
	if err := Start(ctx, cl, m2, src, Options{}); err == nil || !strings.Contains(err.Error(), "another mapping") {
		t.Fatalf("another mapping: %v", err)
	}
}

// A bulk phase stopped mid-way (its context cancelled, as a kill would stop
// it) continues where it stopped: nothing missing, nothing doubled.
func TestImportResume(t *testing.T) {
	const n = 5000
	src := legacy(t, n)
	cl, _, dsns := newCluster(t)
	m := legacyMapping(t)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	err := Start(ctx, cl, m, src, Options{BatchRows: 100, Parallel: 1, Progress: func(p Progress) {
		if p.Table == "accounts" && p.Copied >= 1500 {
			cancel()
		}
	}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("first start: %v", err)
	}
	_, tabs, err := cl.Catalog.GetImport(context.Background(), "default")
	if err != nil {
		t.Fatal(err)
	}
	// Progress counts rows written; the checkpoint only those with every
	// row before them written (the second reader's range waits for the
	// first's).
	if tabs[0].Done || tabs[0].RowsCopied == 0 || tabs[0].RowsCopied >= n {
		t.Fatalf("checkpoint after the stop: %+v", tabs[0])
	}
	// The source changes while the import is down; the new rows are read
	// by the resumed bulk phase (the follow phase replays them too).
	sconn := connect(t, src)
	if _, err := sconn.Exec(context.Background(), `INSERT INTO accounts VALUES (999999, 'late@example.com', 'Late', now())`); err != nil {
		t.Fatal(err)
	}
	if err := Start(context.Background(), cl, m, src, Options{BatchRows: 100}); err != nil {
		t.Fatal(err)
	}
	users, items, outbox, bumped := shardCounts(t, dsns)
	if users != n+1 || items != n || outbox != 0 || bumped != 0 {
		t.Fatalf("users %d items %d outbox %d bumped %d, want %d %d 0 0", users, items, outbox, bumped, n+1, n)
	}
	_, tabs, _ = cl.Catalog.GetImport(context.Background(), "default")
	if tabs[0].RowsCopied != n+1 || tabs[1].RowsCopied != n {
		t.Fatalf("tables %+v", tabs)
	}
}

// Bad rows stop the import with an error naming table, key and field; with
// SkipInvalid they are counted and written to the rejects file.
func TestImportInvalidRows(t *testing.T) {
	ctx := context.Background()
	src := legacy(t, 300)
	sconn := connect(t, src)
	if _, err := sconn.Exec(ctx, `
		ALTER TABLE account_settings DROP CONSTRAINT account_settings_account_id_fkey;
		INSERT INTO account_settings VALUES (5000, 'theme', '1'), (17, 'big', to_jsonb(repeat('x', 70000)))`); err != nil {
		t.Fatal(err)
	}
	m, err := ParseMapping([]byte(`
tables:
  - source: accounts
    entity: user
    user_id: "CASE WHEN id = 7 THEN 'bad id' ELSE 'acct-' || id END"
    profile_sql: "CASE WHEN id = 8 THEN '[1]'::jsonb ELSE jsonb_build_object('email', email) END"
  - source: account_settings
    entity: item
    user_id: "'acct-' || account_id"
    collection: "'settings'"
    key: name
    value: value
`))
	if err != nil {
		t.Fatal(err)
	}
	cl, _, dsns := newCluster(t)
	err = Start(ctx, cl, m, src, Options{})
	if err == nil || !strings.Contains(err.Error(), `table accounts, row (id)=(7): user_id: "bad id" is not a valid user ID`) {
		t.Fatalf("error %v", err)
	}
	if _, _, err := cl.Catalog.GetImport(ctx, "default"); err != nil {
		t.Fatal(err)
	}
	var rejects bytes.Buffer
	if err := Start(ctx, cl, m, src, Options{SkipInvalid: true, Rejects: &rejects}); err != nil {
		t.Fatal(err)
	}
	users, items, _, _ := shardCounts(t, dsns)
	// accounts 7 and 8 are rejected, so are their settings and the
	// settings of the missing account 5000, and the oversized value.
	if users != 298 || items != 298 {
		t.Fatalf("users %d items %d", users, items)
	}
	out := rejects.String()
	for _, want := range []string{
		`{"error":"\"bad id\" is not a valid user ID: byte 3 (' ') is not one of [A-Za-z0-9._:@-]","field":"user_id","key":{"id":"7"},"table":"accounts"}`,
		`"field":"profile_sql","key":{"id":"8"}`,
		`{"error":"user \"acct-5000\" does not exist in Shardgate","field":"user_id","key":{"account_id":"5000","name":"theme"},"table":"account_settings"}`,
		`"key":{"account_id":"17","name":"big"}`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("rejects lack %s:\n%s", want, out)
		}
	}
	_, tabs, _ := cl.Catalog.GetImport(ctx, "default")
	if tabs[0].RowsRejected != 2 || tabs[1].RowsRejected != 4 || tabs[1].RowsCopied != 298 {
		t.Fatalf("tables %+v", tabs)
	}
	_ = pgx.Identifier{}
}
