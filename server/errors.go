package server

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/versioning"
	"github.com/shardgate/shardgate/shards"
)

// errShardNotOpen means the topology names a shard this server could not
// open a pool for (e.g. its DSN references an unset variable).
var errShardNotOpen = errors.New("shard has no connection pool")

// toStatus maps an error from the layers below to its gRPC status: the one
// place where errors become codes. Messages sent to callers are fixed texts
// or validation messages; details that name hosts, databases or SQL are only
// logged. ctx is the request's: its own deadline or cancellation decides
// DeadlineExceeded and Canceled, not a timeout met deeper down.
func toStatus(ctx context.Context, log *slog.Logger, method string, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var fe *fieldError
	var conflict *versioning.ConflictError
	var pgErr *pgconn.PgError
	var pe errPlan
	switch {
	case errors.As(err, &fe):
		return status.Error(codes.InvalidArgument, fe.Error())
	// Topology changes: their messages name shards and counts, never
	// hosts or databases.
	case errors.Is(err, catalog.ErrShardExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, catalog.ErrUnknownShard), errors.Is(err, catalog.ErrNoRebalance):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, catalog.ErrShardNotEmpty), errors.Is(err, catalog.ErrShardInUse), errors.Is(err, catalog.ErrShardRefused),
		errors.Is(err, catalog.ErrLastShard), errors.Is(err, catalog.ErrRebalanceRunning):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, catalog.ErrBadDSN):
		return status.Error(codes.InvalidArgument, "dsn: "+err.Error())
	case errors.Is(err, catalog.ErrStalePlan):
		return status.Error(codes.Aborted, err.Error())
	case errors.As(err, &pe):
		return status.Error(codes.FailedPrecondition, pe.Error())
	case errors.As(err, &conflict):
		return status.Error(codes.Aborted, conflict.Error())
	case errors.Is(err, shards.ErrUserNotFound):
		return status.Error(codes.NotFound, "user not found")
	case errors.Is(err, versioning.ErrNotFound):
		return status.Error(codes.NotFound, entity(method)+" not found")
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case errors.Is(ctx.Err(), context.Canceled):
		return status.Error(codes.Canceled, "canceled")
	case errors.Is(err, shards.ErrWrongShard):
		log.Info("partition still moving after retries", "method", method, "err", err)
		return status.Error(codes.Unavailable, "the partition is moving; retry shortly")
	case shards.IsUnavailable(err), errors.Is(err, errShardNotOpen), errors.Is(err, context.DeadlineExceeded),
		isPgCode(err, "57014", "55P03"):
		// A timeout below the request's own deadline (connecting, a lock, a
		// statement timeout) means the database did not answer in time.
		log.Warn("database unavailable", "method", method, "err", err)
		return status.Error(codes.Unavailable, "database unavailable; retry later")
	case isPgCode(err, "40001", "40P01"):
		log.Info("transaction aborted by the database", "method", method, "err", err)
		return status.Error(codes.Aborted, "conflict with a concurrent write; retry")
	case errors.Is(err, catalog.ErrNoCluster):
		return status.Error(codes.FailedPrecondition, catalog.ErrNoCluster.Error())
	case errors.Is(err, errNoTable):
		return status.Error(codes.FailedPrecondition, errNoTable.Error())
	case errors.As(err, &pgErr) && len(pgErr.Code) == 5 && pgErr.Code[:2] == "22":
		// Data exception: a value Postgres cannot hold that validation let
		// through. Logged: it may as well be a bug of ours.
		log.Warn("data exception", "method", method, "err", err)
		return status.Error(codes.InvalidArgument, "value rejected by the database: "+pgErr.Message)
	}
	log.Error("internal error", "method", method, "err", err)
	return status.Error(codes.Internal, "internal error")
}

func isPgCode(err error, codes ...string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && slices.Contains(codes, pgErr.Code)
}

// entity names what a DataService method reads or writes, for messages:
// "/shardgate.v1.DataService/GetSession" → "session".
func entity(method string) string {
	name := method[strings.LastIndexByte(method, '/')+1:]
	for _, verb := range []string{"Get", "Put", "Delete", "Create", "Touch", "Revoke", "List", "Set"} {
		if rest, ok := strings.CutPrefix(name, verb); ok {
			name = rest
			break
		}
	}
	switch name {
	case "User", "Session", "Sessions", "Item", "Items":
		return strings.ToLower(strings.TrimSuffix(name, "s"))
	case "Config":
		return "config value"
	case "ConfigSchema":
		return "config schema"
	}
	return "resource"
}
