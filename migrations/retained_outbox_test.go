package migrations

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pressly/goose/v3"

	"github.com/shardgate/shardgate/internal/testenv"
)

// Shard 00010 and catalog 00009 start each delivered tick just below the
// oldest row still in the outbox (the relays deleted what they delivered),
// or at the clock when the outbox holds none of the partition's rows.
func TestRetainedOutboxMigrationsStartBelowTheUndelivered(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		kind             Kind
		before           int64
		insert, delivers string
		delivered        string
		want             string
	}{
		{Shard, 9, `INSERT INTO outbox (partition, user_id, entity, key, op, version)
			SELECT i % 3, 'u', 'user', 'u', 'upsert', i FROM generate_series(1, 12) AS i`,
			`DELETE FROM outbox WHERE (partition = 0 AND tick <= 2) OR partition = 2`,
			`SELECT string_agg(partition || ':' || tick, ',' ORDER BY partition) FROM outbox_delivered`,
			"0:2,1:0,2:4"},
		{Catalog, 8, `INSERT INTO config_outbox (namespace, key, op, version)
			SELECT 'ns', 'k' || i, 'upsert', 1 FROM generate_series(1, 5) AS i`,
			`DELETE FROM config_outbox WHERE tick <= 3`,
			`SELECT tick::text FROM config_outbox_delivered`,
			"3"},
	} {
		t.Run(string(c.kind), func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			dsn := testenv.NewDatabase(t)
			if err := withProvider(dsn, c.kind, func(p *goose.Provider) error { _, err := p.UpTo(ctx, c.before); return err }); err != nil {
				t.Fatal(err)
			}
			conn, err := pgx.Connect(ctx, dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			for _, sql := range []string{c.insert, c.delivers} {
				if _, err := conn.Exec(ctx, sql); err != nil {
					t.Fatalf("%s: %v", sql, err)
				}
			}
			if _, err := Up(ctx, dsn, c.kind); err != nil {
				t.Fatal(err)
			}
			var got string
			if err := conn.QueryRow(ctx, c.delivered).Scan(&got); err != nil || got != c.want {
				t.Fatalf("delivered ticks %q, %v; want %q", got, err, c.want)
			}
		})
	}
}
