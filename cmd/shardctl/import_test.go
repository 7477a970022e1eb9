package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

const legacyMapping = `
tables:
  - source: accounts
    entity: user
    user_id: "'acct-' || id"
    profile:
      email: email
      name: name
  - source: account_settings
    entity: item
    user_id: "'acct-' || account_id"
    collection: "'settings'"
    key: name
    value: value
`

// legacySource creates a legacy database of n accounts with a setting each
// on a server of its own (wal_level=logical), and a mapping file for it.
func legacySource(t *testing.T, n int) (dsn, mapping string) {
	t.Helper()
	dsn = testenv.NewPGCluster(t).CreateDatabase("legacy")
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, q := range []string{
		`CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL, name text, created_at timestamptz NOT NULL DEFAULT now())`,
		`CREATE TABLE account_settings (account_id bigint NOT NULL REFERENCES accounts ON DELETE CASCADE, name text NOT NULL, value jsonb NOT NULL, PRIMARY KEY (account_id, name))`,
		`INSERT INTO accounts SELECT g, 'user' || g || '@example.com', 'User ' || g FROM generate_series(1, $1::int) AS g`,
		`INSERT INTO account_settings SELECT g, 'theme', jsonb_build_object('dark', g % 2 = 0) FROM generate_series(1, $1::int) AS g`,
	} {
		var args []any
		if strings.Contains(q, "$1") {
			args = append(args, n)
		}
		if _, err := conn.Exec(ctx, q, args...); err != nil {
			t.Fatal(err)
		}
	}
	mapping = filepath.Join(t.TempDir(), "mapping.yaml")
	if err := os.WriteFile(mapping, []byte(legacyMapping), 0o600); err != nil {
		t.Fatal(err)
	}
	return dsn, mapping
}

func TestImportCommands(t *testing.T) {
	addr, catalogDSN := startCluster(t)
	src, mapping := legacySource(t, 1000)
	g := globals{Addr: addr}
	source := importSource{Mapping: mapping, From: src}
	target := importTarget{Catalog: catalogDSN, Name: "default"}

	out := run(t, g, importCheckCmd{importSource: source, Catalog: catalogDSN, MaxJSONBytes: 65536})
	if !strings.Contains(out, "accounts") || !strings.Contains(out, "imports cleanly") || !strings.Contains(out, "per shard: shard-0 ") {
		t.Fatalf("check:\n%s", out)
	}
	gj := g
	gj.JSON = true
	out = run(t, gj, importStartCmd{Mapping: mapping, From: src, importTarget: target, Parallel: 2, BatchRows: 100, MaxJSONBytes: 65536})
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var last struct {
		State string `json:"state"`
		Rows  int64  `json:"rows"`
	}
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &last); err != nil || last.State != "following" || last.Rows != 2000 {
		t.Fatalf("start --json (%v):\n%s", err, out)
	}
	if !strings.Contains(out, `"table":"account_settings","entity":"item","copied":1000,"rejected":0,"total":1000,"done":true`) {
		t.Fatalf("start --json progress:\n%s", out)
	}

	// What was imported reads back through the API.
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	data := pb.NewDataServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u, err := data.GetUser(ctx, &pb.GetUserRequest{UserId: "acct-7"})
	if err != nil {
		t.Fatal(err)
	}
	if u.GetProfileJson() != `{"name": "User 7", "email": "user7@example.com"}` {
		t.Fatalf("user %s", u.GetProfileJson())
	}
	it, err := data.GetItem(ctx, &pb.GetItemRequest{UserId: "acct-8", Collection: "settings", Key: "theme"})
	if err != nil {
		t.Fatal(err)
	}
	if it.GetItem().GetValueJson() != `{"dark": true}` {
		t.Fatalf("item %s", it.GetItem().GetValueJson())
	}

	out = run(t, g, importVerifyCmd{importSource: source, importTarget: target, MaxJSONBytes: 65536})
	if !strings.Contains(out, "verified: every mapped row") || !strings.Contains(out, "account_settings  item") {
		t.Fatalf("verify:\n%s", out)
	}

	statusCmd := importStatusCmd{importTarget: target, From: src}
	if out := run(t, g, statusCmd); !strings.Contains(out, "import default: following") || !strings.Contains(out, "account_settings") {
		t.Fatalf("status:\n%s", out)
	}
	// Follow in the background, change the source, cut over.
	followed := make(chan error, 1)
	go func() {
		followed <- importFollowCmd{importSource: source, importTarget: target, MaxJSONBytes: 65536}.Run(&globals{out: io.Discard})
	}()
	sconn, err := pgx.Connect(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	defer sconn.Close(context.Background())
	if _, err := sconn.Exec(ctx, `UPDATE accounts SET name = 'Followed' WHERE id = 7`); err != nil {
		t.Fatal(err)
	}
	out = run(t, g, importCutoverCmd{importSource: source, importTarget: target, MaxWait: 30 * time.Second, MaxJSONBytes: 65536})
	if !strings.Contains(out, "cut over at") || !strings.Contains(out, "sessions are not imported") {
		t.Fatalf("cutover:\n%s", out)
	}
	if err := <-followed; err != nil {
		t.Fatalf("follow: %v", err)
	}
	u, err = data.GetUser(ctx, &pb.GetUserRequest{UserId: "acct-7"})
	if err != nil || u.GetProfileJson() != `{"name": "Followed", "email": "user7@example.com"}` {
		t.Fatalf("followed user %s %v", u.GetProfileJson(), err)
	}

	// A bad mapping fails the check with the table and field named.
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte(strings.Replace(legacyMapping, "email: email", "email: emial", 1)), 0o600)
	var buf bytes.Buffer
	err = importCheckCmd{importSource: importSource{Mapping: bad, From: src}, MaxJSONBytes: 65536}.Run(&globals{out: &buf})
	if err == nil || !strings.Contains(buf.String(), `table accounts: profile.email: emial: ERROR: column "emial" does not exist`) {
		t.Fatalf("bad mapping: %v\n%s", err, buf.String())
	}
}
