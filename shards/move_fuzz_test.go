package shards

import (
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// Conninfo never panics, keeps a DSN usable (what parsed still parses),
// drops every pool_ parameter and keeps the rest.
func FuzzConninfo(f *testing.F) {
	for _, s := range []string{
		"postgres://u:p@h:5432/db?sslmode=disable&pool_max_conns=3",
		"host=h port=5 pool_max_conns=3 password='a b' dbname=db",
		"host=h password='it\\'s' statement_cache_capacity=0 sslmode=require",
		"postgresql://h/db?pool_min_conns=1&application_name=x",
		"host = h  dbname=db",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, dsn string) {
		out, err := Conninfo(dsn)
		if err != nil {
			// A fixed text: the DSN, password and all, never appears in it.
			if err.Error() != "invalid DSN (parser details withheld: they may quote a password)" && err.Error() != "invalid DSN URL" {
				t.Fatalf("error %q is not one of the fixed texts", err)
			}
			return
		}
		cfg, err := pgconn.ParseConfig(out)
		if err != nil {
			t.Fatalf("Conninfo(%q) = %q, which does not parse: %v", dsn, out, err)
		}
		for k := range cfg.RuntimeParams {
			if strings.HasPrefix(k, "pool_") {
				t.Fatalf("Conninfo(%q) = %q keeps %s", dsn, out, k)
			}
		}
		in, _ := pgconn.ParseConfig(dsn)
		if in.Host != cfg.Host || in.Port != cfg.Port || in.Database != cfg.Database || in.User != cfg.User || in.Password != cfg.Password {
			t.Fatalf("Conninfo(%q) = %q changed where it connects", dsn, out)
		}
	})
}

// ParseMoveObjectName accepts exactly what MoveObjectName makes.
func FuzzParseMoveObjectName(f *testing.F) {
	for _, s := range []string{"sg0123abcd_move_42", "sg0123abcd_move_007", "sg0123abcd_move_", "x_move_1", "sg0123abcd_move_-3"} {
		f.Add(s, int64(42))
	}
	f.Fuzz(func(t *testing.T, name string, id int64) {
		const prefix = "sg0123abcd"
		if got, ok := ParseMoveObjectName(prefix, name); ok && MoveObjectName(prefix, got) != name {
			t.Fatalf("ParseMoveObjectName(%q) = %d, which names %q", name, got, MoveObjectName(prefix, got))
		}
		if id > 0 {
			if got, ok := ParseMoveObjectName(prefix, MoveObjectName(prefix, id)); !ok || got != id {
				t.Fatalf("round trip of %d: %d, %v", id, got, ok)
			}
		}
	})
}
