package catalog_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
)

// The watcher survives losing its LISTEN connection: it reconnects, and the
// version check after reconnecting picks up a change made while it was gone.
func TestWatcherReconnectsAndCatchesUp(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	catDSN, cat := newCluster(t, ctx, 64, "a", "b")
	w := &catalog.Watcher{
		Catalog: cat, Router: &router.Router{}, DSN: catDSN,
		Interval: time.Hour, // only notifications and reconnects can bring news
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(wctx) }()
	defer func() { stop(); <-done }()

	admin, err := pgx.Connect(ctx, catDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	waitVersion := func(want int64) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			if tb := w.Router.Table(); tb != nil && tb.Version() >= want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("router never reached topology version %d", want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	version := func() int64 {
		v, err := cat.TopologyVersion(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	waitVersion(version())
	listening := func() int {
		var n int
		if err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()`,
			catalog.WatchApplicationName).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for listening() == 0 {
		time.Sleep(10 * time.Millisecond)
	}

	// A change while listening arrives by notification.
	move := func(p int) {
		if _, err := admin.Exec(ctx, `UPDATE partitions SET shard = CASE shard WHEN 'a' THEN 'b' ELSE 'a' END WHERE partition = $1`, p); err != nil {
			t.Fatal(err)
		}
	}
	move(1)
	waitVersion(version())

	// Kill the LISTEN connection and change the map in the same round trip,
	// well inside the watcher's reconnect backoff: the notification is lost,
	// and only the check after reconnecting can bring the change.
	if _, err := admin.Exec(ctx, `
		SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE application_name = '`+catalog.WatchApplicationName+`' AND datname = current_database();
		UPDATE partitions SET shard = CASE shard WHEN 'a' THEN 'b' ELSE 'a' END WHERE partition = 2;`); err != nil {
		t.Fatal(err)
	}
	want := version()
	waitVersion(want)
	if got := w.Topology().Table.Owner(2); got != w.Router.Table().Owner(2) {
		t.Fatalf("watcher topology and router disagree on partition 2: %s vs %s", got, w.Router.Table().Owner(2))
	}
}

// With no LISTEN connection at all (say a pooler refuses LISTEN), the
// watcher still polls the version through the catalog pool.
func TestWatcherPollsWithoutListen(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, cat := newCluster(t, ctx, 16, "a", "b")
	w := &catalog.Watcher{
		Catalog: cat, Router: &router.Router{},
		DSN:      "postgres://postgres@127.0.0.1:1/none?connect_timeout=1", // LISTEN can never connect
		Interval: time.Hour,
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(wctx) }()
	defer func() { stop(); <-done }()
	if _, err := cat.Pool().Exec(ctx, `UPDATE partitions SET shard = 'b' WHERE partition = 0`); err != nil {
		t.Fatal(err)
	}
	want, err := cat.TopologyVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if tb := w.Router.Table(); tb != nil && tb.Version() >= want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the watcher never polled the new version without LISTEN")
		}
	}
}
