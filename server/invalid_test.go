package server

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// Every RPC refuses bad input with InvalidArgument naming the field, before
// touching a database: afterwards no shard and no catalog table has a row.
func TestBadInputIsRejectedAndNothingWritten(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	ts := c.start(t, false)
	d, a := ts.data, ts.admin
	big := `{"x":"` + strings.Repeat("a", 70<<10) + `"}`
	okToken, _ := newToken(1)
	type call func(context.Context) error
	cases := []struct {
		name  string
		field string
		call  call
	}{
		{"PutUser empty id", "user_id", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: ""})
			return err
		}},
		{"PutUser overlong id", "user_id", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: strings.Repeat("u", 129)})
			return err
		}},
		{"PutUser bad characters", "user_id", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: "a/b"})
			return err
		}},
		{"PutUser invalid JSON", "profile_json", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: "u", ProfileJson: `{"a":`})
			return err
		}},
		{"PutUser JSON not an object", "profile_json", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: "u", ProfileJson: `[1]`})
			return err
		}},
		{"PutUser oversize", "profile_json", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: "u", ProfileJson: big})
			return err
		}},
		{"PutUser NUL escape", "profile_json", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: "u", ProfileJson: `{"a":"\u0000"}`})
			return err
		}},
		{"PutUser negative expected", "expected_version", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: "u", ExpectedVersion: proto.Int64(-1)})
			return err
		}},
		{"GetUser bad id", "user_id", func(ctx context.Context) error {
			_, err := d.GetUser(ctx, &pb.GetUserRequest{UserId: "a b"})
			return err
		}},
		{"DeleteUser bad id", "user_id", func(ctx context.Context) error {
			_, err := d.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: ""})
			return err
		}},
		{"CreateSession negative TTL", "ttl_seconds", func(ctx context.Context) error {
			_, err := d.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "u", TtlSeconds: -5})
			return err
		}},
		{"CreateSession zero TTL", "ttl_seconds", func(ctx context.Context) error {
			_, err := d.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "u"})
			return err
		}},
		{"CreateSession huge TTL", "ttl_seconds", func(ctx context.Context) error {
			_, err := d.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "u", TtlSeconds: 1 << 40})
			return err
		}},
		{"CreateSession data not object", "data_json", func(ctx context.Context) error {
			_, err := d.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "u", DataJson: `"s"`, TtlSeconds: 60})
			return err
		}},
		{"CreateSession bad id", "user_id", func(ctx context.Context) error {
			_, err := d.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "ü", TtlSeconds: 60})
			return err
		}},
		{"GetSession empty token", "token", func(ctx context.Context) error {
			_, err := d.GetSession(ctx, &pb.GetSessionRequest{})
			return err
		}},
		{"GetSession garbage token", "token", func(ctx context.Context) error {
			_, err := d.GetSession(ctx, &pb.GetSessionRequest{Token: "not-a-token"})
			return err
		}},
		{"GetSession partition out of range", "token", func(ctx context.Context) error {
			_, err := d.GetSession(ctx, &pb.GetSessionRequest{Token: "99999" + okToken[1:]})
			return err
		}},
		{"TouchSession negative TTL", "ttl_seconds", func(ctx context.Context) error {
			_, err := d.TouchSession(ctx, &pb.TouchSessionRequest{Token: okToken, TtlSeconds: -1})
			return err
		}},
		{"RevokeSession bad token", "token", func(ctx context.Context) error {
			_, err := d.RevokeSession(ctx, &pb.RevokeSessionRequest{Token: "1.short"})
			return err
		}},
		{"ListSessions bad id", "user_id", func(ctx context.Context) error {
			_, err := d.ListSessions(ctx, &pb.ListSessionsRequest{UserId: strings.Repeat("x", 200)})
			return err
		}},
		{"PutItem bad collection", "collection", func(ctx context.Context) error {
			_, err := d.PutItem(ctx, &pb.PutItemRequest{UserId: "u", Collection: "a/b", Key: "k", ValueJson: "1"})
			return err
		}},
		{"PutItem empty key", "key", func(ctx context.Context) error {
			_, err := d.PutItem(ctx, &pb.PutItemRequest{UserId: "u", Collection: "c", ValueJson: "1"})
			return err
		}},
		{"PutItem control char key", "key", func(ctx context.Context) error {
			_, err := d.PutItem(ctx, &pb.PutItemRequest{UserId: "u", Collection: "c", Key: "a\x00b", ValueJson: "1"})
			return err
		}},
		{"PutItem missing value", "value_json", func(ctx context.Context) error {
			_, err := d.PutItem(ctx, &pb.PutItemRequest{UserId: "u", Collection: "c", Key: "k"})
			return err
		}},
		{"PutItem invalid value", "value_json", func(ctx context.Context) error {
			_, err := d.PutItem(ctx, &pb.PutItemRequest{UserId: "u", Collection: "c", Key: "k", ValueJson: "nope"})
			return err
		}},
		{"PutItem oversize value", "value_json", func(ctx context.Context) error {
			_, err := d.PutItem(ctx, &pb.PutItemRequest{UserId: "u", Collection: "c", Key: "k", ValueJson: big})
			return err
		}},
		{"GetItem bad id", "user_id", func(ctx context.Context) error {
			_, err := d.GetItem(ctx, &pb.GetItemRequest{UserId: "", Collection: "c", Key: "k"})
			return err
		}},
		{"DeleteItem overlong key", "key", func(ctx context.Context) error {
			_, err := d.DeleteItem(ctx, &pb.DeleteItemRequest{UserId: "u", Collection: "c", Key: strings.Repeat("k", 300)})
			return err
		}},
		{"ListItems page size", "page_size", func(ctx context.Context) error {
			_, err := d.ListItems(ctx, &pb.ListItemsRequest{UserId: "u", Collection: "c", PageSize: -1})
			return err
		}},
		{"ListItems page token", "page_token", func(ctx context.Context) error {
			_, err := d.ListItems(ctx, &pb.ListItemsRequest{UserId: "u", Collection: "c", PageToken: "%%%"})
			return err
		}},
		{"ListItems missing collection", "collection", func(ctx context.Context) error {
			_, err := d.ListItems(ctx, &pb.ListItemsRequest{UserId: "u"})
			return err
		}},
		{"SetConfig bad namespace", "namespace", func(ctx context.Context) error {
			_, err := d.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "a b", Key: "k", ValueJson: "1"})
			return err
		}},
		{"SetConfig invalid value", "value_json", func(ctx context.Context) error {
			_, err := d.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "n", Key: "k", ValueJson: "{"})
			return err
		}},
		{"SetConfig oversize value", "value_json", func(ctx context.Context) error {
			_, err := d.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "n", Key: "k", ValueJson: big})
			return err
		}},
		{"GetConfig empty key", "key", func(ctx context.Context) error {
			_, err := d.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "n"})
			return err
		}},
		{"DeleteConfig negative expected", "expected_version", func(ctx context.Context) error {
			_, err := d.DeleteConfig(ctx, &pb.DeleteConfigRequest{Namespace: "n", Key: "k", ExpectedVersion: proto.Int64(-2)})
			return err
		}},
		{"ListSessions page token", "page_token", func(ctx context.Context) error {
			_, err := d.ListSessions(ctx, &pb.ListSessionsRequest{UserId: "u", PageToken: "c2hvcnQ"})
			return err
		}},
		{"ListSessions page size", "page_size", func(ctx context.Context) error {
			_, err := d.ListSessions(ctx, &pb.ListSessionsRequest{UserId: "u", PageSize: 1001})
			return err
		}},
		{"ListConfig page size", "page_size", func(ctx context.Context) error {
			_, err := d.ListConfig(ctx, &pb.ListConfigRequest{Namespace: "n", PageSize: -3})
			return err
		}},
		{"ListConfig page token", "page_token", func(ctx context.Context) error {
			_, err := d.ListConfig(ctx, &pb.ListConfigRequest{Namespace: "n", PageToken: "@@"})
			return err
		}},
		{"ListConfig empty namespace", "namespace", func(ctx context.Context) error {
			_, err := d.ListConfig(ctx, &pb.ListConfigRequest{})
			return err
		}},
		{"LocateUser bad id", "user_id", func(ctx context.Context) error {
			_, err := a.LocateUser(ctx, &pb.LocateUserRequest{UserId: "bad id"})
			return err
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(ctxT(t))
			st, _ := status.FromError(err)
			if st.Code() != codes.InvalidArgument {
				t.Fatalf("got %v, want InvalidArgument", err)
			}
			if !strings.HasPrefix(st.Message(), tc.field+": ") {
				t.Fatalf("message %q does not name the field %s", st.Message(), tc.field)
			}
		})
	}

	for _, db := range c.names {
		for _, table := range []string{"users", "sessions", "items", "outbox"} {
			if n := c.count(t, db, "SELECT count(*) FROM "+table); n != 0 {
				t.Errorf("%s.%s has %d rows after rejected calls", db, table, n)
			}
		}
	}
	for _, table := range []string{"config", "config_outbox"} {
		if n := c.count(t, "catalog", "SELECT count(*) FROM "+table); n != 0 {
			t.Errorf("catalog.%s has %d rows after rejected calls", table, n)
		}
	}
}

// A message larger than the transport limit is refused before any handler.
func TestOversizeMessageIsRefused(t *testing.T) {
	t.Parallel()
	ts := newTestCluster(t, 1).start(t, false)
	_, err := ts.data.PutUser(ctxT(t), &pb.PutUserRequest{UserId: "u", ProfileJson: `{"x":"` + strings.Repeat("a", 2<<20) + `"}`})
	wantCode(t, err, codes.ResourceExhausted)
}
