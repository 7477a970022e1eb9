package shards

import (
	"context"
	"slices"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/versioning"
)

// The import's follow phase applies small batches often, where the bulk
// path's transaction (staging table, COPY, upsert: five round trips) costs
// more than the rows. ApplyUsers and ApplyItems write such a batch with
// the bulk rules in one statement, fenced in that statement: it locks the
// ownership rows of its partitions (FOR SHARE, as every write) before it
// reads a row, and writes nothing unless all of them are owned.

// fencedHead locks the ownership rows of partitions $3 and says whether
// all of them are owned; the src that follows it yields nothing otherwise.
const fencedHead = `
WITH own AS (
    SELECT partition FROM ownership WHERE partition = ANY($3::integer[]) AND state = 'owned' ORDER BY partition FOR SHARE
), ok AS (
    SELECT count(*) = cardinality($3::integer[]) AS ok FROM own
)`

// The bulk upserts (importUsersTail, importItemsTail) over rows given as
// arrays instead of a staging table, behind fencedHead.
const (
	applyUsersSQL = fencedHead + `, src AS (
    SELECT partition, user_id, profile, 0::bigint AS version
    FROM unnest($4::integer[], $5::text[], $6::jsonb[]) AS s (partition, user_id, profile)
    WHERE (SELECT ok FROM ok)
)` + importUsersTail + `SELECT (SELECT ok FROM ok), (SELECT count(*) FROM up)`
	applyItemsSQL = fencedHead + `, src AS (
    SELECT partition, user_id, collection, key, value, 0::bigint AS version
    FROM unnest($4::integer[], $5::text[], $6::text[], $7::text[], $8::jsonb[]) AS s (partition, user_id, collection, key, value)
    WHERE (SELECT ok FROM ok)
)` + importItemsTail + `SELECT (SELECT ok FROM ok), (SELECT count(*) FROM up)`
)

const missingApplySQL = `
SELECT DISTINCT k.partition, k.user_id FROM unnest($1::integer[], $2::text[]) AS k (partition, user_id)
WHERE NOT EXISTS (SELECT 1 FROM users AS u WHERE u.partition = k.partition AND u.user_id = k.user_id)
ORDER BY 1, 2`

// distinctPartitions returns the partitions of rows, sorted, once each.
func distinctPartitions[R any](rows []R, part func(*R) int32) []int32 {
	ps := make([]int32, len(rows))
	for i := range rows {
		ps[i] = part(&rows[i])
	}
	slices.Sort(ps)
	return slices.Compact(ps)
}

// ApplyUsers writes users as ImportUsers does, in one statement: for small
// batches. A *WrongShardError if a partition is not owned; nothing is
// written then.
func (s *Shard) ApplyUsers(ctx context.Context, rows []ImportUser, events bool) (ImportResult, error) {
	rows = lastOfKey(rows, func(r *ImportUser) UserRef { return UserRef{r.Partition, r.UserID} })
	parts := distinctPartitions(rows, func(r *ImportUser) int32 { return r.Partition })
	ps := make([]int32, len(rows))
	ids := make([]string, len(rows))
	profiles := make([]string, len(rows))
	for i, r := range rows {
		ps[i], ids[i], profiles[i] = r.Partition, r.UserID, string(r.Profile)
	}
	var res ImportResult
	err := s.applyFenced(ctx, parts, func(c *pgx.Conn) (bool, error) {
		var ok bool
		err := c.QueryRow(ctx, applyUsersSQL, events, false, parts, ps, ids, profiles).Scan(&ok, &res.Written)
		return ok, err
	})
	if err != nil {
		return ImportResult{}, s.wrap("apply users", err)
	}
	return res, nil
}

// ApplyItems writes items as ImportItems does, in one statement: for small
// batches. Items whose user does not exist are left out and listed in the
// result. A *WrongShardError if a partition is not owned; nothing is
// written then.
func (s *Shard) ApplyItems(ctx context.Context, rows []ImportItem, events bool) (ImportResult, error) {
	rows = lastOfKey(rows, func(r *ImportItem) itemRef { return itemRef{r.Partition, r.UserID, r.Collection, r.Key} })
	parts := distinctPartitions(rows, func(r *ImportItem) int32 { return r.Partition })
	ps := make([]int32, len(rows))
	ids := make([]string, len(rows))
	cols := make([]string, len(rows))
	keys := make([]string, len(rows))
	vals := make([]string, len(rows))
	for i, r := range rows {
		ps[i], ids[i], cols[i], keys[i], vals[i] = r.Partition, r.UserID, r.Collection, r.Key, string(r.Value)
	}
	var res ImportResult
	err := s.applyFenced(ctx, parts, func(c *pgx.Conn) (bool, error) {
		var ok bool
		if err := c.QueryRow(ctx, applyItemsSQL, events, false, parts, ps, ids, cols, keys, vals).Scan(&ok, &res.Written); err != nil || !ok {
			return ok, err
		}
		// Written without them: the statement joins the items to their
		// users (FOR KEY SHARE), so a user missing here was missing then
		// or was deleted since, taking its items along.
		missing, err := c.Query(ctx, missingApplySQL, ps, ids)
		if err != nil {
			return true, err
		}
		res.MissingUsers, err = pgx.CollectRows(missing, pgx.RowToStructByPos[UserRef])
		return true, err
	})
	if err != nil {
		return ImportResult{}, s.wrap("apply items", err)
	}
	return res, nil
}

// applyFenced runs write, which reports whether every partition of parts
// was owned, again while the floor trigger refuses a create racing a
// prune; not owned is a *WrongShardError.
func (s *Shard) applyFenced(ctx context.Context, parts []int32, write func(*pgx.Conn) (bool, error)) error {
	ok, err := func() (bool, error) {
		c, err := s.acquire(ctx)
		if err != nil {
			return false, err
		}
		defer c.Release()
		var ok bool
		err = versioning.RetryBelowTombstone(func() error {
			var err error
			ok, err = write(c.Conn())
			return err
		})
		return ok, err
	}()
	if err != nil || ok {
		return err
	}
	owned, err := s.OwnershipOf(ctx, parts)
	if err != nil {
		return err
	}
	var not []int32
	for _, p := range parts {
		if owned[p] != Owned {
			not = append(not, p)
		}
	}
	return &WrongShardError{Partitions: not}
}
