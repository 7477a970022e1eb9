package importer

import (
	"context"
	"testing"
	"time"

	"github.com/shardgate/shardgate/catalog"
)

// Status gives a table its own lag only while a change of it waits; the
// slot's lag covers every table.
func TestStatusLagPerTable(t *testing.T) {
	ctx := context.Background()
	src := legacy(t, 10)
	cl, _, _ := newCluster(t)
	m := legacyMapping(t)
	if err := Start(ctx, cl, m, src, Options{}); err != nil {
		t.Fatal(err)
	}
	rec, _, err := cl.Catalog.GetImport(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	err = cl.Catalog.RecordFollow(ctx, "default", rec.StartLSN, time.Now(), []catalog.FollowTableProgress{
		{Name: "accounts", PendingSince: time.Now().Add(-2 * time.Second), PendingLSN: rec.StartLSN},
		{Name: "account_settings"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := connect(t, src).Exec(ctx, `UPDATE accounts SET name = 'x' WHERE id = 1`); err != nil {
		t.Fatal(err)
	}
	st, err := GetStatus(ctx, cl, src, "default")
	if err != nil {
		t.Fatal(err)
	}
	a, s := st.Tables[0], st.Tables[1]
	if st.LagBytes <= 0 || !a.Pending || a.LagBytes != st.LagBytes || a.LagSeconds < 2 || s.Pending || s.LagBytes != 0 || s.LagSeconds != 0 {
		t.Fatalf("status %+v", st)
	}
}
