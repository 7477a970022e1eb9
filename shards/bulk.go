package shards

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/shardgate/shardgate/internal/versioning"
)

// Bulk imports (package importer) write a batch of rows in one transaction:
// COPY into a temporary staging table, then one set-based upsert (or, while
// the rows are new, a plain INSERT: see importBatch). Each batch
// is fenced like every write (FOR SHARE on the ownership rows of its
// partitions) and keeps the per-key version rules: a new row starts above
// its tombstone and the partition's version floor, a changed row gets the
// next version, and a row written again unchanged keeps its version and
// emits nothing, so a resumed import that writes a batch twice doubles
// nothing. Change events are written only when asked for.

// ImportUser is one user of a bulk import.
type ImportUser struct {
	Partition int32
	UserID    string
	Profile   []byte // a JSON object
	// Version, if above 0, is the version to keep where the rules allow
	// (see ImportUsers).
	Version int64
}

// ImportItem is one item of a bulk import.
type ImportItem struct {
	Partition  int32
	UserID     string
	Collection string
	Key        string
	Value      []byte // JSON
	Version    int64  // as ImportUser.Version
}

// ImportResult says what a bulk import batch did.
type ImportResult struct {
	// Written counts rows inserted or changed; rows that were already as
	// given are not counted.
	Written int64
	// MissingUsers lists the users (partition, user ID) of items that were
	// not written because the user does not exist (only when the batch was
	// allowed to skip them).
	MissingUsers []UserRef
}

// UserRef names a user.
type UserRef struct {
	Partition int32
	UserID    string
}

// WrongShardError is a batch refused because some of its partitions are not
// owned by the shard; it wraps ErrWrongShard. Nothing of the batch was
// written.
type WrongShardError struct {
	Partitions []int32
}

func (e *WrongShardError) Error() string {
	return fmt.Sprintf("partitions %v: %v", e.Partitions, ErrWrongShard)
}

func (e *WrongShardError) Unwrap() error { return ErrWrongShard }

// MissingUsersError is an item batch refused because some items' users do
// not exist. Nothing of the batch was written.
type MissingUsersError struct {
	Users []UserRef
}

func (e *MissingUsersError) Error() string {
	return fmt.Sprintf("%d items' users do not exist (first: %q)", len(e.Users), e.Users[0].UserID)
}

// Unwrap lets errors.Is(err, ErrUserNotFound) match.
func (e *MissingUsersError) Unwrap() error { return ErrUserNotFound }

// Temporary staging tables live as long as the connection; ON COMMIT DELETE
// ROWS empties them after each batch.
const (
	createUserStageSQL = `CREATE TEMP TABLE IF NOT EXISTS sg_import_user_stage (
    partition integer, user_id text, profile jsonb, version bigint) ON COMMIT DELETE ROWS`
	createItemStageSQL = `CREATE TEMP TABLE IF NOT EXISTS sg_import_item_stage (
    partition integer, user_id text, collection text, key text COLLATE "C", value jsonb, version bigint) ON COMMIT DELETE ROWS`
	lockOwnedSQL = `SELECT partition FROM ownership WHERE partition = ANY($1::integer[]) AND state = 'owned' ORDER BY partition FOR SHARE`
)

// importUsersSQL upserts the staged users (one per key: ON CONFLICT may
// not touch a row twice) and, with $1, writes their events. A staged
// version (with $2) is kept where the rules allow: a new row gets it if
// it lies above the tombstone and the floor, a changed row if it lies
// above the row's.
const importUsersSQL = usersStage + usersInsert + usersOnConflict + usersReturning + `SELECT count(*) FROM up`

// insertUsersSQL is importUsersSQL for users none of which exists: a
// plain INSERT, which fails on the first that does (see importBatch).
const insertUsersSQL = usersStage + usersInsert + usersReturning + `SELECT count(*) FROM up`

