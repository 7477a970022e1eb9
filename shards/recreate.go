package shards

import (
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
)

// belowTombstoneCode is the SQLSTATE the triggers raise when a write's
// version is not above its key's tombstone (the outbox triggers, shard
// migration 00003, catalog 00004) or a created row's version is not above
// its partition's version floor (shard migration 00006, catalog 00006).
const belowTombstoneCode = "40001" // serialization_failure

// RetryBelowTombstone runs a put statement again when a trigger refused it
// for a version not above the key's tombstone or, for a create, not above
// the version floor. That happens only when a delete of the key, or a
// tombstone prune that raised the floor, committed after the statement took
// its snapshot (it computed the version without them); run again, the
// statement sees them and continues above. The refused statement rolled
// back whole, so running it again is safe; a second refusal needs another
// delete or prune in between, so a few tries suffice. The catalog's config
// writes use it too.
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
