package shards

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// User is a user's row.
type User struct {
	UserID    string
	Partition int32
	Profile   []byte // JSON as stored: jsonb normalizes whitespace and key order
	Version   int64
	CreatedAt time.Time
	UpdatedAt time.Time
}

// Three statements for PutUser, one per kind of expectation; each is fenced
// and writes its outbox row. See versions.go for the columns they return.
// A user created again after a delete continues after the delete's version
// (kept in user_tombstones) or, once that tombstone was pruned, above the
// partition's version floor (outbox_clock.version_floor, which pruning
// raised past it; see PruneTombstones), so versions rise per key for good.

// putUserAnySQL creates the user or replaces its profile, whatever its version.
const putUserAnySQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), up AS (
    INSERT INTO users AS u (partition, user_id, profile, version)
    SELECT $1, $2::text, $3::jsonb, greatest((SELECT version FROM user_tombstones
        WHERE partition = $1 AND user_id = $2),
        (SELECT version_floor FROM outbox_clock WHERE partition = $1), 0) + 1 FROM own
    ON CONFLICT (partition, user_id) DO UPDATE
        SET profile = EXCLUDED.profile, version = u.version + 1, updated_at = now()
    RETURNING u.version, u.profile
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, $2::text, 'user', $2::text, 'upsert', version, profile FROM up
)
SELECT EXISTS (SELECT 1 FROM own), (SELECT version FROM up), NULL::bigint`

// putUserCreateSQL creates the user only if it does not exist.
const putUserCreateSQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), up AS (
    INSERT INTO users (partition, user_id, profile, version)
    SELECT $1, $2::text, $3::jsonb, greatest((SELECT version FROM user_tombstones
        WHERE partition = $1 AND user_id = $2),
        (SELECT version_floor FROM outbox_clock WHERE partition = $1), 0) + 1 FROM own
    ON CONFLICT (partition, user_id) DO NOTHING
    RETURNING version, profile
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, $2::text, 'user', $2::text, 'upsert', version, profile FROM up
)
SELECT EXISTS (SELECT 1 FROM own), (SELECT version FROM up),
       (SELECT version FROM users WHERE partition = $1 AND user_id = $2)`

