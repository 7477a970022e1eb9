package shards

import (
	"context"
	"fmt"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Item is one document of a user: (collection, key) → JSON value.
type Item struct {
	UserID     string
	Collection string
	Key        string
	Partition  int32
	Value      []byte // JSON as stored: jsonb normalizes whitespace and key order
	Version    int64
	CreatedAt  time.Time
	UpdatedAt  time.Time
}

// Item writes use collection || '/' || key as the outbox key and the value
// as the payload. Three statements for PutItem, one per kind of expectation;
// see versions.go for the columns they return, plus a second column saying
// whether the user exists. Items belong to an existing user: FOR KEY SHARE
// on the user's row keeps a concurrent DeleteUser from leaving them behind.
// An item created again after a delete continues after the delete's version
// (kept in item_tombstones) or, once that tombstone was pruned, above the
// partition's version floor.

// putItemAnySQL creates the item or replaces its value, whatever its version.
const putItemAnySQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), usr AS (
    SELECT 1 FROM users AS u, own
    WHERE u.partition = $1 AND u.user_id = $2
    FOR KEY SHARE OF u
), up AS (
    INSERT INTO items AS i (partition, user_id, collection, key, value, version)
    SELECT $1, $2::text, $3::text, $4::text, $5::jsonb, greatest((SELECT version FROM item_tombstones
        WHERE partition = $1 AND user_id = $2 AND collection = $3 AND key = $4),
        (SELECT version_floor FROM outbox_clock WHERE partition = $1), 0) + 1 FROM usr
    ON CONFLICT (partition, user_id, collection, key) DO UPDATE
        SET value = EXCLUDED.value, version = i.version + 1, updated_at = now()
    RETURNING i.version, i.value
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, $2::text, 'item', $3::text || '/' || $4::text, 'upsert', version, value FROM up
)
SELECT EXISTS (SELECT 1 FROM own), EXISTS (SELECT 1 FROM usr), (SELECT version FROM up), NULL::bigint`

// putItemCreateSQL creates the item only if it does not exist.
const putItemCreateSQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), usr AS (
    SELECT 1 FROM users AS u, own
    WHERE u.partition = $1 AND u.user_id = $2
    FOR KEY SHARE OF u
), up AS (
    INSERT INTO items (partition, user_id, collection, key, value, version)
    SELECT $1, $2::text, $3::text, $4::text, $5::jsonb, greatest((SELECT version FROM item_tombstones
        WHERE partition = $1 AND user_id = $2 AND collection = $3 AND key = $4),
        (SELECT version_floor FROM outbox_clock WHERE partition = $1), 0) + 1 FROM usr
    ON CONFLICT (partition, user_id, collection, key) DO NOTHING
    RETURNING version, value
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, $2::text, 'item', $3::text || '/' || $4::text, 'upsert', version, value FROM up
)
SELECT EXISTS (SELECT 1 FROM own), EXISTS (SELECT 1 FROM usr), (SELECT version FROM up),
       (SELECT version FROM items
        WHERE partition = $1 AND user_id = $2 AND collection = $3 AND key = $4)`

