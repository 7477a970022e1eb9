package migrations

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/testenv"
)

// An outbox INSERT statement notifies the relays only if it inserted rows:
// a conditional write that inserted nothing wakes nobody.
func TestOutboxNotifiesOnlyWhenRowsInserted(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		kind    Kind
		channel string
		insert  string // $1: whether to insert the row
	}{
		{Shard, "shardgate_outbox", `INSERT INTO outbox (partition, user_id, entity, key, op, version)
			SELECT 1, 'u', 'user', 'u', 'upsert', 1 WHERE $1`},
		{Catalog, "shardgate_config_outbox", `INSERT INTO config_outbox (namespace, key, op, version)
			SELECT 'ns', 'k', 'upsert', 1 WHERE $1`},
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
		// Nothing inserted, then one row: both commit before the listener
		// reads, in that order, so it holds two notifications if the first
		// statement sent one.
		for _, insert := range []bool{false, true} {
			if _, err := writer.Exec(ctx, c.insert, insert); err != nil {
				t.Fatalf("%s: %v", c.kind, err)
			}
		}
		if _, err := listener.WaitForNotification(ctx); err != nil {
			t.Fatalf("%s: no notification for the inserted row: %v", c.kind, err)
		}
		wctx, wcancel := context.WithTimeout(ctx, 200*time.Millisecond)
		n, err := listener.WaitForNotification(wctx)
		wcancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%s: a second notification (%v, %v): the empty insert notified too", c.kind, n, err)
		}
	}
}