// putUserUpdateSQL replaces the profile only if the user is at version $4.
const putUserUpdateSQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), up AS (
    UPDATE users AS u
    SET profile = $3::jsonb, version = u.version + 1, updated_at = now()
    FROM own
    WHERE u.partition = $1 AND u.user_id = $2 AND u.version = $4
    RETURNING u.version, u.profile
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, $2::text, 'user', $2::text, 'upsert', version, profile FROM up
)
SELECT EXISTS (SELECT 1 FROM own), (SELECT version FROM up),
       (SELECT version FROM users WHERE partition = $1 AND user_id = $2)`

const userVersionSQL = `SELECT version FROM users WHERE partition = $1 AND user_id = $2`

// PutUser writes the user's profile (a JSON object) and returns the new
// version. expected nil writes unconditionally (create at version 1 or bump
// the version); *expected == 0 creates only if the user does not exist;
// *expected == N > 0 updates only if the user is at version N. A mismatch
// writes nothing and returns a *versioning.ConflictError. A partition not owned gives
// ErrWrongShard. The change and its outbox event commit together.
func (s *Shard) PutUser(ctx context.Context, partition int32, userID string, profile []byte, expected *int64) (version int64, err error) {
	if err := checkExpected(expected); err != nil {
		return 0, s.wrap("put user", err)
	}
	var (
		owned           bool
		written, before pgtype.Int8
		sql             string
		args            []any
	)
	switch {
	case expected == nil:
		sql, args = putUserAnySQL, []any{partition, userID, profile}
	case *expected == 0:
		sql, args = putUserCreateSQL, []any{partition, userID, profile}
	default:
		sql, args = putUserUpdateSQL, []any{partition, userID, profile, *expected}
	}
	err = s.write(ctx, partition, sql, args, func(row pgx.Row) error {
		return row.Scan(&owned, &written, &before)
	})
	if err != nil {
		return 0, s.wrap("put user", err)
	}
	switch {
	case !owned:
		return 0, s.wrap("put user", wrongShard(partition))
	case !written.Valid:
		return 0, s.wrap("put user", refused(ctx, s.pool, expected, before, false, userVersionSQL, partition, userID))
	}
	return written.Int64, nil
}

const getUserSQL = `
SELECT o.state, u.profile, u.version, u.created_at, u.updated_at
FROM ownership AS o
LEFT JOIN users AS u ON u.partition = o.partition AND u.user_id = $2
WHERE o.partition = $1`

// getUsersSQL is getUserSQL for many keys at once (read batching): a row
// per key, numbered from 1 in i, with a NULL state where the partition has
// no ownership row. The lateral joins keep it to index lookups per key.
const getUsersSQL = `
SELECT q.i, o.state, u.profile, u.version, u.created_at, u.updated_at
FROM unnest($1::integer[], $2::text[]) WITH ORDINALITY AS q(partition, user_id, i)
LEFT JOIN LATERAL (SELECT state FROM ownership WHERE partition = q.partition) AS o ON true
LEFT JOIN LATERAL (
    SELECT profile, version, created_at, updated_at FROM users
    WHERE partition = q.partition AND user_id = q.user_id
) AS u ON true`

// GetUser returns the user. It reads partitions that are owned or frozen,
// and returns ErrWrongShard for any other, versioning.ErrNotFound if there is no such
// user. Concurrent calls may be answered by one statement (readbatch.go).
func (s *Shard) GetUser(ctx context.Context, partition int32, userID string) (User, error) {
	if s != nil && s.users != nil {
		return s.users.read(ctx, userKey{partition, userID})
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return User{}, s.wrap("get user", err)
	}
	defer c.Release()
	r := &pendingRead[userKey, User]{key: userKey{partition, userID}}
	if err := s.getUser(ctx, c, r); err != nil {
		return User{}, s.wrap("get user", err)
	}
	return r.res, r.err
}

// userKey addresses a user for a point read.
type userKey struct {
	partition int32
	userID    string
}

// getUser answers one user read with getUserSQL.
func (s *Shard) getUser(ctx context.Context, c *pgxpool.Conn, r *pendingRead[userKey, User]) error {
	var (
		state            string
		u                = User{UserID: r.key.userID, Partition: r.key.partition}
		version          pgtype.Int8
		created, updated pgtype.Timestamptz
	)
	err := c.QueryRow(ctx, getUserSQL, r.key.partition, r.key.userID).Scan(&state, &u.Profile, &version, &created, &updated)
	if r.err = s.fencedRead("get user", r.key.partition, err, state, version.Valid); r.err == nil {
		u.Version, u.CreatedAt, u.UpdatedAt = version.Int64, created.Time, updated.Time
		r.res = u
	}
	return nil
}

// getUsers answers a batch of user reads with getUsersSQL.
func (s *Shard) getUsers(ctx context.Context, c *pgxpool.Conn, batch []*pendingRead[userKey, User]) error {
	parts := make([]int32, len(batch))
	ids := make([]string, len(batch))
	for i, r := range batch {
		parts[i], ids[i] = r.key.partition, r.key.userID
	}
	rows, err := c.Query(ctx, getUsersSQL, parts, ids)
	if err != nil {
		return err
	}
	var (
		i                int64
		state            pgtype.Text
		profile          []byte
		version          pgtype.Int8
		created, updated pgtype.Timestamptz
	)
	return answerRows(rows, len(batch), []any{&i, &state, &profile, &version, &created, &updated}, func(k int) {
		r := batch[k]
		if r.err = s.fencedRead("get user", r.key.partition, noOwnerRow(state), state.String, version.Valid); r.err == nil {
			r.res = User{UserID: r.key.userID, Partition: r.key.partition, Profile: profile,
				Version: version.Int64, CreatedAt: created.Time, UpdatedAt: updated.Time}
		}
	})
}

// DeleteUserResult counts what DeleteUser removed besides the user.
type DeleteUserResult struct {
	Sessions int64 // sessions removed, expired ones included
	Items    int64 // items removed
	// SessionHashes are the token hashes of the sessions removed, so
	// their cache entries can be invalidated.
	SessionHashes [][]byte
}

// The user row is locked before deleteUserSQL takes its snapshot (see
// DeleteUser), so the snapshot holds every session and item of the user.
const (
	lockOwnershipSQL = `SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE`
	lockUserSQL      = `SELECT 1 FROM users WHERE partition = $1 AND user_id = $2 FOR UPDATE`
)

// deleteUserSQL deletes the user if $3 is NULL or its version, then its
// sessions and items, with one delete event for each row.
const deleteUserSQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), du AS (
    DELETE FROM users AS u USING own
    WHERE u.partition = $1 AND u.user_id = $2 AND ($3::bigint IS NULL OR u.version = $3)
    RETURNING u.version
), ds AS (
    DELETE FROM sessions AS s USING du
    WHERE s.partition = $1 AND s.user_id = $2
    RETURNING s.token_hash, s.version
), di AS (
    DELETE FROM items AS i USING du
    WHERE i.partition = $1 AND i.user_id = $2
    RETURNING i.collection, i.key, i.version
), tu AS (
    INSERT INTO user_tombstones AS t (partition, user_id, version)
    SELECT $1, $2::text, version + 1 FROM du
    ON CONFLICT (partition, user_id) DO UPDATE SET version = greatest(t.version, EXCLUDED.version), deleted_at = now()
), ti AS (
    INSERT INTO item_tombstones AS t (partition, user_id, collection, key, version)
    SELECT $1, $2::text, collection, key, version + 1 FROM di
    ON CONFLICT (partition, user_id, collection, key) DO UPDATE
        SET version = greatest(t.version, EXCLUDED.version), deleted_at = now()
), ev AS (
    -- The sort reads every delete before the first outbox row is inserted:
    -- that insert takes the partition's outbox clock lock (see migration
    -- 00002), after which a write may lock only its own keys' tombstones
    -- (shards/sweep.go and prune.go rely on it).
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, $2::text, entity, key, 'delete', version, NULL::jsonb FROM (
        SELECT 1 AS ord, 'session' AS entity, encode(token_hash, 'hex') AS key, version + 1 AS version FROM ds
        UNION ALL
        SELECT 2, 'item', collection || '/' || key, version + 1 FROM di
        UNION ALL
        SELECT 3, 'user', $2::text, version + 1 FROM du
    ) AS e ORDER BY ord, key
)
SELECT EXISTS (SELECT 1 FROM own), (SELECT version FROM du),
       (SELECT count(*) FROM ds), (SELECT count(*) FROM di),
       (SELECT version FROM users WHERE partition = $1 AND user_id = $2),
       (SELECT array_agg(token_hash) FROM ds)`