// Without events, the statements return no rows (the command tag counts
// the rows written): RETURNING every row into a CTE was a sixth of the
// statement's time (measured). The upsert's $2 is $1 there.
var (
	insertUsersQuietSQL = usersStage + usersInsertBody
	importUsersQuietSQL = usersStage + usersInsertBody + strings.ReplaceAll(usersOnConflict, "$2", "$1")
)

// importUsersTail upserts the users of CTE src and writes their events;
// ApplyUsers puts it after its own src.
const importUsersTail = usersInsert + usersOnConflict + usersReturning

const usersStage = `
WITH src AS (
    SELECT partition, user_id, profile, version FROM sg_import_user_stage
)`

const (
	usersInsert     = `, up AS (` + usersInsertBody
	usersInsertBody = `
    INSERT INTO users AS u (partition, user_id, profile, version)
    SELECT * FROM (
        SELECT s.partition, s.user_id, s.profile, greatest(t.version + 1, c.version_floor + 1, 1, s.version)
        FROM src AS s
        LEFT JOIN user_tombstones AS t ON t.partition = s.partition AND t.user_id = s.user_id
        LEFT JOIN outbox_clock AS c ON c.partition = s.partition
    ) AS n
`
	usersOnConflict = `    ON CONFLICT (partition, user_id) DO UPDATE
        SET profile = EXCLUDED.profile, updated_at = now(),
            version = CASE WHEN $2::boolean THEN greatest(u.version + 1, EXCLUDED.version) ELSE u.version + 1 END
        WHERE u.profile IS DISTINCT FROM EXCLUDED.profile
`
	usersReturning = `    RETURNING u.partition, u.user_id, u.version, u.profile
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT partition, user_id, 'user', user_id, 'upsert', version, profile FROM up
    WHERE $1::boolean ORDER BY partition, user_id
)
`
)

// importItemsSQL upserts the staged items (one per key) whose user exists
// and, with $1, writes their events. FOR KEY SHARE on the users keeps a
// concurrent DeleteUser from leaving items behind. It also returns the
// users it did not find, as the users that usr locked, not a separate
// look-up: one index probe per row less (a fifth of the batch's time,
// measured), and a user deleted between a look-up and the upsert can no
// longer drop its items unreported.
const importItemsSQL = itemsStage + itemsInsert + itemsOnConflict + itemsReturning + itemsMissing

// insertItemsSQL is importItemsSQL for items none of which exists (see
// insertUsersSQL).
const insertItemsSQL = itemsStage + itemsInsert + itemsReturning + itemsMissing

// Without events (see insertUsersQuietSQL).
var (
	insertItemsQuietSQL = itemsStage + itemsInsert + itemsReturnQuiet + itemsMissing
	importItemsQuietSQL = itemsStage + itemsInsert + strings.ReplaceAll(itemsOnConflict, "$2", "$1") + itemsReturnQuiet + itemsMissing
)

// importItemsTail upserts the items of CTE src whose user exists and
// writes their events; ApplyItems puts it after its own src.
const importItemsTail = itemsInsert + itemsOnConflict + itemsReturning

