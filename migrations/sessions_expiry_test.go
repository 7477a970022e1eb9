package migrations

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pressly/goose/v3"

	"github.com/shardgate/shardgate/internal/testenv"
)

// indexState reports whether the sweeper's index exists and is valid.
func indexState(t *testing.T, ctx context.Context, conn *pgx.Conn) (exists, valid bool) {
	t.Helper()
	err := conn.QueryRow(ctx, `SELECT true, i.indisvalid FROM pg_index AS i
		JOIN pg_class AS c ON c.oid = i.indexrelid WHERE c.relname = 'sessions_expires'`).Scan(&exists, &valid)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return exists, valid
}

// Shard migration 00004 builds its index outside a transaction
// (CONCURRENTLY); its Down drops it, and an Up interrupted earlier, which
// left an invalid index behind, is finished by the next Up.
func TestSessionsExpiryIndex(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dsn := testenv.NewDatabase(t)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	provider := func(fn func(*goose.Provider) error) {
		t.Helper()
		if err := withProvider(dsn, Shard, fn); err != nil {
			t.Fatal(err)
		}
	}

	if _, err := Up(ctx, dsn, Shard); err != nil {
		t.Fatal(err)
	}
	if exists, valid := indexState(t, ctx, conn); !exists || !valid {
		t.Fatalf("after Up: index exists %v, valid %v", exists, valid)
	}
	provider(func(p *goose.Provider) error { _, err := p.DownTo(ctx, 3); return err })
	if exists, _ := indexState(t, ctx, conn); exists {
		t.Fatal("index still there after Down")
	}

	// A build that failed half-way: CREATE INDEX CONCURRENTLY leaves the
	// index behind, invalid.
	if _, err := conn.Exec(ctx, `INSERT INTO sessions (partition, token_hash, user_id, data, expires_at, version)
		SELECT 1, sha256(i::text::bytea), 'u', '{}', '2030-01-01', 1 FROM generate_series(1, 2) AS i`); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `CREATE UNIQUE INDEX CONCURRENTLY sessions_expires ON sessions (expires_at)`); err == nil {
		t.Fatal("a unique index over duplicates was built")
	}
	if exists, valid := indexState(t, ctx, conn); !exists || valid {
		t.Fatalf("after the failed build: index exists %v, valid %v; want an invalid one", exists, valid)
	}
	applied, err := Up(ctx, dsn, Shard)
	if err != nil || len(applied) == 0 || applied[0] != 4 {
		t.Fatalf("Up over the leftover = %v, %v; want it to start at 4", applied, err)
	}
	if exists, valid := indexState(t, ctx, conn); !exists || !valid {
		t.Fatalf("after Up over the leftover: index exists %v, valid %v", exists, valid)
	}
}
