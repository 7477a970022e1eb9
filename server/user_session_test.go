package server

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/auth/authtest"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// A user principal may create and extend its own sessions only within what
// the operator allows users: a TTL cap (24 h by default) and, when one is
// set, a schema for the data. Services and admins keep the API's limits.
func TestUserSessionLimits(t *testing.T) {
	t.Parallel()
	keys := authtest.NewKeys(t)
	schema := `{"type":"object","properties":{"theme":{"type":"string"}},"additionalProperties":false}`
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{Auth: keys.Verifier(t)}, nil,
		func(o *Options) { o.UserSessionSchema = schema })
	ctx := ctxT(t)
	service := authtest.Bearer(ctx, keys.Token(t, "service", "backend"))
	alice := authtest.Bearer(ctx, keys.Token(t, "user", "alice"))
	if _, err := ts.data.PutUser(service, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{}`}); err != nil {
		t.Fatal(err)
	}
	const day, year = 24 * 3600, 365 * 24 * 3600

	refused := func(what string, err error, field, want string) {
		t.Helper()
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), field) ||
			!strings.Contains(status.Convert(err).Message(), want) {
			t.Errorf("%s: %v; want INVALID_ARGUMENT naming %s and %q", what, err, field, want)
		}
	}
	create := func(ctx2 any, data string, ttl int64) (*pb.CreateSessionResponse, error) {
		c := alice
		if ctx2 == "service" {
			c = service
		}
		return ts.data.CreateSession(c, &pb.CreateSessionRequest{UserId: "alice", DataJson: data, TtlSeconds: ttl})
	}

	_, err := create("user", `{"theme":"dark"}`, year)
	refused("user creating a session for a year", err, "ttl_seconds", "86400")
	_, err = create("user", `{"role":"admin"}`, 60)
	refused("user writing an attribute the schema does not allow", err, "data_json", "'role' not allowed")
	_, err = create("user", `{"theme":7}`, 60)
	refused("user writing a mistyped attribute", err, "data_json", `"/theme"`)

	own, err := create("user", `{"theme":"dark"}`, day)
	if err != nil {
		t.Fatalf("user creating a session within the limits: %v", err)
	}
	if got := time.Until(own.GetExpiresAt().AsTime()); got > day*time.Second+time.Minute {
		t.Fatalf("expires in %v", got)
	}
	_, err = ts.data.TouchSession(alice, &pb.TouchSessionRequest{Token: own.GetToken(), TtlSeconds: year})
	refused("user extending its session for a year", err, "ttl_seconds", "86400")
	if _, err := ts.data.TouchSession(alice, &pb.TouchSessionRequest{Token: own.GetToken(), TtlSeconds: day}); err != nil {
		t.Fatalf("user extending its session within the cap: %v", err)
	}

	// A service is trusted with any data and the API's year.
	sess, err := create("service", `{"role":"admin"}`, year)
	if err != nil {
		t.Fatalf("service creating a session: %v", err)
	}
	if _, err := ts.data.TouchSession(service, &pb.TouchSessionRequest{Token: sess.GetToken(), TtlSeconds: year}); err != nil {
		t.Fatalf("service extending a session: %v", err)
	}
}

// Without a schema a user's data is any object, and the cap still holds;
// the cap follows Options.UserSessionMaxTTL.
func TestUserSessionMaxTTLOption(t *testing.T) {
	t.Parallel()
	keys := authtest.NewKeys(t)
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{Auth: keys.Verifier(t)}, nil,
		func(o *Options) { o.UserSessionMaxTTL = time.Hour })
	ctx := ctxT(t)
	alice := authtest.Bearer(ctx, keys.Token(t, "user", "alice"))
	if _, err := ts.data.PutUser(alice, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{}`}); err != nil {
		t.Fatal(err)
	}
	_, err := ts.data.CreateSession(alice, &pb.CreateSessionRequest{UserId: "alice", DataJson: `{"x":1}`, TtlSeconds: 3601})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "at most 3600") {
		t.Fatalf("over an hour: %v", err)
	}
	if _, err := ts.data.CreateSession(alice, &pb.CreateSessionRequest{UserId: "alice", DataJson: `{"x":1}`, TtlSeconds: 3600}); err != nil {
		t.Fatal(err)
	}
}

func TestUserSessionSchemaMustCompile(t *testing.T) {
	c := newTestCluster(t, 1)
	_, err := New(ctxT(t), c.catalogDSN, Options{UserSessionSchema: `{"type":"nope"}`})
	if err == nil || !strings.Contains(err.Error(), "user session schema") {
		t.Fatalf("New with a bad schema: %v", err)
	}
}
