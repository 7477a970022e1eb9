package shards

import (
	"cmp"
	"context"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Direct COPY. A bulk batch of rows expected new (importBatch's plain
// INSERT case) without events is COPYed straight into users or items
// instead of through the staging table and an INSERT ... SELECT: the rows
// are written once, not twice, and the per-row joins that compute versions
// are gone (about half of a users batch's time on the shard, measured).
//
// The rules are the INSERT's, checked differently:
//   - Fencing: importBatch has locked the batch's ownership rows already.
//   - Versions: a new row starts at greatest(tombstone + 1, floor + 1, 1,
//     given version). The COPY is taken only when no partition of the batch
//     holds a tombstone of the table (a fresh import has none; a batch
//     into partitions with deletes takes the INSERT, which joins them), so
//     the version is greatest(floor + 1, 1, given), the floors read in this
//     transaction. A floor a pruner raises after that read is caught by the
//     tables' statement trigger, which fires for COPY as for INSERT and
//     fails the batch with serialization_failure; importBatch runs it again.
//   - Existing rows: the key's unique index refuses the COPY as it refuses
//     the INSERT, and importBatch upserts the batch instead.
//   - Items need their user: the users of the batch are locked FOR KEY
//     SHARE first, as the INSERT's lookup does; if any is missing, the
//     batch takes the INSERT, which reports them.
//
// What a batch writes is the INSERT's, row for row; only the cost differs.

// newRowFloorsSQL says whether $1's partitions hold no row of the
// tombstone table TOMBSTONES and returns those partitions' version floors
// above 0; new*FloorsSQL name the table.
const newRowFloorsSQL = `
SELECT NOT EXISTS (SELECT 1 FROM TOMBSTONES WHERE partition = ANY($1::integer[])),
       coalesce(array_agg(partition), '{}'), coalesce(array_agg(version_floor), '{}')
FROM outbox_clock WHERE partition = ANY($1::integer[]) AND version_floor > 0`

var (
	newUserFloorsSQL = strings.Replace(newRowFloorsSQL, "TOMBSTONES", "user_tombstones", 1)
	newItemFloorsSQL = strings.Replace(newRowFloorsSQL, "TOMBSTONES", "item_tombstones", 1)
)

// lockItemUsersSQL locks the users ($1, $2: distinct keys) that exist, as
// the items INSERT does, and counts them.
const lockItemUsersSQL = `
SELECT count(*) FROM (
    SELECT FROM unnest($1::integer[], $2::text[]) AS k (partition, user_id)
    JOIN users AS u ON u.partition = k.partition AND u.user_id = k.user_id
    FOR KEY SHARE OF u
) AS locked`

// newRowVersions returns the version a new row of each of parts starts
// from when no tombstone applies (floor + 1, at least 1), or ok false when
// some partition holds a tombstone of the table floorsSQL names.
func newRowVersions(ctx context.Context, tx pgx.Tx, floorsSQL string, parts []int32) (start func(int32) int64, ok bool, err error) {
	var (
		clean  bool
		ps     []int32
		floors []int64
	)
	if err := tx.QueryRow(ctx, floorsSQL, parts).Scan(&clean, &ps, &floors); err != nil || !clean {
		return nil, false, err
	}
	byPart := make(map[int32]int64, len(ps))
	for i, p := range ps {
		byPart[p] = floors[i]
	}
	return func(p int32) int64 { return byPart[p] + 1 }, true, nil
}

// copyNewUsers COPYs rows into users if the batch qualifies (see above);
// copied false means nothing was written and the INSERT is to be used.
func (s *Shard) copyNewUsers(ctx context.Context, tx pgx.Tx, parts []int32, rows []ImportUser) (copied bool, n int64, err error) {
	start, ok, err := newRowVersions(ctx, tx, newUserFloorsSQL, parts)
	if err != nil || !ok {
		return false, 0, err
	}
	vals := make([]any, 4) // pgx encodes a row before asking for the next
	n, err = s.copyNew(ctx, tx, "users", []string{"partition", "user_id", "profile", "version"}, len(rows), func(i int) []any {
		r := &rows[i]
		vals[0], vals[1], vals[2], vals[3] = r.Partition, r.UserID, r.Profile, max(start(r.Partition), r.Version)
		return vals
	})
	return true, n, err
}

// copyNewItems is copyNewUsers for items, whose users must all exist.
func (s *Shard) copyNewItems(ctx context.Context, tx pgx.Tx, parts []int32, rows []ImportItem) (copied bool, n int64, err error) {
	users := make([]UserRef, 0, len(rows))
	for i := range rows {
		users = append(users, UserRef{rows[i].Partition, rows[i].UserID})
	}
	slices.SortFunc(users, func(a, b UserRef) int {
		return cmp.Or(cmp.Compare(a.Partition, b.Partition), strings.Compare(a.UserID, b.UserID))
	})
	users = slices.Compact(users)
	ps, ids := make([]int32, len(users)), make([]string, len(users))
	for i, u := range users {
		ps[i], ids[i] = u.Partition, u.UserID
	}
	var found int
	if err := tx.QueryRow(ctx, lockItemUsersSQL, ps, ids).Scan(&found); err != nil || found != len(users) {
		return false, 0, err
	}
	start, ok, err := newRowVersions(ctx, tx, newItemFloorsSQL, parts)
	if err != nil || !ok {
		return false, 0, err
	}
	vals := make([]any, 6)
	n, err = s.copyNew(ctx, tx, "items", []string{"partition", "user_id", "collection", "key", "value", "version"}, len(rows), func(i int) []any {
		r := &rows[i]
		vals[0], vals[1], vals[2], vals[3], vals[4], vals[5] = r.Partition, r.UserID, r.Collection, r.Key, r.Value, max(start(r.Partition), r.Version)
		return vals
	})
	return true, n, err
}

// copyNew COPYs n rows (row(i) gives the values of columns) into table
// and counts the batch in importCopies.
func (s *Shard) copyNew(ctx context.Context, tx pgx.Tx, table string, columns []string, n int, row func(i int) []any) (int64, error) {
	copied, err := tx.CopyFrom(ctx, pgx.Identifier{table}, columns,
		pgx.CopyFromSlice(n, func(i int) ([]any, error) { return row(i), nil }))
	if err == nil {
		s.importCopies.Add(1)
	}
	return copied, err
}