const (
	itemsStage = `
WITH src AS (
    SELECT partition, user_id, collection, key, value, version FROM sg_import_item_stage
)`
	// usr looks each item's user up by key (LATERAL): as a join, the
	// planner hashed every user of the shard for each batch, a quarter of
	// an item batch's time with 120k users (measured), growing with them.
	itemsInsert = `, usr AS (
    SELECT s.partition, s.user_id, s.collection, s.key, s.value, s.version
    FROM src AS s CROSS JOIN LATERAL (
        SELECT FROM users AS u WHERE u.partition = s.partition AND u.user_id = s.user_id FOR KEY SHARE
    ) AS u
), up AS (
    INSERT INTO items AS i (partition, user_id, collection, key, value, version)
    SELECT * FROM (
        SELECT s.partition, s.user_id, s.collection, s.key, s.value, greatest(t.version + 1, c.version_floor + 1, 1, s.version)
        FROM usr AS s
        LEFT JOIN item_tombstones AS t ON t.partition = s.partition AND t.user_id = s.user_id
            AND t.collection = s.collection AND t.key = s.key
        LEFT JOIN outbox_clock AS c ON c.partition = s.partition
    ) AS n
`
	itemsOnConflict = `    ON CONFLICT (partition, user_id, collection, key) DO UPDATE
        SET value = EXCLUDED.value, updated_at = now(),
            version = CASE WHEN $2::boolean THEN greatest(i.version + 1, EXCLUDED.version) ELSE i.version + 1 END
        WHERE i.value IS DISTINCT FROM EXCLUDED.value
`
	itemsReturning = `    RETURNING i.partition, i.user_id, i.collection, i.key, i.version, i.value
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT partition, user_id, 'item', collection || '/' || key, 'upsert', version, value FROM up
    WHERE $1::boolean ORDER BY partition, user_id, collection, key
)
`
	itemsReturnQuiet = `    RETURNING 1
)
`
	// missing skips its anti-join (a tenth of the statement) unless usr,
	// at most one row per staged row, lacks some.
	itemsMissing = `, missing AS (
    SELECT DISTINCT s.partition, s.user_id FROM sg_import_item_stage AS s
    WHERE (SELECT count(*) FROM usr) < (SELECT count(*) FROM sg_import_item_stage)
        AND NOT EXISTS (SELECT 1 FROM usr AS u WHERE u.partition = s.partition AND u.user_id = s.user_id)
)
SELECT (SELECT count(*) FROM up),
       coalesce((SELECT array_agg(partition ORDER BY partition, user_id) FROM missing), '{}'),
       coalesce((SELECT array_agg(user_id ORDER BY partition, user_id) FROM missing), '{}')`
)

// ImportUsers writes a batch of users in one transaction. A row given a
// Version keeps it where the rules allow: created above its tombstone and
// the partition's floor, changed above its current version; otherwise it
// gets the next version the rules give. A *WrongShardError if any
// partition is not owned; nothing is written then.
func (s *Shard) ImportUsers(ctx context.Context, rows []ImportUser, events bool) (ImportResult, error) {
	rows = lastOfKey(rows, func(r *ImportUser) UserRef { return UserRef{r.Partition, r.UserID} })
	parts := make([]int32, 0, len(rows))
	for _, r := range rows {
		parts = append(parts, r.Partition)
	}
	var res ImportResult
	err := s.importBatch(ctx, parts, createUserStageSQL, func(tx pgx.Tx, upsert bool, parts []int32) error {
		if !events && !upsert {
			copied, n, err := s.copyNewUsers(ctx, tx, parts, rows)
			if err != nil || copied {
				res.Written = n
				return err
			}
		}
		versioned := false
		vals := make([]any, 4) // pgx encodes a row before asking for the next
		_, err := tx.CopyFrom(ctx, pgx.Identifier{"sg_import_user_stage"}, []string{"partition", "user_id", "profile", "version"},
			pgx.CopyFromSlice(len(rows), func(i int) ([]any, error) {
				r := &rows[i]
				versioned = versioned || r.Version > 0
				vals[0], vals[1], vals[2], vals[3] = r.Partition, r.UserID, r.Profile, r.Version
				return vals, nil
			}))
		if err != nil {
			return err
		}
		switch {
		case events && upsert:
			return tx.QueryRow(ctx, importUsersSQL, events, versioned).Scan(&res.Written)
		case events:
			return tx.QueryRow(ctx, insertUsersSQL, events).Scan(&res.Written)
		}
		var tag pgconn.CommandTag
		if upsert {
			tag, err = tx.Exec(ctx, importUsersQuietSQL, versioned)
		} else {
			tag, err = tx.Exec(ctx, insertUsersQuietSQL)
		}
		res.Written = tag.RowsAffected()
		return err
	})
	if err != nil {
		return ImportResult{}, s.wrap("import users", err)
	}
	return res, nil
}

