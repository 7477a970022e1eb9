package server

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestCallLog(t *testing.T) {
	var buf bytes.Buffer
	at := func(lvl slog.Level) *slog.Logger {
		buf.Reset()
		return slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: lvl}))
	}
	ctx := context.Background()
	const method = "/shardgate.v1.DataService/GetSession"

	logCall(ctx, at(slog.LevelInfo), method, "unary", time.Now(), nil)
	if buf.Len() != 0 {
		t.Fatalf("a success logged at info: %s", buf.String())
	}
	logCall(ctx, at(slog.LevelDebug), method, "unary", time.Now(), nil)
	if out := buf.String(); !strings.Contains(out, "level=DEBUG") || !strings.Contains(out, "grpc.method=GetSession") || !strings.Contains(out, "grpc.code=OK") {
		t.Fatalf("a success at debug: %s", out)
	}
	logCall(ctx, at(slog.LevelInfo), method, "unary", time.Now(), status.Error(codes.Unavailable, "shard unavailable; retry"))
	if out := buf.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, `grpc.error="shard unavailable; retry"`) {
		t.Fatalf("Unavailable: %s", out)
	}
	logCall(ctx, at(slog.LevelInfo), method, "unary", time.Now(), errors.New("a plain error"))
	if out := buf.String(); !strings.Contains(out, "level=ERROR") || !strings.Contains(out, "grpc.code=Unknown") {
		t.Fatalf("a non-status error: %s", out)
	}
	logCall(ctx, at(slog.LevelInfo), method, "unary", time.Now(), status.Error(codes.NotFound, "no such session"))
	if buf.Len() != 0 {
		t.Fatalf("the caller's NotFound logged at info: %s", buf.String())
	}
}