// DeleteUser deletes the user with all their sessions and items, writing a
// delete event for each, and reports how many sessions and items went.
// expected nil deletes whatever the version; *expected == N > 0 deletes only
// at version N (else a *versioning.ConflictError, Current 0 if the user is missing);
// *expected == 0 ("must not exist") never deletes: a *versioning.ConflictError if the
// user exists. versioning.ErrNotFound if there is no user (and expected is nil or 0);
// ErrWrongShard if the partition is not owned.
func (s *Shard) DeleteUser(ctx context.Context, partition int32, userID string, expected *int64) (DeleteUserResult, error) {
	if err := checkExpected(expected); err != nil {
		return DeleteUserResult{}, s.wrap("delete user", err)
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return DeleteUserResult{}, s.wrap("delete user", err)
	}
	defer c.Release()

	// One round trip, one implicit transaction (a batch runs in one unless
	// it says otherwise). Under READ COMMITTED a statement cannot see rows
	// committed after its snapshot, so a single statement could miss a
	// session that CreateSession committed while the delete waited for the
	// user row. Locking the user row first (ownership row first, the order
	// CreateSession uses) closes that window: CreateSession holds FOR KEY
	// SHARE on the user row until it commits, and after our lock it finds
	// the user gone.
	var b pgx.Batch
	b.Queue(lockOwnershipSQL, partition)
	b.Queue(lockUserSQL, partition, userID)
	b.Queue(deleteUserSQL, partition, userID, expected)
	br := c.SendBatch(ctx, &b)
	var (
		owned         bool
		deleted       pgtype.Int8
		before        pgtype.Int8
		nSess, nItems int64
		hashes        [][]byte
	)
	_, err = br.Exec()
	if err == nil {
		_, err = br.Exec()
	}
	if err == nil {
		err = br.QueryRow().Scan(&owned, &deleted, &nSess, &nItems, &before, &hashes)
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return DeleteUserResult{}, s.wrap("delete user", err)
	}
	switch {
	case !owned:
		return DeleteUserResult{}, s.wrap("delete user", wrongShard(partition))
	case !deleted.Valid:
		return DeleteUserResult{}, s.wrap("delete user", refused(ctx, c, expected, before, true, userVersionSQL, partition, userID))
	}
	return DeleteUserResult{Sessions: nSess, Items: nItems, SessionHashes: hashes}, nil
}
