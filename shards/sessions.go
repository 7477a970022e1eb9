package shards

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/shardgate/shardgate/internal/versioning"
)

// MaxListSessions caps one ListSessions query.
const MaxListSessions = 10000

// SessionKey is where a ListSessions page starts: sessions come in
// (CreatedAt, TokenHash) order, and a page holds those after the key. The
// zero key starts at the beginning.
type SessionKey struct {
	CreatedAt time.Time
	TokenHash []byte
}

// Session is a session's row. Only live sessions (ExpiresAt in the future)
// are ever returned.
type Session struct {
	TokenHash []byte // SHA-256 of the token; the token itself is never stored
	UserID    string
	Partition int32
	Data      []byte // JSON as stored
	CreatedAt time.Time
	ExpiresAt time.Time
	Version   int64
}

// Session writes put NULL in the outbox payload: session data may be secret.
// The outbox key is the lowercase hex of the token hash.

// createSessionSQL inserts the session only if the user exists; FOR KEY
// SHARE keeps the user from being deleted until this commits (DeleteUser).
const createSessionSQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), usr AS (
    SELECT 1 FROM users AS u, own
    WHERE u.partition = $1 AND u.user_id = $2
    FOR KEY SHARE OF u
), ins AS (
    INSERT INTO sessions (partition, token_hash, user_id, data, expires_at, version)
    SELECT $1, $3::bytea, $2::text, $4::jsonb, now() + make_interval(secs => $5::float8), 1 FROM usr
    RETURNING data, created_at, expires_at, version
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, $2::text, 'session', encode($3::bytea, 'hex'), 'upsert', version, NULL::jsonb FROM ins
)
SELECT EXISTS (SELECT 1 FROM own), ins.data, ins.created_at, ins.expires_at, ins.version
FROM (VALUES (1)) AS one (x) LEFT JOIN ins ON true`

// CreateSession stores a session for the user, live for ttl from now (the
// database's clock), at version 1. tokenHash must be a SHA-256 (32 bytes)
// and ttl positive. ErrUserNotFound, with nothing written, if the user does
// not exist in the partition; ErrWrongShard if the partition is not owned.
func (s *Shard) CreateSession(ctx context.Context, partition int32, userID string, tokenHash, data []byte, ttl time.Duration) (Session, error) {
	if len(tokenHash) != sha256.Size {
		return Session{}, s.wrap("create session", fmt.Errorf("token hash is %d bytes, want %d", len(tokenHash), sha256.Size))
	}
	if ttl <= 0 {
		return Session{}, s.wrap("create session", fmt.Errorf("ttl %v is not positive", ttl))
	}
	var (
		owned            bool
		version          pgtype.Int8
		created, expires pgtype.Timestamptz
		sess             = Session{TokenHash: bytes.Clone(tokenHash), UserID: userID, Partition: partition}
	)
	err := s.write(ctx, partition, createSessionSQL, []any{partition, userID, tokenHash, data, ttl.Seconds()}, func(row pgx.Row) error {
		return row.Scan(&owned, &sess.Data, &created, &expires, &version)
	})
	switch {
	case err != nil:
		return Session{}, s.wrap("create session", err)
	case !owned:
		return Session{}, s.wrap("create session", wrongShard(partition))
	case !version.Valid:
		return Session{}, s.wrap("create session", ErrUserNotFound)
	}
	sess.CreatedAt, sess.ExpiresAt, sess.Version = created.Time, expires.Time, version.Int64
	return sess, nil
}

const getSessionSQL = `
SELECT o.state, s.user_id, s.data, s.created_at, s.expires_at, s.version
FROM ownership AS o
LEFT JOIN sessions AS s
    ON s.partition = o.partition AND s.token_hash = $2 AND s.expires_at > now()
WHERE o.partition = $1`

// GetSession returns the live session with this token hash. versioning.ErrNotFound if
// there is none or it has expired; ErrWrongShard unless the partition is
// owned or frozen.
func (s *Shard) GetSession(ctx context.Context, partition int32, tokenHash []byte) (Session, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return Session{}, s.wrap("get session", err)
	}
	defer c.Release()
	var (
		state            string
		userID           pgtype.Text
		version          pgtype.Int8
		created, expires pgtype.Timestamptz
		sess             = Session{TokenHash: bytes.Clone(tokenHash), Partition: partition}
	)
	err = c.QueryRow(ctx, getSessionSQL, partition, tokenHash).
		Scan(&state, &userID, &sess.Data, &created, &expires, &version)
	if err := s.fencedRead("get session", partition, err, state, version.Valid); err != nil {
		return Session{}, err
	}
	sess.UserID, sess.CreatedAt, sess.ExpiresAt, sess.Version = userID.String, created.Time, expires.Time, version.Int64
	return sess, nil
}

const touchSessionSQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), up AS (
    UPDATE sessions AS s
    SET expires_at = now() + make_interval(secs => $3::float8), version = s.version + 1
    FROM own
    WHERE s.partition = $1 AND s.token_hash = $2 AND s.expires_at > now()
    RETURNING s.user_id, s.data, s.created_at, s.expires_at, s.version
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, user_id, 'session', encode($2::bytea, 'hex'), 'upsert', version, NULL::jsonb FROM up
)
SELECT EXISTS (SELECT 1 FROM own), up.user_id, up.data, up.created_at, up.expires_at, up.version
FROM (VALUES (1)) AS one (x) LEFT JOIN up ON true`