// ImportItems writes a batch of items in one transaction. Items whose user
// does not exist make the batch fail with a *MissingUsersError, or, with
// skipMissing, are left out and listed in the result. A *WrongShardError if
// any partition is not owned. Either error writes nothing.
func (s *Shard) ImportItems(ctx context.Context, rows []ImportItem, events, skipMissing bool) (ImportResult, error) {
	rows = lastOfKey(rows, func(r *ImportItem) itemRef { return itemRef{r.Partition, r.UserID, r.Collection, r.Key} })
	parts := make([]int32, 0, len(rows))
	for _, r := range rows {
		parts = append(parts, r.Partition)
	}
	var res ImportResult
	err := s.importBatch(ctx, parts, createItemStageSQL, func(tx pgx.Tx, upsert bool, parts []int32) error {
		res = ImportResult{}
		if !events && !upsert {
			copied, n, err := s.copyNewItems(ctx, tx, parts, rows)
			if err != nil || copied {
				res.Written = n
				return err
			}
		}
		versioned := false
		vals := make([]any, 6)
		_, err := tx.CopyFrom(ctx, pgx.Identifier{"sg_import_item_stage"}, []string{"partition", "user_id", "collection", "key", "value", "version"},
			pgx.CopyFromSlice(len(rows), func(i int) ([]any, error) {
				r := &rows[i]
				versioned = versioned || r.Version > 0
				vals[0], vals[1], vals[2], vals[3], vals[4], vals[5] = r.Partition, r.UserID, r.Collection, r.Key, r.Value, r.Version
				return vals, nil
			}))
		if err != nil {
			return err
		}
		var (
			missParts []int32
			missUsers []string
			sql       string
			args      []any
		)
		switch {
		case events && upsert:
			sql, args = importItemsSQL, []any{events, versioned}
		case events:
			sql, args = insertItemsSQL, []any{events}
		case upsert:
			sql, args = importItemsQuietSQL, []any{versioned}
		default:
			sql = insertItemsQuietSQL
		}
		if err := tx.QueryRow(ctx, sql, args...).Scan(&res.Written, &missParts, &missUsers); err != nil {
			return err
		}
		for i := range missParts {
			res.MissingUsers = append(res.MissingUsers, UserRef{missParts[i], missUsers[i]})
		}
		if len(res.MissingUsers) > 0 && !skipMissing {
			// The rest was written: rolling back writes nothing.
			return &MissingUsersError{Users: res.MissingUsers}
		}
		return nil
	})
	if err != nil {
		return ImportResult{}, s.wrap("import items", err)
	}
	return res, nil
}

type itemRef struct {
	partition             int32
	user, collection, key string
}

// lastOfKey keeps the last row of each key, in order. Deduplicating here
// spares the upsert a sort (measured: a tenth of its time).
func lastOfKey[R any, K comparable](rows []R, key func(*R) K) []R {
	last := make(map[K]int, len(rows))
	for i := range rows {
		last[key(&rows[i])] = i
	}
	if len(last) == len(rows) {
		return rows
	}
	out := make([]R, 0, len(last))
	for i := range rows {
		if last[key(&rows[i])] == i {
			out = append(out, rows[i])
		}
	}
	return out
}

// importUpsertRun is how many batches after one that met an existing row
// upsert at once instead of trying a plain INSERT first: rows that exist
// come in runs (the overlap a resumed import writes again, data already
// in the shard), and a failed INSERT costs the batch twice.
const importUpsertRun = 8

