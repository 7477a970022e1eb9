package shards

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/puddle/v2"
)

var (
	// ErrWrongShard means this shard does not serve the partition: its
	// ownership row is missing, or its state does not allow the operation
	// (reads need owned or frozen, writes need owned). The caller should
	// reload the routing table and retry on the partition's owner. It is
	// reported before versioning.ErrNotFound or a conflict.
	ErrWrongShard = errors.New("partition is not owned by this shard")

	// ErrUserNotFound means CreateSession was asked for a user that does not
	// exist in the partition; nothing was written.
	ErrUserNotFound = errors.New("user not found")
)

// unavailableError marks an error met while getting a connection.
type unavailableError struct{ err error }

func (e *unavailableError) Error() string { return "shard unavailable: " + e.err.Error() }
func (e *unavailableError) Unwrap() error { return e.err }

// IsUnavailable reports whether err means the shard could not be reached or
// went away: no connection could be had (refused, failed, timed out, pool
// closed), the connection broke (reset, EOF, closed), a pgconn timeout, or
// the server reported a connection exception (SQLSTATE class 08) or that it
// is shutting down or starting up (57P01, 57P02, 57P03). A write that failed
// this way after it was sent may or may not have committed.
func IsUnavailable(err error) bool {
	if err == nil {
		return false
	}
	var ue *unavailableError
	var ce *pgconn.ConnectError
	if errors.As(err, &ue) || errors.As(err, &ce) {
		return true
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch {
		case strings.HasPrefix(pe.Code, "08"),
			pe.Code == "57P01", pe.Code == "57P02", pe.Code == "57P03":
			return true
		}
		return false
	}
	if errors.Is(err, context.Canceled) {
		return false
	}
	var oe *net.OpError
	switch {
	case pgconn.Timeout(err),
		errors.Is(err, puddle.ErrClosedPool),
		errors.Is(err, pgconn.ErrConnClosed),
		errors.As(err, &oe),
		errors.Is(err, net.ErrClosed),
		errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, io.EOF):
		return true
	}
	return false
}

// IsClosed reports whether err came from a Shard that was closed (or never
// opened) before the call took a connection: nothing was sent, so the call
// is safe to retry on a replacement.
func IsClosed(err error) bool {
	return errors.Is(err, puddle.ErrClosedPool) || errors.Is(err, errNotOpen)
}

// wrongShard is the error for a partition this shard will not serve.
func wrongShard(partition int32) error {
	return fmt.Errorf("partition %d: %w", partition, ErrWrongShard)
}
