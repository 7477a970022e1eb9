package importer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
)

// writeExport writes an export of n users (version 5) with one item each
// (version 7) by hand, as 'shardctl export' lays it out.
func writeExport(t *testing.T, n int) string {
	t.Helper()
	dir := t.TempDir()
	uw, err := NewNDJSONWriter(dir, "users-00000-04095.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	iw, err := NewNDJSONWriter(dir, "items-00000-04095.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		id := fmt.Sprintf("u-%05d", i)
		if err := uw.Write(UserLine{UserID: id, Profile: []byte(`{"n": 1}`), Version: 5}); err != nil {
			t.Fatal(err)
		}
		if err := iw.Write(ItemLine{UserID: id, Collection: "c", Key: "k", Value: []byte(`1`), Version: 7}); err != nil {
			t.Fatal(err)
		}
	}
	users, err := uw.Finish()
	if err != nil {
		t.Fatal(err)
	}
	items, err := iw.Finish()
	if err != nil {
		t.Fatal(err)
	}
	m := &Manifest{Format: ExportFormat, PartitionCount: 4096, Complete: true,
		Ranges: []ManifestRange{{First: 0, Last: 4095, Users: users, Items: items}}}
	if err := WriteManifest(dir, m); err != nil {
		t.Fatal(err)
	}
	return dir
}

// An NDJSON load stopped midway continues from its checkpoints, and keeps
// the exported versions.
func TestImportNDJSONResumes(t *testing.T) {
	const n = 2000
	dir := writeExport(t, n)
	cl, _, dsns := newCluster(t)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for ctx.Err() == nil {
			if _, tabs, err := cl.Catalog.GetImport(context.Background(), "default"); err == nil && tabs[0].RowsCopied >= 100 {
				cancel()
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	_, err := ImportNDJSON(ctx, cl, dir, NDJSONOptions{BatchRows: 10})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("first load: %v", err)
	}
	_, tabs, err := cl.Catalog.GetImport(context.Background(), "default")
	if err != nil {
		t.Fatal(err)
	}
	if tabs[0].RowsCopied < 100 || tabs[0].RowsCopied >= n || tabs[0].Done {
		t.Fatalf("checkpoint after the stop: %+v", tabs[0])
	}
	res, err := ImportNDJSON(context.Background(), cl, dir, NDJSONOptions{BatchRows: 500})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Resumed || res.Users != n || res.Items != n || res.Written > int64(2*n)-tabs[0].RowsCopied {
		t.Fatalf("resumed load: %+v (checkpoint %d)", res, tabs[0].RowsCopied)
	}
	users, items, _, _ := shardCounts(t, dsns)
	if users != n || items != n {
		t.Fatalf("users %d items %d", users, items)
	}
	p := router.Partition("u-00042", cl.Partitions())
	if u, err := cl.Owner(p).GetUser(context.Background(), p, "u-00042"); err != nil || u.Version != 5 {
		t.Fatalf("user %+v %v, want the exported version 5", u, err)
	}
	if it, err := cl.Owner(p).GetItem(context.Background(), p, "u-00042", "c", "k"); err != nil || it.Version != 7 {
		t.Fatalf("item %+v %v, want the exported version 7", it, err)
	}
	// Done: loading again starts afresh and writes nothing.
	res, err = ImportNDJSON(context.Background(), cl, dir, NDJSONOptions{})
	if err != nil || res.Resumed || res.Written != 0 || res.Users != n {
		t.Fatalf("load again: %+v %v", res, err)
	}
}

// A load of an export stopped midway is cancelled without a source
// database; with --purge every row it wrote is removed, and a cancel
// given another export purges nothing.
func TestCancelNDJSONLoad(t *testing.T) {
	const n = 1000
	dir := writeExport(t, n)
	other := writeExport(t, 10)
	cl, _, dsns := newCluster(t)

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	// Stop once the users are in and some items are.
	go func() {
		for ctx.Err() == nil {
			_, tabs, err := cl.Catalog.GetImport(context.Background(), "default")
			for _, tab := range tabs {
				if err == nil && strings.HasPrefix(tab.Name, "items-") && tab.RowsCopied >= 100 {
					stop()
					return
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	if _, err := ImportNDJSON(ctx, cl, dir, NDJSONOptions{BatchRows: 10}); !errors.Is(err, context.Canceled) {
		t.Fatalf("first load: %v", err)
	}
	users, items, _, _ := shardCounts(t, dsns)
	if users == 0 || items == 0 {
		t.Fatalf("after the stop: %d users, %d items; want some of each", users, items)
	}

	bg := context.Background()
	if _, err := Cancel(bg, cl, "default", CancelOptions{ExportDir: other, Purge: true}); err == nil || !strings.Contains(err.Error(), "not the export") {
		t.Fatalf("cancel with another export: %v", err)
	}
	if _, err := Cancel(bg, cl, "default", CancelOptions{Purge: true}); err == nil || !strings.Contains(err.Error(), "export's directory") {
		t.Fatalf("purge without the export: %v", err)
	}
	if u, i, _, _ := shardCounts(t, dsns); u != users || i != items {
		t.Fatalf("a refused cancel changed the shards: %d/%d users, %d/%d items", u, users, i, items)
	}
	res, err := Cancel(bg, cl, "default", CancelOptions{ExportDir: dir, Purge: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Purged[EntityUser] != users || res.Purged[EntityItem] > items {
		t.Fatalf("purged %+v; the load had written %d users, %d items", res.Purged, users, items)
	}
	if u, i, _, _ := shardCounts(t, dsns); u != 0 || i != 0 {
		t.Fatalf("after the purge: %d users, %d items left", u, i)
	}
	if _, _, err := cl.Catalog.GetImport(bg, "default"); !errors.Is(err, catalog.ErrNoImport) {
		t.Fatalf("import record after cancel: %v", err)
	}
	// Loading again starts from nothing and loads everything.
	res2, err := ImportNDJSON(bg, cl, dir, NDJSONOptions{})
	if err != nil || res2.Resumed || res2.Users != n || res2.Items != n {
		t.Fatalf("load after cancel: %+v %v", res2, err)
	}
	// A finished load is live data: it cannot be cancelled.
	if _, err := Cancel(bg, cl, "default", CancelOptions{ExportDir: dir, Purge: true}); err == nil || !strings.Contains(err.Error(), "live data") {
		t.Fatalf("cancel after the load finished: %v", err)
	}
}