// importBatch runs write in a transaction after making the staging table
// and locking the ownership of parts, which must all be owned; write is
// given them sorted, each once. A statement
// refused for a version below a tombstone or floor that moved meanwhile is
// run again, as PutUser does.
//
// write is asked to upsert, or to INSERT rows it expects to be new: ON
// CONFLICT probes the key's index once more per row, a quarter of the
// batch's time on the shard (measured). Should an INSERT meet an existing
// row (the key's unique index refuses it, also for a row a concurrent
// writer committed), the transaction is rolled back and the batch is
// written again with an upsert: both write the same rows with the same
// versions when none exists, so only the cost differs.
//
// The transaction commits with the server's synchronous_commit, not off:
// the importer advances its checkpoint in the catalog once this returns,
// and a commit not yet flushed could be lost in a crash of the shard after
// the checkpoint passed it, leaving rows missing for good. (Off would need
// the checkpoint to wait for the shard's WAL flush; one flush per batch of
// thousands of rows is not where the time goes.)
func (s *Shard) importBatch(ctx context.Context, parts []int32, createStage string, write func(tx pgx.Tx, upsert bool, parts []int32) error) error {
	slices.Sort(parts)
	parts = slices.Compact(parts)
	c, err := s.acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	run := func(upsert bool) error {
		return versioning.RetryBelowTombstone(func() error {
			return pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				var b pgx.Batch
				b.Queue(createStage)
				b.Queue(lockOwnedSQL, parts)
				br := tx.SendBatch(ctx, &b)
				_, err := br.Exec()
				var owned []int32
				if err == nil {
					var rows pgx.Rows
					if rows, err = br.Query(); err == nil {
						owned, err = pgx.CollectRows(rows, pgx.RowTo[int32])
					}
				}
				if cerr := br.Close(); err == nil {
					err = cerr
				}
				if err != nil {
					return err
				}
				if len(owned) != len(parts) {
					var not []int32
					for _, p := range parts {
						if _, found := slices.BinarySearch(owned, p); !found {
							not = append(not, p)
						}
					}
					return &WrongShardError{Partitions: not}
				}
				return write(tx, upsert, parts)
			})
		})
	}
	upsert := s.takeImportUpsert()
	err = run(upsert)
	if !upsert && isImportKeyConflict(err) {
		s.importUpserts.Store(importUpsertRun)
		err = run(true)
	}
	return err
}

// takeImportUpsert says whether the next bulk batch should upsert at once.
func (s *Shard) takeImportUpsert() bool {
	for {
		n := s.importUpserts.Load()
		if n <= 0 {
			return false
		}
		if s.importUpserts.CompareAndSwap(n, n-1) {
			return true
		}
	}
}

// isImportKeyConflict reports a bulk INSERT refused for a row that exists.
func isImportKeyConflict(err error) bool {
	var pg *pgconn.PgError
	return errors.As(err, &pg) && pg.Code == "23505" && // unique_violation
		(pg.ConstraintName == "users_pkey" || pg.ConstraintName == "items_pkey")
}

// IsWrongShardBatch returns the partitions a bulk batch found not owned.
func IsWrongShardBatch(err error) ([]int32, bool) {
	var ws *WrongShardError
	if errors.As(err, &ws) {
		return ws.Partitions, true
	}
	return nil, false
}

// ItemRef names an item.
type ItemRef struct {
	Partition  int32
	UserID     string
	Collection string
	Key        string
}

// unreadableSQL lists the partitions of $1 this shard may not read.
const unreadableSQL = `
SELECT array_agg(p ORDER BY p) FROM (SELECT DISTINCT p FROM unnest($1::integer[]) AS p) AS ps
WHERE NOT EXISTS (SELECT 1 FROM ownership AS o WHERE o.partition = ps.p AND o.state IN ('owned', 'frozen'))`

const lookupUsersSQL = `
SELECT u.partition, u.user_id, u.profile
FROM unnest($1::integer[], $2::text[]) AS k (partition, user_id)
JOIN users AS u ON u.partition = k.partition AND u.user_id = k.user_id`

const lookupItemsSQL = `
SELECT i.partition, i.user_id, i.collection, i.key, i.value
FROM unnest($1::integer[], $2::text[], $3::text[], $4::text[]) AS k (partition, user_id, collection, key)
JOIN items AS i ON i.partition = k.partition AND i.user_id = k.user_id AND i.collection = k.collection AND i.key = k.key`