// putItemUpdateSQL replaces the value only if the item is at version $6.
const putItemUpdateSQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), usr AS (
    SELECT 1 FROM users AS u, own
    WHERE u.partition = $1 AND u.user_id = $2
    FOR KEY SHARE OF u
), up AS (
    UPDATE items AS i
    SET value = $5::jsonb, version = i.version + 1, updated_at = now()
    FROM usr
    WHERE i.partition = $1 AND i.user_id = $2 AND i.collection = $3 AND i.key = $4
      AND i.version = $6
    RETURNING i.version, i.value
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, $2::text, 'item', $3::text || '/' || $4::text, 'upsert', version, value FROM up
)
SELECT EXISTS (SELECT 1 FROM own), EXISTS (SELECT 1 FROM usr), (SELECT version FROM up),
       (SELECT version FROM items
        WHERE partition = $1 AND user_id = $2 AND collection = $3 AND key = $4)`

const itemVersionSQL = `
SELECT version FROM items
WHERE partition = $1 AND user_id = $2 AND collection = $3 AND key = $4`

// PutItem writes the item's value (JSON) and returns the new version, with
// the same expected semantics as PutUser: nil writes unconditionally, 0
// creates only, N > 0 updates only at version N; a mismatch writes nothing
// and returns a *versioning.ConflictError. ErrWrongShard if the partition is not owned.
// ErrUserNotFound, with nothing written, if the user does not exist. The
// change and its outbox event commit together.
func (s *Shard) PutItem(ctx context.Context, partition int32, userID, collection, key string, value []byte, expected *int64) (version int64, err error) {
	if err := checkExpected(expected); err != nil {
		return 0, s.wrap("put item", err)
	}
	var (
		owned, userExists bool
		written, before   pgtype.Int8
		sql               string
		args              []any
	)
	switch {
	case expected == nil:
		sql, args = putItemAnySQL, []any{partition, userID, collection, key, value}
	case *expected == 0:
		sql, args = putItemCreateSQL, []any{partition, userID, collection, key, value}
	default:
		sql, args = putItemUpdateSQL, []any{partition, userID, collection, key, value, *expected}
	}
	err = s.write(ctx, partition, sql, args, func(row pgx.Row) error {
		return row.Scan(&owned, &userExists, &written, &before)
	})
	if err != nil {
		return 0, s.wrap("put item", err)
	}
	switch {
	case !owned:
		return 0, s.wrap("put item", wrongShard(partition))
	case !userExists:
		return 0, s.wrap("put item", ErrUserNotFound)
	case !written.Valid:
		return 0, s.wrap("put item", refused(ctx, s.pool, expected, before, false, itemVersionSQL, partition, userID, collection, key))
	}
	return written.Int64, nil
}

const getItemSQL = `
SELECT o.state, i.value, i.version, i.created_at, i.updated_at
FROM ownership AS o
LEFT JOIN items AS i
    ON i.partition = o.partition AND i.user_id = $2 AND i.collection = $3 AND i.key = $4
