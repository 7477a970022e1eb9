package importer

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

func TestVerifyAndCancel(t *testing.T) {
	ctx := context.Background()
	const n = 1000
	src := legacy(t, n)
	cl, _, dsns := newCluster(t)
	m := legacyMapping(t)
	// The cluster held data before the import: outside the import's key
	// space, it is no extra row.
	px := router.Partition("stranger", cl.Partitions())
	if _, err := cl.Owner(px).ImportUsers(ctx, []shards.ImportUser{{Partition: px, UserID: "stranger", Profile: []byte(`{}`)}}, false); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Owner(px).ImportItems(ctx, []shards.ImportItem{{Partition: px, UserID: "stranger", Collection: "settings", Key: "theme", Value: []byte(`1`)}}, false, false); err != nil {
		t.Fatal(err)
	}
	if err := Start(ctx, cl, m, src, Options{}); err != nil {
		t.Fatal(err)
	}
	rep, err := Verify(ctx, cl, m, src, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK || len(rep.Tables) != 2 || len(rep.Extra) != 0 || rep.Scope.UserPrefix != "acct-" || !rep.Scope.UsersChecked ||
		len(rep.Scope.Collections) != 1 || rep.Scope.Collections[0] != "settings" {
		t.Fatalf("verify after import: %+v", rep)
	}
	for _, vt := range rep.Tables {
		if vt.Rows != n || vt.Matched != n || vt.SourceHash != vt.TargetHash {
			t.Fatalf("table %+v", vt)
		}
	}

	// Corrupt a user, lose an item, add a user the source does not have.
	shardOf := func(id string) (int32, string) {
		p := router.Partition(id, cl.Partitions())
		return p, dsns[strings.TrimPrefix(cl.Table().Owner(p), "shard-")[0]-'0']
	}
	p5, dsn5 := shardOf("acct-5")
	if _, err := connect(t, dsn5).Exec(ctx, `UPDATE users SET profile = '{"name": "Mallory"}' WHERE partition = $1 AND user_id = 'acct-5'`, p5); err != nil {
		t.Fatal(err)
	}
	p9, dsn9 := shardOf("acct-9")
	if _, err := connect(t, dsn9).Exec(ctx, `DELETE FROM items WHERE partition = $1 AND user_id = 'acct-9'`, p9); err != nil {
		t.Fatal(err)
	}
	pe := router.Partition("acct-extra", cl.Partitions())
	if _, err := cl.Owner(pe).ImportUsers(ctx, []shards.ImportUser{{Partition: pe, UserID: "acct-extra", Profile: []byte(`{}`)}}, false); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Owner(pe).ImportItems(ctx, []shards.ImportItem{
		{Partition: pe, UserID: "acct-extra", Collection: "other", Key: "k", Value: []byte(`1`)}, // another collection: not the import's
		{Partition: pe, UserID: "acct-extra", Collection: "settings", Key: "theme", Value: []byte(`1`)},
	}, false, false); err != nil {
		t.Fatal(err)
	}
	rep, err = Verify(ctx, cl, m, src, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	u, it := rep.Tables[0], rep.Tables[1]
	// The item in another collection does not count; the lost item does
	// not hide the extra one.
	if rep.OK || u.Different != 1 || u.Matched != n-1 || u.SourceHash == u.TargetHash || it.Missing != 1 || rep.Extra[EntityUser] != 1 || rep.Extra[EntityItem] != 1 ||
		!strings.Contains(strings.Join(u.Diffs, "\n"), `row (id)=(5): user "acct-5" differs: source {"name": "User 5", "email": "user5@example.com", "created_at": "2020-01-01T00:05:00+00:00"}, Shardgate {"name": "Mallory"}`) ||
		!strings.Contains(strings.Join(it.Diffs, "\n"), `row (account_id,name)=(9,theme): item "acct-9" settings/theme is missing in Shardgate`) {
		t.Fatalf("verify after corruption: %+v", rep)
	}

	// Cancel with purge removes what was imported, the slot and the
	// checkpoints; the stranger and acct-extra (which the source does not
	// map) stay.
	res, err := Cancel(ctx, cl, "default", CancelOptions{SourceDSN: src, Mapping: m, Purge: true})
	if err != nil {
		t.Fatal(err)
	}
	if !res.SlotDropped || res.Purged[EntityUser] != n || res.Purged[EntityItem] != n-1 {
		t.Fatalf("cancel: %+v", res)
	}
	users, items, _, _ := shardCounts(t, dsns)
	if users != 2 || items != 3 {
		t.Fatalf("after purge: users %d items %d", users, items)
	}
	if _, _, err := cl.Catalog.GetImport(ctx, "default"); !errors.Is(err, catalog.ErrNoImport) {
		t.Fatalf("import record after cancel: %v", err)
	}
	var slots int
	if err := connect(t, src).QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots`).Scan(&slots); err != nil || slots != 0 {
		t.Fatalf("slots left: %d %v", slots, err)
	}
	// A new import starts from nothing and versions keep rising.
	if err := Start(ctx, cl, m, src, Options{}); err != nil {
		t.Fatal(err)
	}
	p1 := router.Partition("acct-1", cl.Partitions())
	if got, err := cl.Owner(p1).GetUser(ctx, p1, "acct-1"); err != nil || got.Version != 3 {
		t.Fatalf("reimported user: %+v %v (want version 3: after its purge's tombstone)", got, err)
	}
}
