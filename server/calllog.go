package server

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/shardgate/shardgate/auth"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Every call's outcome is logged at the level its code maps to
// (codeToLevel), never its payload: requests carry session tokens and user
// data. The level is checked before anything is built, so a successful call
// at the default level costs one Enabled check. (go-grpc-middleware's
// logging interceptor builds some fifteen fields for every call whatever
// the level: 15% of the server's CPU on cached session reads.)

func logStream(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		start := time.Now()
		err := h(srv, ss)
		logCall(ss.Context(), log, info.FullMethod, "server_stream", start, err)
		return err
	}
}

func logCall(ctx context.Context, log *slog.Logger, fullMethod, kind string, start time.Time, err error) {
	st, _ := status.FromError(err)
	lvl := codeToLevel(st.Code())
	if !log.Enabled(ctx, lvl) {
		return
	}
	service, method, _ := strings.Cut(strings.TrimPrefix(fullMethod, "/"), "/")
	attrs := []slog.Attr{
		slog.String("grpc.service", service),
		slog.String("grpc.method", method),
		slog.String("grpc.method_type", kind),
		slog.String("grpc.code", st.Code().String()),
		slog.Float64("grpc.time_ms", float64(time.Since(start).Microseconds())/1000),
	}
	if host := auth.PeerHost(ctx); host != "" {
		attrs = append(attrs, slog.String("peer.address", host))
	}
	if err != nil {
		// Status messages are fixed texts, written to be safe to show.
		attrs = append(attrs, slog.String("grpc.error", st.Message()))
	}
	log.LogAttrs(ctx, lvl, "finished call", attrs...)
}

// codeToLevel logs successes and the caller's own mistakes at debug level,
// and what an operator should look at (timeouts, shards down, bugs) higher.
func codeToLevel(c codes.Code) slog.Level {
	switch c {
	case codes.DeadlineExceeded, codes.Unavailable, codes.ResourceExhausted:
		return slog.LevelWarn
	case codes.Internal, codes.Unknown, codes.DataLoss, codes.Unimplemented:
		return slog.LevelError
	}
	return slog.LevelDebug
}