WHERE o.partition = $1`

// getItemsSQL is getItemSQL for many keys at once, like getUsersSQL.
const getItemsSQL = `
SELECT q.i, o.state, it.value, it.version, it.created_at, it.updated_at
FROM unnest($1::integer[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS q(partition, user_id, collection, key, i)
LEFT JOIN LATERAL (SELECT state FROM ownership WHERE partition = q.partition) AS o ON true
LEFT JOIN LATERAL (
    SELECT value, version, created_at, updated_at FROM items
    WHERE partition = q.partition AND user_id = q.user_id AND collection = q.collection AND key = q.key
) AS it ON true`

// GetItem returns the item. versioning.ErrNotFound if it does not exist; ErrWrongShard
// unless the partition is owned or frozen. Concurrent calls may be answered
// by one statement (readbatch.go).
func (s *Shard) GetItem(ctx context.Context, partition int32, userID, collection, key string) (Item, error) {
	k := itemKey{partition, userID, collection, key}
	if s != nil && s.items != nil {
		return s.items.read(ctx, k)
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return Item{}, s.wrap("get item", err)
	}
	defer c.Release()
	r := &pendingRead[itemKey, Item]{key: k}
	if err := s.getItem(ctx, c, r); err != nil {
		return Item{}, s.wrap("get item", err)
	}
	return r.res, r.err
}

// itemKey addresses an item for a point read.
type itemKey struct {
	partition               int32
	userID, collection, key string
}

// getItem answers one item read with getItemSQL.
func (s *Shard) getItem(ctx context.Context, c *pgxpool.Conn, r *pendingRead[itemKey, Item]) error {
	var (
		state            string
		k                = r.key
		it               = Item{UserID: k.userID, Collection: k.collection, Key: k.key, Partition: k.partition}
		version          pgtype.Int8
		created, updated pgtype.Timestamptz
	)
	err := c.QueryRow(ctx, getItemSQL, k.partition, k.userID, k.collection, k.key).
		Scan(&state, &it.Value, &version, &created, &updated)
	if r.err = s.fencedRead("get item", k.partition, err, state, version.Valid); r.err == nil {
		it.Version, it.CreatedAt, it.UpdatedAt = version.Int64, created.Time, updated.Time
		r.res = it
	}
	return nil
}

// getItems answers a batch of item reads with getItemsSQL.
func (s *Shard) getItems(ctx context.Context, c *pgxpool.Conn, batch []*pendingRead[itemKey, Item]) error {
	parts := make([]int32, len(batch))
	users, colls, keys := make([]string, len(batch)), make([]string, len(batch)), make([]string, len(batch))
	for i, r := range batch {
		parts[i], users[i], colls[i], keys[i] = r.key.partition, r.key.userID, r.key.collection, r.key.key
	}
	rows, err := c.Query(ctx, getItemsSQL, parts, users, colls, keys)
	if err != nil {
		return err
	}
	var (
		i                int64
		state            pgtype.Text
		value            []byte
		version          pgtype.Int8
		created, updated pgtype.Timestamptz
	)
	return answerRows(rows, len(batch), []any{&i, &state, &value, &version, &created, &updated}, func(k int) {
		r, key := batch[k], batch[k].key
		if r.err = s.fencedRead("get item", key.partition, noOwnerRow(state), state.String, version.Valid); r.err == nil {
			r.res = Item{UserID: key.userID, Collection: key.collection, Key: key.key, Partition: key.partition,
				Value: value, Version: version.Int64, CreatedAt: created.Time, UpdatedAt: updated.Time}
		}
	})
}

// deleteItemSQL deletes the item if $5 is NULL or its version.
const deleteItemSQL = `
WITH own AS (
    SELECT 1 FROM ownership WHERE partition = $1 AND state = 'owned' FOR SHARE
), del AS (
    DELETE FROM items AS i USING own
    WHERE i.partition = $1 AND i.user_id = $2 AND i.collection = $3 AND i.key = $4
      AND ($5::bigint IS NULL OR i.version = $5)
    RETURNING i.version
), tomb AS (
    INSERT INTO item_tombstones AS t (partition, user_id, collection, key, version)
    SELECT $1, $2::text, $3::text, $4::text, version + 1 FROM del
    ON CONFLICT (partition, user_id, collection, key) DO UPDATE
        SET version = greatest(t.version, EXCLUDED.version), deleted_at = now()
), ev AS (
    INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
    SELECT $1, $2::text, 'item', $3::text || '/' || $4::text, 'delete', version + 1, NULL::jsonb FROM del
)
SELECT EXISTS (SELECT 1 FROM own), (SELECT version FROM del),
       (SELECT version FROM items
        WHERE partition = $1 AND user_id = $2 AND collection = $3 AND key = $4)`

// DeleteItem deletes the item, with DeleteUser's expected semantics: nil
// deletes whatever the version; N > 0 deletes only at version N (else a
// *versioning.ConflictError, Current 0 if missing); 0 never deletes (a *versioning.ConflictError
// if the item exists). versioning.ErrNotFound if there is no item (and expected is nil
// or 0); ErrWrongShard if the partition is not owned.
func (s *Shard) DeleteItem(ctx context.Context, partition int32, userID, collection, key string, expected *int64) error {
	if err := checkExpected(expected); err != nil {
		return s.wrap("delete item", err)
	}
	var (
		owned           bool
		deleted, before pgtype.Int8
	)
	err := s.writeAlone(ctx, deleteItemSQL, []any{partition, userID, collection, key, expected}, func(row pgx.Row) error {
		return row.Scan(&owned, &deleted, &before)
	})
	switch {
	case err != nil:
		return s.wrap("delete item", err)
	case !owned:
		return s.wrap("delete item", wrongShard(partition))
	case !deleted.Valid:
		return s.wrap("delete item", refused(ctx, s.pool, expected, before, true, itemVersionSQL, partition, userID, collection, key))
	}
	return nil
}

// The list statements scan the primary key from key >= $4 (skipping a key
// equal to $5, which makes the bound exclusive) and, in the first, up to
// key < $6, so a prefix never scans past its own range even under a generic
// plan (which cannot derive index bounds from starts_with on a parameter).
// starts_with states the filter itself. One row per item, or a single row
// of NULLs when there are none, so the ownership state comes back either way.
const (
	listItemsRangeSQL = `
SELECT o.state, i.key, i.value, i.version, i.created_at, i.updated_at
FROM ownership AS o
LEFT JOIN LATERAL (
    SELECT key, value, version, created_at, updated_at
    FROM items
    WHERE partition = o.partition AND user_id = $2 AND collection = $3
      AND key >= $4::text AND key IS DISTINCT FROM $5::text AND key < $6::text
      AND starts_with(key, $7::text)
    ORDER BY key
    LIMIT $8
) AS i ON true
WHERE o.partition = $1
ORDER BY i.key`

	listItemsOpenSQL = `
SELECT o.state, i.key, i.value, i.version, i.created_at, i.updated_at
FROM ownership AS o
LEFT JOIN LATERAL (
    SELECT key, value, version, created_at, updated_at
    FROM items
    WHERE partition = o.partition AND user_id = $2 AND collection = $3
      AND key >= $4::text AND key IS DISTINCT FROM $5::text
      AND starts_with(key, $6::text)
    ORDER BY key
    LIMIT $7
) AS i ON true
WHERE o.partition = $1
ORDER BY i.key`
)

// ListItems returns up to limit items of the user's collection whose key
// starts with prefix (taken literally) and, unless after is "", sorts after
// after — in byte order, the column's collation. For the next page, pass the
// last key returned as after. ErrWrongShard unless the partition is owned or
// frozen.
func (s *Shard) ListItems(ctx context.Context, partition int32, userID, collection, prefix, after string, limit int) ([]Item, error) {
	if limit <= 0 {
		return nil, s.wrap("list items", fmt.Errorf("limit %d is not positive", limit))
	}
	// The range starts at prefix, or just after after if that is later.
	lo, skip := prefix, (*string)(nil)
	if after != "" && after >= prefix {
		lo, skip = after, &after
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return nil, s.wrap("list items", err)
	}
	defer c.Release()
	var rows pgx.Rows
	if hi, ok := prefixEnd(prefix); ok {
		rows, err = c.Query(ctx, listItemsRangeSQL, partition, userID, collection, lo, skip, hi, prefix, limit)
	} else {
		rows, err = c.Query(ctx, listItemsOpenSQL, partition, userID, collection, lo, skip, prefix, limit)
	}
	if err != nil {
		return nil, s.wrap("list items", err)
	}
	defer rows.Close()
	var (
		out              []Item
		state            string
		seen             bool
		key              pgtype.Text
		version          pgtype.Int8
		created, updated pgtype.Timestamptz
	)
	for rows.Next() {
		seen = true
		it := Item{UserID: userID, Collection: collection, Partition: partition}
		if err := rows.Scan(&state, &key, &it.Value, &version, &created, &updated); err != nil {
			return nil, s.wrap("list items", err)
		}
		if !readable(state) {
			return nil, s.wrap("list items", wrongShard(partition))
		}
		if !version.Valid {
			continue // no item matched
		}
		it.Key, it.Version, it.CreatedAt, it.UpdatedAt = key.String, version.Int64, created.Time, updated.Time
		out = append(out, it)
	}
	if err := rows.Err(); err != nil {
		return nil, s.wrap("list items", err)
	}
	if !seen {
		return nil, s.wrap("list items", wrongShard(partition))
	}
	return out, nil
}

// prefixEnd returns an exclusive upper bound, in byte order, for the strings
// that start with prefix: prefix with its last incrementable rune
// incremented and what follows it dropped. UTF-8 orders bytes as it orders
// runes, so the bound is valid text. It reports false when there is no
// bound: for "" (everything matches) and for a prefix of U+10FFFF runes
// (nothing sorts after its matches). Invalid UTF-8 gets no bound either;
// Postgres rejects it as text anyway.
func prefixEnd(prefix string) (string, bool) {
	for prefix != "" {
		r, size := utf8.DecodeLastRuneInString(prefix)
		prefix = prefix[:len(prefix)-size]
		switch {
		case r == utf8.RuneError && size == 1:
			return "", false
		case r == unicode.MaxRune:
			continue
		case r == 0xD7FF: // the next rune, U+D800, is a surrogate
			return prefix + "\uE000", true
		default:
			return prefix + string(r+1), true
		}
	}
	return "", false
}
