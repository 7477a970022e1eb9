package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/internal/versioning"
	"github.com/shardgate/shardgate/shards"
)

func TestToStatus(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	live := context.Background()
	expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	secret := errors.New("dial postgres://app:hunter2@db7:5432/shard: refused")
	for _, tc := range []struct {
		name   string
		ctx    context.Context
		method string
		err    error
		code   codes.Code
		msg    string // the whole message, or "" to only check the code
	}{
		{"field", live, "/shardgate.v1.DataService/PutUser", invalid("user_id", "required"), codes.InvalidArgument, "user_id: required"},
		{"conflict", live, "/shardgate.v1.DataService/PutUser", fmt.Errorf("shard s1: put user: %w", &versioning.ConflictError{Expected: 3, Current: 5}), codes.Aborted, "version conflict: expected 3, current 5"},
		{"session not found", live, "/shardgate.v1.DataService/GetSession", fmt.Errorf("shard s1: get session: %w", versioning.ErrNotFound), codes.NotFound, "session not found"},
		{"item not found", live, "/shardgate.v1.DataService/DeleteItem", versioning.ErrNotFound, codes.NotFound, "item not found"},
		{"config not found", live, "/shardgate.v1.DataService/GetConfig", versioning.ErrNotFound, codes.NotFound, "config value not found"},
		{"user not found", live, "/shardgate.v1.DataService/PutItem", shards.ErrUserNotFound, codes.NotFound, "user not found"},
		{"caller's deadline", expired, "/x/GetUser", fmt.Errorf("acquire: %w", context.DeadlineExceeded), codes.DeadlineExceeded, ""},
		{"a timeout below the caller's deadline", live, "/x/GetUser", fmt.Errorf("connect: %w", context.DeadlineExceeded), codes.Unavailable, "database unavailable; retry later"},
		{"moving", live, "/x/PutUser", fmt.Errorf("%w (reloading the map: %v)", shards.ErrWrongShard, secret), codes.Unavailable, "the partition is moving; retry shortly"},
		{"no pool", live, "/x/PutUser", fmt.Errorf("shard s9: %w", errShardNotOpen), codes.Unavailable, "database unavailable; retry later"},
		{"statement timeout", live, "/x/PutUser", &pgconn.PgError{Code: "57014"}, codes.Unavailable, "database unavailable; retry later"},
		{"deadlock", live, "/x/PutUser", &pgconn.PgError{Code: "40P01"}, codes.Aborted, ""},
		{"data exception", live, "/x/PutUser", &pgconn.PgError{Code: "22003", Message: "numeric field overflow"}, codes.InvalidArgument, "value rejected by the database: numeric field overflow"},
		{"unknown", live, "/x/PutUser", secret, codes.Internal, "internal error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, _ := status.FromError(toStatus(tc.ctx, log, tc.method, tc.err))
			if st.Code() != tc.code || (tc.msg != "" && st.Message() != tc.msg) {
				t.Fatalf("got %v %q, want %v %q", st.Code(), st.Message(), tc.code, tc.msg)
			}
			if strings.Contains(st.Message(), "hunter2") || strings.Contains(st.Message(), "s1") {
				t.Fatalf("message %q leaks internals", st.Message())
			}
		})
	}
}