// TouchSession makes a live session expire ttl from now (which may also
// shorten it) and bumps its version. versioning.ErrNotFound if the session is missing
// or expired; ErrWrongShard if the partition is not owned.
func (s *Shard) TouchSession(ctx context.Context, partition int32, tokenHash []byte, ttl time.Duration) (Session, error) {
	if ttl <= 0 {
		return Session{}, s.wrap("touch session", fmt.Errorf("ttl %v is not positive", ttl))
	}
	var (
		owned            bool
		userID           pgtype.Text
		version          pgtype.Int8
		created, expires pgtype.Timestamptz
		sess             = Session{TokenHash: bytes.Clone(tokenHash), Partition: partition}
	)
	err := s.writeAlone(ctx, touchSessionSQL, []any{partition, tokenHash, ttl.Seconds()}, func(row pgx.Row) error {
		return row.Scan(&owned, &userID, &sess.Data, &created, &expires, &version)
	})
	switch {
	case err != nil:
		return Session{}, s.wrap("touch session", err)
	case !owned:
		return Session{}, s.wrap("touch session", wrongShard(partition))
	case !version.Valid:
		return Session{}, s.wrap("touch session", versioning.ErrNotFound)
	}
	sess.UserID, sess.CreatedAt, sess.ExpiresAt, sess.Version = userID.String, created.Time, expires.Time, version.Int64
	return sess, nil
}

const revokeSessionSQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), del AS (
    DELETE FROM sessions AS s USING own
    WHERE s.partition = $1 AND s.token_hash = $2 AND s.expires_at > now()
    RETURNING s.user_id, s.version
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, user_id, 'session', encode($2::bytea, 'hex'), 'delete', version + 1, NULL::jsonb FROM del
)
SELECT EXISTS (SELECT 1 FROM own), EXISTS (SELECT 1 FROM del)`

// RevokeSession deletes a live session. versioning.ErrNotFound if it is missing or
// already expired (an expired row is left for SweepExpiredSessions);
// ErrWrongShard if the partition is not owned.
func (s *Shard) RevokeSession(ctx context.Context, partition int32, tokenHash []byte) error {
	var owned, deleted bool
	err := s.writeAlone(ctx, revokeSessionSQL, []any{partition, tokenHash}, func(row pgx.Row) error {
		return row.Scan(&owned, &deleted)
	})
	switch {
	case err != nil:
		return s.wrap("revoke session", err)
	case !owned:
		return s.wrap("revoke session", wrongShard(partition))
	case !deleted:
		return s.wrap("revoke session", versioning.ErrNotFound)
	}
	return nil
}

// One row per session, or a single row of NULLs when there are none, so the
// ownership state comes back either way.
const listSessionsSQL = `
SELECT o.state, s.token_hash, s.data, s.created_at, s.expires_at, s.version
FROM ownership AS o
LEFT JOIN LATERAL (
    SELECT token_hash, data, created_at, expires_at, version
    FROM sessions
    WHERE partition = o.partition AND user_id = $2 AND expires_at > now()
      AND ($4::timestamptz IS NULL OR (created_at, token_hash) > ($4, $5::bytea))
    ORDER BY created_at, token_hash
    LIMIT $3
) AS s ON true
WHERE o.partition = $1
ORDER BY s.created_at, s.token_hash`

// ListSessions returns up to limit (at most MaxListSessions) of the user's
// live sessions after key, oldest first (ties by token hash).
// ErrWrongShard unless the partition is owned or frozen.
func (s *Shard) ListSessions(ctx context.Context, partition int32, userID string, after SessionKey, limit int) ([]Session, error) {
	if limit <= 0 || limit > MaxListSessions {
		return nil, s.wrap("list sessions", fmt.Errorf("limit %d outside 1..%d", limit, MaxListSessions))
	}
	var afterTime *time.Time
	if !after.CreatedAt.IsZero() {
		afterTime = &after.CreatedAt
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return nil, s.wrap("list sessions", err)
	}
	defer c.Release()
	rows, err := c.Query(ctx, listSessionsSQL, partition, userID, limit, afterTime, after.TokenHash)
	if err != nil {
		return nil, s.wrap("list sessions", err)
	}
	defer rows.Close()
	var (
		out              []Session
		state            string
		seen             bool
		version          pgtype.Int8
		created, expires pgtype.Timestamptz
	)
	for rows.Next() {
		seen = true
		sess := Session{UserID: userID, Partition: partition}
		if err := rows.Scan(&state, &sess.TokenHash, &sess.Data, &created, &expires, &version); err != nil {
			return nil, s.wrap("list sessions", err)
		}
		if !readable(state) {
			return nil, s.wrap("list sessions", wrongShard(partition))
		}
		if !version.Valid {
			continue // the user has no live session
		}
		sess.CreatedAt, sess.ExpiresAt, sess.Version = created.Time, expires.Time, version.Int64
		out = append(out, sess)
	}
	if err := rows.Err(); err != nil {
		return nil, s.wrap("list sessions", err)
	}
	if !seen {
		return nil, s.wrap("list sessions", wrongShard(partition))
	}
	return out, nil
}
