package importer

import (
	"context"
	"strings"
	"testing"

	"github.com/shardgate/shardgate/internal/testenv"
)

func TestCheck(t *testing.T) {
	ctx := context.Background()
	src := legacy(t, 500)
	conn := connect(t, src)

	rep, err := Check(ctx, conn, legacyMapping(t), CheckOptions{Partitions: 64, Owner: func(p int32) string {
		if p < 32 {
			return "a"
		}
		return "b"
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK || len(rep.Tables) != 2 || len(rep.Problems) != 0 {
		t.Fatalf("report %+v", rep)
	}
	for _, tr := range rep.Tables {
		if tr.Rows != 500 || tr.Invalid != 0 || tr.Duplicates != 0 || tr.Partitions != 64 ||
			tr.MinPartitionRows == 0 || tr.MaxPartitionRows < tr.MinPartitionRows || tr.PerShard["a"]+tr.PerShard["b"] != 500 {
			t.Fatalf("table %+v", tr)
		}
	}

	// Bad rows: an invalid user ID, a non-object profile, oversized JSON,
	// duplicates and an item without its user; each named by table, key
	// and field.
	if _, err := conn.Exec(ctx, `
		INSERT INTO accounts VALUES (1000001, 'x@example.com', 'has space', now());
		INSERT INTO account_settings VALUES (7, 'big', to_jsonb(repeat('x', 70000)))`); err != nil {
		t.Fatal(err)
	}
	bad, err := ParseMapping([]byte(`
tables:
  - source: accounts
    entity: user
    user_id: "CASE WHEN id = 1000001 THEN name ELSE 'acct-' || id END"
    profile_sql: "CASE WHEN id = 3 THEN to_jsonb(email) ELSE to_jsonb(accounts) END"
  - source: account_settings
    entity: item
    user_id: "'acct-' || (account_id % 400)"
    collection: "'settings'"
    key: "'k'"
    value: value
`))
	if err != nil {
		t.Fatal(err)
	}
	rep, err = Check(ctx, conn, bad, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	all := func(tr TableReport) string { return strings.Join(append(tr.Errors, tr.Warnings...), "\n") }
	u, it := rep.Tables[0], rep.Tables[1]
	if rep.OK || u.Invalid != 2 || u.Rows != 499 ||
		!strings.Contains(all(u), `table accounts, row (id)=(1000001): user_id: "has space" is not a valid user ID: byte 3 (' ')`) ||
		!strings.Contains(all(u), `table accounts, row (id)=(3): profile_sql: a string, not an object`) {
		t.Fatalf("users: %+v", u)
	}
	// account_id % 400 maps 501 rows onto 400 users (acct-0 is missing)
	// and key 'k' makes every row of a user the same item.
	if it.Invalid != 1 || it.Duplicates == 0 || it.MissingUsers == 0 ||
		!strings.Contains(all(it), `table account_settings, row (account_id,name)=(7,big): value: 70`) ||
		!strings.Contains(all(it), `user_id: user "acct-0" is not imported`) {
		t.Fatalf("items: %+v", it)
	}

	// A mapping that does not fit the schema names table and field.
	for _, tc := range []struct{ yaml, want string }{
		{"tables:\n- source: nosuch\n  entity: config\n  namespace: \"'n'\"\n  key: k\n  value: v", "source table nosuch does not exist"},
		{"tables:\n- source: accounts\n  entity: user\n  user_id: id\n  profile: {mail: emial}", `table accounts: profile.mail: emial: ERROR: column "emial" does not exist`},
		{"tables:\n- source: accounts\n  entity: user\n  user_id: id\n  profile_sql: id + 1", "profile_sql: type bigint cannot be a JSON object"},
		{"tables:\n- source: accounts\n  entity: user\n  user_id: id\n  profile_sql: to_jsonb(accounts)\n  primary_key: [idd]", "primary_key: column idd does not exist"},
		{"tables:\n- source: accounts\n  entity: user\n  user_id: id\n  profile_sql: to_jsonb(accounts)\n  where: name", "where: name: ERROR: argument of WHERE must be type boolean"},
	} {
		m, err := ParseMapping([]byte(tc.yaml))
		if err != nil {
			t.Fatal(err)
		}
		rep, err := Check(ctx, conn, m, CheckOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if rep.OK || !strings.Contains(all(rep.Tables[0]), tc.want) {
			t.Errorf("%s: %+v, want %q", tc.yaml, rep.Tables[0], tc.want)
		}
	}
}

// A source without logical decoding is reported before anything is copied.
func TestCheckSourceSettings(t *testing.T) {
	conn := connect(t, testenv.NewDatabase(t)) // the shared server: wal_level may be replica
	var level string
	if err := conn.QueryRow(context.Background(), `SHOW wal_level`).Scan(&level); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(context.Background(), `CREATE TABLE accounts (id bigint PRIMARY KEY, email text)`); err != nil {
		t.Fatal(err)
	}
	m, err := ParseMapping([]byte("tables:\n- source: accounts\n  entity: user\n  user_id: \"'a' || id\"\n  profile: {email: email}"))
	if err != nil {
		t.Fatal(err)
	}
	rep, err := Check(context.Background(), conn, m, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	problem := strings.Contains(strings.Join(rep.Problems, "\n"), "wal_level is "+level)
	if level != "logical" && (rep.OK || !problem) || level == "logical" && (!rep.OK || problem) {
		t.Fatalf("wal_level %s: %+v", level, rep)
	}
}
