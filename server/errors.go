package server

import (
	"context"
	"errors"
	"log/slog"

	"github.com/jackc/pgx/v5/pgconn"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/shards"
)

// toStatus maps an error from the layers below to its gRPC status: the one
// place where errors become codes. Unknown errors are logged and answered
// as Internal without their text, which may name hosts or SQL.
func toStatus(log *slog.Logger, method string, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var fe *fieldError
	var conflict *shards.ConflictError
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &fe):
		return status.Error(codes.InvalidArgument, fe.Error())
	case errors.As(err, &conflict):
		return status.Error(codes.Aborted, err.Error())
	case errors.Is(err, shards.ErrUserNotFound), errors.Is(err, shards.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "canceled")
	case errors.Is(err, shards.ErrWrongShard):
		// Retries ran out: the partition is mid-move. Safe to retry.
		return status.Error(codes.Unavailable, err.Error()+"; the partition is moving, retry shortly")
	case shards.IsUnavailable(err):
		log.Warn("shard unavailable", "method", method, "err", err)
		return status.Error(codes.Unavailable, "shard unavailable; retry later")
	case errors.Is(err, catalog.ErrNoCluster), errors.Is(err, errNoTable):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.As(err, &pgErr) && len(pgErr.Code) == 5 && pgErr.Code[:2] == "22":
		// Data exception: a value Postgres cannot hold (e.g. a number
		// beyond jsonb's range) that validation let through.
		return status.Error(codes.InvalidArgument, "value rejected by the database: "+pgErr.Message)
	}
	log.Error("internal error", "method", method, "err", err)
	return status.Error(codes.Internal, "internal error")
}
