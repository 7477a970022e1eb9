package migrations

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/testenv"
)

// No write notifies at commit: a NOTIFY serializes every notifying commit
// on the server (shard migration 00009, catalog 00008). A listener on the
// channels the outbox triggers used to notify hears nothing.
func TestOutboxWritesDoNotNotify(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		kind    Kind
		channel string
		insert  string
	}{
		{Shard, "shardgate_outbox", `INSERT INTO outbox (partition, user_id, entity, key, op, version) VALUES (1, 'u', 'user', 'u', 'upsert', 1)`},
		{Catalog, "shardgate_config_outbox", `INSERT INTO config_outbox (namespace, key, op, version) VALUES ('ns', 'k', 'upsert', 1)`},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		dsn := testenv.NewDatabase(t)
		if _, err := Up(ctx, dsn, c.kind); err != nil {
			t.Fatal(err)
		}
		listener, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer listener.Close(context.Background())
		if _, err := listener.Exec(ctx, "LISTEN "+c.channel); err != nil {
			t.Fatal(err)
		}
		writer, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer writer.Close(context.Background())
		if _, err := writer.Exec(ctx, c.insert); err != nil {
			t.Fatalf("%s: %v", c.kind, err)
		}
		wctx, wcancel := context.WithTimeout(ctx, 300*time.Millisecond)
		n, err := listener.WaitForNotification(wctx)
		wcancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%s: an outbox insert notified (%v, %v)", c.kind, n, err)
		}
		var triggers int
		if err := writer.QueryRow(ctx, `SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%notify%'`).Scan(&triggers); err != nil || triggers != 0 {
			t.Fatalf("%s: %d notify triggers left (%v)", c.kind, triggers, err)
		}
	}
}
