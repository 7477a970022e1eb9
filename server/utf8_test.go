package server

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// Invalid UTF-8 in a string field reaches the server's validators and is
// answered InvalidArgument naming the field, not Internal from protobuf
// decoding (the protos set features.utf8_validation = NONE for this).
func TestInvalidUTF8IsInvalidArgument(t *testing.T) {
	t.Parallel()
	ts := newTestCluster(t, 1).start(t, false)
	d, a := ts.data, ts.admin
	const bad = "ok\xff"
	cases := []struct {
		name  string
		field string
		call  func(context.Context) error
	}{
		{"PutUser profile_json", "profile_json", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: "u1", ProfileJson: `{"a":"` + bad + `"}`})
			return err
		}},
		{"PutUser user_id", "user_id", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: bad, ProfileJson: `{}`})
			return err
		}},
		{"PutItem key", "key", func(ctx context.Context) error {
			_, err := d.PutItem(ctx, &pb.PutItemRequest{UserId: "u1", Collection: "c", Key: bad, ValueJson: `1`})
			return err
		}},
		{"SetConfig namespace", "namespace", func(ctx context.Context) error {
			_, err := d.SetConfig(ctx, &pb.SetConfigRequest{Namespace: bad, Key: "k", ValueJson: `1`})
			return err
		}},
		{"GetSession token", "token", func(ctx context.Context) error {
			_, err := d.GetSession(ctx, &pb.GetSessionRequest{Token: bad})
			return err
		}},
		{"ListItems prefix", "prefix", func(ctx context.Context) error {
			_, err := d.ListItems(ctx, &pb.ListItemsRequest{UserId: "u1", Collection: "c", Prefix: bad})
			return err
		}},
		{"LocateUser user_id", "user_id", func(ctx context.Context) error {
			_, err := a.LocateUser(ctx, &pb.LocateUserRequest{UserId: bad})
			return err
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(ctxT(t))
			wantCode(t, err, codes.InvalidArgument)
			if msg := status.Convert(err).Message(); !strings.HasPrefix(msg, tc.field+": ") {
				t.Fatalf("message %q does not start with %q", msg, tc.field+": ")
			}
		})
	}
}
