package server

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// MigrationStatus names a shard it cannot read by its Shardgate name only,
// with a generic reason; where the database is (host, port, database,
// user) goes to the log.
func TestMigrationStatusHidesWhereShardsAre(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 3)
	c.exec(t, "catalog", `UPDATE shards SET dsn = $1 WHERE name = $2`,
		"postgres://sg-user-7f3@127.0.0.1:1/hidden_db_4c2?connect_timeout=1", c.names[1])
	c.exec(t, "catalog", `UPDATE shards SET dsn = $1 WHERE name = $2`,
		"postgres://sg@db-host-91d.invalid:6543/other_db_e0a?connect_timeout=1", c.names[2])
	var logs testenv.LogBuffer
	ts := c.startWith(t, false, GRPCOptions{}, nil, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	st, err := ts.admin.MigrationStatus(ctxT(t), &pb.MigrationStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	where := []string{"127.0.0.1", ":1", "hidden_db_4c2", "sg-user-7f3", "db-host-91d", "6543", "other_db_e0a", "dial", "connect"}
	for i, d := range st.GetShards() {
		if d.GetName() != c.names[i] {
			t.Fatalf("shard %d named %q, want %q", i, d.GetName(), c.names[i])
		}
		if (i == 0) != (d.GetError() == "") {
			t.Fatalf("shard %s: error %q", d.GetName(), d.GetError())
		}
		for _, w := range where {
			if strings.Contains(d.GetError(), w) {
				t.Errorf("shard %s: error %q reveals %q", d.GetName(), d.GetError(), w)
			}
		}
	}
	// The details are in the log, by shard name.
	for _, want := range []string{"migration status", c.names[1], "hidden_db_4c2", c.names[2], "db-host-91d"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log does not mention %q:\n%s", want, logs.String())
		}
	}
}