// readFenced runs read in a repeatable-read transaction after checking
// that every partition of parts is readable here (owned or frozen);
// otherwise a *WrongShardError.
func (s *Shard) readFenced(ctx context.Context, parts []int32, read func(pgx.Tx) error) error {
	c, err := s.acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	return pgx.BeginTxFunc(ctx, c, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		var not []int32
		if err := tx.QueryRow(ctx, unreadableSQL, parts).Scan(&not); err != nil {
			return err
		}
		if len(not) > 0 {
			return &WrongShardError{Partitions: not}
		}
		return read(tx)
	})
}

// LookupUsers returns the profiles of those of users that exist, by key. A
// *WrongShardError if a partition is not readable here.
func (s *Shard) LookupUsers(ctx context.Context, users []UserRef) (map[UserRef][]byte, error) {
	parts := make([]int32, len(users))
	ids := make([]string, len(users))
	for i, u := range users {
		parts[i], ids[i] = u.Partition, u.UserID
	}
	out := make(map[UserRef][]byte, len(users))
	err := s.readFenced(ctx, parts, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, lookupUsersSQL, parts, ids)
		if err != nil {
			return err
		}
		var (
			k UserRef
			v []byte
		)
		_, err = pgx.ForEachRow(rows, []any{&k.Partition, &k.UserID, &v}, func() error {
			out[k] = v
			v = nil
			return nil
		})
		return err
	})
	if err != nil {
		return nil, s.wrap("lookup users", err)
	}
	return out, nil
}

// LookupItems returns the values of those of items that exist, by key. A
// *WrongShardError if a partition is not readable here.
func (s *Shard) LookupItems(ctx context.Context, items []ItemRef) (map[ItemRef][]byte, error) {
	parts := make([]int32, len(items))
	ids := make([]string, len(items))
	cols := make([]string, len(items))
	keys := make([]string, len(items))
	for i, it := range items {
		parts[i], ids[i], cols[i], keys[i] = it.Partition, it.UserID, it.Collection, it.Key
	}
	out := make(map[ItemRef][]byte, len(items))
	err := s.readFenced(ctx, parts, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, lookupItemsSQL, parts, ids, cols, keys)
		if err != nil {
			return err
		}
		var (
			k ItemRef
			v []byte
		)
		_, err = pgx.ForEachRow(rows, []any{&k.Partition, &k.UserID, &k.Collection, &k.Key, &v}, func() error {
			out[k] = v
			v = nil
			return nil
		})
		return err
	})
	if err != nil {
		return nil, s.wrap("lookup items", err)
	}
	return out, nil
}

// CountData counts the users and items of the partitions this shard serves
// (owned or frozen: a partition mid-move is counted on its source only).
func (s *Shard) CountData(ctx context.Context) (users, items int64, err error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return 0, 0, s.wrap("count data", err)
	}
	defer c.Release()
	err = c.QueryRow(ctx, `
		WITH o AS (SELECT partition FROM ownership WHERE state IN ('owned', 'frozen'))
		SELECT (SELECT count(*) FROM users WHERE partition IN (SELECT partition FROM o)),
		       (SELECT count(*) FROM items WHERE partition IN (SELECT partition FROM o))`).Scan(&users, &items)
	if err != nil {
		return 0, 0, s.wrap("count data", err)
	}
	return users, items, nil
}

