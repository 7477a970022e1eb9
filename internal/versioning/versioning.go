// Package versioning holds the contract every versioned write shares, on
// the shards and in the catalog alike: the errors a conditional write
// reports, the retry of a write a version trigger refused, and the batch
// limits of tombstone pruning. It is a leaf: it imports nothing of
// Shardgate, so both shards and catalog use it and server maps its errors
// to gRPC codes.
package versioning

import (
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"
)

var (
	// ErrNotFound means the row does not exist (for sessions: does not
	// exist or has expired).
	ErrNotFound = errors.New("not found")

	// ErrConflict matches every *ConflictError with errors.Is.
	ErrConflict = errors.New("version conflict")
)

// ConflictError reports that a write's expected version did not match the
// row, so nothing was written. errors.Is(err, ErrConflict) is true for it.
type ConflictError struct {
	// Expected is the version the caller asked for; 0 means "must not exist".
	Expected int64
	// Current is the row's version when the write was refused; 0 means the
	// row did not exist.
	Current int64
}

// Error describes the mismatch, e.g. "version conflict: expected 3, current 5".
func (e *ConflictError) Error() string {
	if e.Current == 0 {
		return fmt.Sprintf("version conflict: expected %d, current: does not exist", e.Expected)
	}
	return fmt.Sprintf("version conflict: expected %d, current %d", e.Expected, e.Current)
}

// Is reports whether target is ErrConflict.
func (e *ConflictError) Is(target error) bool { return target == ErrConflict }

// belowTombstoneCode is the SQLSTATE the triggers raise when a write's
// version is not above its key's tombstone (the outbox triggers, shard
// migration 00003, catalog 00004) or a created row's version is not above
// its partition's version floor (shard migration 00006, catalog 00006).
const belowTombstoneCode = "40001" // serialization_failure

// RetryBelowTombstone runs a put statement again when a trigger refused it
// for a version not above the key's tombstone or, for a create, not above
// the version floor. That happens only when a delete of the key, or a
// tombstone prune that raised the floor, committed after the statement took
// its snapshot; run again, the statement sees them and continues above. The
// refused statement rolled back whole, so running it again is safe; a
// second refusal needs another delete or prune in between, so a few tries
// suffice.
func RetryBelowTombstone(put func() error) error {
	var err error
	for range 3 {
		if err = put(); !isBelowTombstone(err) {
			return err
		}
	}
	return err
}

func isBelowTombstone(err error) bool {
	var pg *pgconn.PgError
	return errors.As(err, &pg) && pg.Code == belowTombstoneCode
}

// DefaultPruneLimit is the batch size tombstone pruning is meant to run
// with: big enough to keep up with a delete-heavy database, small enough
// that the outbox clocks a batch holds until commit are not held long.
const DefaultPruneLimit = 1000

// MaxPruneLimit caps one tombstone prune batch.
const MaxPruneLimit = 10000
