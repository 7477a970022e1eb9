package server

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/auth/authtest"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// No token, session token or DSN password reaches the server's logs, the
// errors callers see, or the metrics, across good and bad calls.
func TestNoSecretsInLogsErrorsOrMetrics(t *testing.T) {
	const envPassword = "Env-Pa55word-8c1f"
	const literalPassword = "Literal-Pa55word-77e2"
	t.Setenv("SG_TEST_SHARD_PW", envPassword)
	keys := authtest.NewKeys(t)
	c := newTestCluster(t, 3)
	c.exec(t, "catalog", `UPDATE shards SET dsn = $1 WHERE name = 'shard-1'`, "postgres://sg:${SG_TEST_SHARD_PW}@127.0.0.1:1/db?connect_timeout=1")
	c.exec(t, "catalog", `UPDATE shards SET dsn = $1 WHERE name = 'shard-2'`, "postgres://sg:"+literalPassword+"@127.0.0.1:1/db?connect_timeout=1")
	var logs testenv.LogBuffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ts := c.startWith(t, true, GRPCOptions{Auth: keys.Verifier(t)}, nil, func(o *Options) { o.Logger = logger })
	ctx := ctxT(t)

	var secrets []string
	var errs []string
	record := func(err error) {
		if err != nil {
			errs = append(errs, err.Error())
		}
	}
	admin := keys.Token(t, "admin", "ops")
	secrets = append(secrets, admin, envPassword, literalPassword)
	for name, tok := range keys.BadTokens(t) {
		if name != "garbage" {
			secrets = append(secrets, tok)
		}
		_, err := ts.data.GetUser(authtest.Bearer(ctx, tok), &pb.GetUserRequest{UserId: "alice"})
		wantCode(t, err, codes.Unauthenticated)
		record(err)
	}
	user := keys.Token(t, "user", "bob")
	secrets = append(secrets, user)
	actx := authtest.Bearer(ctx, admin)
	for i := range 30 {
		id := fmt.Sprintf("user-%d", i)
		_, err := ts.data.PutUser(actx, &pb.PutUserRequest{UserId: id})
		record(err)
		s, err := ts.data.CreateSession(actx, &pb.CreateSessionRequest{UserId: id, TtlSeconds: 60})
		record(err)
		if err == nil {
			secrets = append(secrets, s.GetToken())
			_, err = ts.data.GetSession(authtest.Bearer(ctx, user), &pb.GetSessionRequest{Token: s.GetToken()})
			record(err)
			_, err = ts.data.RevokeSession(actx, &pb.RevokeSessionRequest{Token: s.GetToken() + "x"})
			record(err)
		}
	}
	ms, err := ts.admin.MigrationStatus(actx, &pb.MigrationStatusRequest{})
	record(err)
	for _, d := range ms.GetShards() {
		errs = append(errs, d.GetError())
	}
	_, err = ts.data.GetUser(authtest.Bearer(ctx, admin+"tampered"), &pb.GetUserRequest{UserId: "alice"})
	record(err)
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("tampered token: %v", err)
	}

	haystacks := map[string]string{"logs": logs.String(), "errors": strings.Join(errs, "\n"), "metrics": scrape(t, ts.srv)}
	if !strings.Contains(haystacks["logs"], "shard-1") {
		t.Fatalf("the broken shards were never logged; the test exercises nothing:\n%s", haystacks["logs"])
	}
	for where, text := range haystacks {
		for _, s := range secrets {
			// The signature alone is as good as the token for a replay
			// check; look for any distinctive part.
			parts := append([]string{s}, strings.Split(s, ".")...)
			for _, p := range parts {
				if len(p) >= 16 && strings.Contains(text, p) {
					t.Errorf("%s contain a secret (%.12s…)", where, p)
				}
			}
		}
	}
}