// CountKeySpace counts, in the partitions this shard serves (owned or
// frozen), the users whose ID starts with userPrefix and their items in
// the given collections.
func (s *Shard) CountKeySpace(ctx context.Context, userPrefix string, collections []string) (users, items int64, err error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return 0, 0, s.wrap("count key space", err)
	}
	defer c.Release()
	err = c.QueryRow(ctx, `
		WITH o AS (SELECT partition FROM ownership WHERE state IN ('owned', 'frozen'))
		SELECT (SELECT count(*) FROM users WHERE partition IN (SELECT partition FROM o) AND starts_with(user_id, $1)),
		       (SELECT count(*) FROM items WHERE partition IN (SELECT partition FROM o) AND starts_with(user_id, $1)
		        AND collection = ANY($2::text[]))`, userPrefix, collections).Scan(&users, &items)
	if err != nil {
		return 0, 0, s.wrap("count key space", err)
	}
	return users, items, nil
}

// purgeUsersSQL deletes users with their sessions and items, leaving
// tombstones (versions keep rising if they come back) and, with $3, delete
// events, which make caches and watchers drop what they hold.
const purgeUsersSQL = `
WITH k AS (
    SELECT DISTINCT partition, user_id FROM unnest($1::integer[], $2::text[]) AS k (partition, user_id)
), du AS (
    DELETE FROM users AS u USING k WHERE u.partition = k.partition AND u.user_id = k.user_id
    RETURNING u.partition, u.user_id, u.version
), ds AS (
    DELETE FROM sessions AS s USING du WHERE s.partition = du.partition AND s.user_id = du.user_id
    RETURNING s.partition, s.user_id, s.token_hash, s.version
), di AS (
    DELETE FROM items AS i USING du WHERE i.partition = du.partition AND i.user_id = du.user_id
    RETURNING i.partition, i.user_id, i.collection, i.key, i.version
), tu AS (
    INSERT INTO user_tombstones AS t (partition, user_id, version)
    SELECT partition, user_id, version + 1 FROM du
    ON CONFLICT (partition, user_id) DO UPDATE SET version = greatest(t.version, EXCLUDED.version), deleted_at = now()
), ti AS (
    INSERT INTO item_tombstones AS t (partition, user_id, collection, key, version)
    SELECT partition, user_id, collection, key, version + 1 FROM di
    ON CONFLICT (partition, user_id, collection, key) DO UPDATE
        SET version = greatest(t.version, EXCLUDED.version), deleted_at = now()
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT partition, user_id, entity, key, 'delete', version, NULL::jsonb FROM (
        SELECT partition, user_id, 1 AS ord, 'session' AS entity, encode(token_hash, 'hex') AS key, version + 1 AS version FROM ds
        UNION ALL
        SELECT partition, user_id, 2, 'item', collection || '/' || key, version + 1 FROM di
        UNION ALL
        SELECT partition, user_id, 3, 'user', user_id, version + 1 FROM du
    ) AS e WHERE $3::boolean ORDER BY partition, user_id, ord, key
)
SELECT count(*) FROM du`

// PurgeUsers deletes users (with their sessions and items) in one fenced
// transaction, with their delete events if events, and returns how many it
// deleted. A *WrongShardError if a partition is not owned.
func (s *Shard) PurgeUsers(ctx context.Context, users []UserRef, events bool) (int64, error) {
	parts := make([]int32, len(users))
	ids := make([]string, len(users))
	for i, u := range users {
		parts[i], ids[i] = u.Partition, u.UserID
	}
	var n int64
	err := s.importBatch(ctx, append([]int32(nil), parts...), "SELECT 1", func(tx pgx.Tx, _ bool, _ []int32) error {
		return tx.QueryRow(ctx, purgeUsersSQL, parts, ids, events).Scan(&n)
	})
	if err != nil {
		return 0, s.wrap("purge users", err)
	}
	return n, nil
}

