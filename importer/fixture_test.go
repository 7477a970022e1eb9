package importer

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/testenv"
)

// legacy creates the legacy source database of the tests on a PostgreSQL
// server of its own (logical decoding needs wal_level=logical): n accounts
// (id 1..n) with one setting each, so 2n rows. Its DSN is returned.
func legacy(t testing.TB, n int) string {
	t.Helper()
	dsn := testenv.NewPGCluster(t).CreateDatabase("legacy")
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, fmt.Sprintf(`
		CREATE TABLE accounts (
			id bigint PRIMARY KEY, email text NOT NULL, name text,
			created_at timestamptz NOT NULL DEFAULT now());
		CREATE TABLE account_settings (
			account_id bigint NOT NULL REFERENCES accounts ON DELETE CASCADE,
			name text NOT NULL, value jsonb NOT NULL,
			PRIMARY KEY (account_id, name));
		INSERT INTO accounts
		SELECT g, 'user' || g || '@example.com', 'User ' || g, timestamptz '2020-01-01 00:00Z' + g * interval '1 minute'
		FROM generate_series(1, %d) AS g;
		INSERT INTO account_settings
		SELECT g, 'theme', jsonb_build_object('dark', g %% 2 = 0, 'size', g %% 7)
		FROM generate_series(1, %d) AS g;`, n, n))
	if err != nil {
		t.Fatal(err)
	}
	return dsn
}

func legacyMapping(t testing.TB) *Mapping {
	t.Helper()
	b, err := os.ReadFile("testdata/legacy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m, err := ParseMapping(b)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func connect(t testing.TB, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}