const purgeItemsSQL = `
WITH k AS (
    SELECT DISTINCT partition, user_id, collection, key
    FROM unnest($1::integer[], $2::text[], $3::text[], $4::text[]) AS k (partition, user_id, collection, key)
), di AS (
    DELETE FROM items AS i USING k
    WHERE i.partition = k.partition AND i.user_id = k.user_id AND i.collection = k.collection AND i.key = k.key
    RETURNING i.partition, i.user_id, i.collection, i.key, i.version
), ti AS (
    INSERT INTO item_tombstones AS t (partition, user_id, collection, key, version)
    SELECT partition, user_id, collection, key, version + 1 FROM di
    ON CONFLICT (partition, user_id, collection, key) DO UPDATE
        SET version = greatest(t.version, EXCLUDED.version), deleted_at = now()
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT partition, user_id, 'item', collection || '/' || key, 'delete', version + 1, NULL::jsonb FROM di
    WHERE $5::boolean ORDER BY partition, user_id, collection, key
)
SELECT count(*) FROM di`

// PurgeItems deletes items in one fenced transaction, with tombstones and,
// if events, delete events, and returns how many it deleted.
func (s *Shard) PurgeItems(ctx context.Context, items []ItemRef, events bool) (int64, error) {
	parts := make([]int32, len(items))
	ids := make([]string, len(items))
	cols := make([]string, len(items))
	keys := make([]string, len(items))
	for i, it := range items {
		parts[i], ids[i], cols[i], keys[i] = it.Partition, it.UserID, it.Collection, it.Key
	}
	var n int64
	err := s.importBatch(ctx, append([]int32(nil), parts...), "SELECT 1", func(tx pgx.Tx, _ bool, _ []int32) error {
		return tx.QueryRow(ctx, purgeItemsSQL, parts, ids, cols, keys, events).Scan(&n)
	})
	if err != nil {
		return 0, s.wrap("purge items", err)
	}
	return n, nil
}

// ExportSink receives a partition's rows from ExportPartition, users first.
type ExportSink struct {
	User func(User) error
	Item func(Item) error
}

// exportPartitionSQL reads a partition in one statement (so in one
// snapshot): first the partition's ownership state, then, if it may be
// read here, its users and its items, each in key order.
const exportPartitionSQL = `
WITH o AS (SELECT state FROM ownership WHERE partition = $1)
SELECT 0 AS kind, coalesce((SELECT state FROM o), '') AS user_id, NULL::text AS collection, NULL::text AS key,
       NULL::jsonb AS value, NULL::bigint AS version
UNION ALL
SELECT 1, user_id, NULL, NULL, profile, version FROM users
WHERE partition = $1 AND EXISTS (SELECT 1 FROM o WHERE state IN ('owned', 'frozen'))
UNION ALL
SELECT 2, user_id, collection, key, value, version FROM items
WHERE partition = $1 AND EXISTS (SELECT 1 FROM o WHERE state IN ('owned', 'frozen'))
ORDER BY kind, user_id, collection, key`

// ExportPartition reads every user and item of a partition in one
// snapshot, users in user_id order then items in (user_id, collection, key)
// order, and hands them to sink. The partition must be readable here
// (owned or frozen) in that snapshot, else ErrWrongShard before any row:
// the snapshot holds the partition whole even if it moves on afterwards.
func (s *Shard) ExportPartition(ctx context.Context, partition int32, sink ExportSink) error {
	c, err := s.acquire(ctx)
	if err != nil {
		return s.wrap("export partition", err)
	}
	defer c.Release()
	rows, err := c.Query(ctx, exportPartitionSQL, partition)
	if err != nil {
		return s.wrap("export partition", err)
	}
	var (
		kind            int
		user            string
		collection, key pgtype.Text
		value           []byte
		version         pgtype.Int8
	)
	_, err = pgx.ForEachRow(rows, []any{&kind, &user, &collection, &key, &value, &version}, func() error {
		switch kind {
		case 0:
			if !readable(user) {
				return wrongShard(partition)
			}
			return nil
		case 1:
			return sink.User(User{UserID: user, Partition: partition, Profile: value, Version: version.Int64})
		default:
			return sink.Item(Item{UserID: user, Partition: partition, Collection: collection.String, Key: key.String, Value: value, Version: version.Int64})
		}
	})
	if err != nil {
		return s.wrap("export partition", err)
	}
	return nil
}
