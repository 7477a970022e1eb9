package shards

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A partition move, as one shard sees it. The source publishes the moving
// partitions' rows (row-filtered logical replication), exports a snapshot
// for the bulk copy, and later freezes, marks moved and deletes them; the
// target receives the copy, subscribes to the changes after it, and owns
// the partitions once the cutover is done. The package mover decides when;
// this file is how, in SQL.

var (
	// ErrNotOwned means a freeze found a partition the shard does not own.
	ErrNotOwned = errors.New("partition is not owned by this shard")
	// ErrNotFrozen means a partition expected to be frozen is not: a
	// freeze was undone (budget exceeded, or another executor) and writes
	// may have happened since, so the cutover must start again.
	ErrNotFrozen = errors.New("partition is not frozen")
	// ErrLockTimeout means a freeze could not lock the partitions within
	// its lock timeout: writes held them. Nothing was frozen.
	ErrLockTimeout = errors.New("the partitions' writers did not let go within the lock timeout")
	// ErrStillServed means a delete of a partition's rows found the shard
	// still serving it (owned or frozen); nothing was deleted.
	ErrStillServed = errors.New("partition is still served by this shard")
)

// moveTables hold every row of a partition, copied in this order. The
// outbox's seq is left out: the target numbers its own (see shard
// migration 00008). The outbox carries its retained tail and
// outbox_delivered the relay's delivered tick, so the target's relay
// neither publishes the tail again nor loses it.
var moveTables = []string{"outbox_clock", "outbox_delivered", "users", "sessions", "items", "user_tombstones", "item_tombstones", "outbox"}

// verifyTables are checksummed to verify a move: every moved table but the
// outbox and its delivered ticks, which both shards' relays publish (and
// prune) while the move runs.
var verifyTables = []string{"outbox_clock", "users", "sessions", "items", "user_tombstones", "item_tombstones"}

// MoveObjectName names the publication, replication slot and subscription
// of one move: the cluster's prefix (slots are server-wide, so clusters
// sharing a PostgreSQL server need their own) and the move's ID.
func MoveObjectName(prefix string, moveID int64) string {
	return prefix + "_move_" + strconv.FormatInt(moveID, 10)
}

// ParseMoveObjectName returns the move ID of a name MoveObjectName made with
// prefix.
func ParseMoveObjectName(prefix, name string) (int64, bool) {
	rest, ok := strings.CutPrefix(name, prefix+"_move_")
	if !ok {
		return 0, false
	}
	id, err := strconv.ParseInt(rest, 10, 64)
	return id, err == nil && id > 0 && strconv.FormatInt(id, 10) == rest
}

// partitionArray renders partitions as an SQL array literal. Publication
// row filters and COPY take no parameters; the values are integers, so the
// literal cannot carry anything else.
func partitionArray(partitions []int32) string {
	var b strings.Builder
	b.WriteString("'{")
	for i, p := range partitions {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(int64(p), 10))
	}
	b.WriteString("}'::integer[]")
	return b.String()
}

func checkPartitions(partitions []int32) error {
	if len(partitions) == 0 {
		return errors.New("no partitions")
	}
	for _, p := range partitions {
		if p < 0 {
			return fmt.Errorf("invalid partition %d", p)
		}
	}
	return nil
}

// copyColumns lists a table's columns as the copy and the publication carry
// them: every column but identity ones (the outbox's seq).
const copyColumnsSQL = `
SELECT array_agg(quote_ident(attname) ORDER BY attnum) FROM pg_attribute
WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped AND attidentity = ''`

func copyColumns(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, table string) (string, error) {
	var cols []string
	if err := q.QueryRow(ctx, copyColumnsSQL, table).Scan(&cols); err != nil {
		return "", fmt.Errorf("columns of %s: %w", table, err)
	}
	return strings.Join(cols, ", "), nil
}

// CreateMovePublication publishes the rows of partitions (every moved
// table, filtered on partition) and the move's markers, under name. A
// publication of that name left by an earlier attempt is replaced.
func (s *Shard) CreateMovePublication(ctx context.Context, name string, moveID int64, partitions []int32) error {
	if err := checkPartitions(partitions); err != nil {
		return s.wrap("create publication", err)
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return s.wrap("create publication", err)
	}
	defer c.Release()
	err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		filter := "WHERE (partition = ANY (" + partitionArray(partitions) + "))"
		tables := make([]string, 0, len(moveTables)+1)
		for _, t := range moveTables {
			cols, err := copyColumns(ctx, tx, t)
			if err != nil {
				return err
			}
			tables = append(tables, t+" ("+cols+") "+filter)
		}
		tables = append(tables, "move_markers WHERE (move_id = "+strconv.FormatInt(moveID, 10)+")")
		// Every moving partition gets its delivered row before the copy's
		// snapshot, so the copy carries it and the source only ever
		// updates it: an insert replicated onto the row the target's relay
		// made meanwhile would stop the subscription on a conflict.
		if _, err := tx.Exec(ctx, `INSERT INTO outbox_delivered (partition, tick)
			SELECT unnest($1::integer[]), 0 ON CONFLICT (partition) DO NOTHING`, partitions); err != nil {
			return err
		}
		ident := pgx.Identifier{name}.Sanitize()
		if _, err := tx.Exec(ctx, "DROP PUBLICATION IF EXISTS "+ident); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "CREATE PUBLICATION "+ident+" FOR TABLE "+strings.Join(tables, ", ")+
			" WITH (publish = 'insert, update, delete')")
		return err
	})
	if err != nil {
		return s.wrap("create publication", err)
	}
	return nil
}

// DropMovePublication drops the publication if it exists.
func (s *Shard) DropMovePublication(ctx context.Context, name string) error {
	if _, err := s.exec(ctx, "DROP PUBLICATION IF EXISTS "+pgx.Identifier{name}.Sanitize()); err != nil {
		return s.wrap("drop publication", err)
	}
	return nil
}

// exec runs one statement on a pooled connection.
func (s *Shard) exec(ctx context.Context, sql string, args ...any) (int64, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return 0, err
	}
	defer c.Release()
	tag, err := c.Exec(ctx, sql, args...)
	return tag.RowsAffected(), err
}

// SlotSnapshot is a new replication slot and the snapshot exported with
// it: the copy reads the partitions as of the slot's consistent point,
// and a subscription on the slot streams every change after it. The
// snapshot can be used only while the SlotSnapshot is open.
type SlotSnapshot struct {
	Slot     string
	Snapshot string // for SET TRANSACTION SNAPSHOT
	LSN      string // the consistent point
	conn     *pgx.Conn
}

// Close ends the replication connection; the slot stays.
func (ss *SlotSnapshot) Close() {
	if ss != nil && ss.conn != nil {
		ss.conn.Close(context.Background())
	}
}

// StartMoveSlot creates the logical replication slot name (pgoutput),
// exporting a snapshot taken at its consistent point. A slot of that name
// left by an earlier attempt is dropped first. Creating a slot waits for
// the transactions running on the shard to finish.
func (s *Shard) StartMoveSlot(ctx context.Context, name string) (*SlotSnapshot, error) {
	if err := s.DropMoveSlot(ctx, name); err != nil {
		return nil, err
	}
	if s == nil || s.pool == nil {
		return nil, s.wrap("create slot", &unavailableError{err: errNotOpen})
	}
	cfg := s.pool.Config().ConnConfig.Copy()
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["application_name"] = "shardgate-mover"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, s.wrap("create slot", &unavailableError{err: err})
	}
	// The replication protocol's command, not SQL: only it exports a
	// snapshot that matches the slot's start.
	res := conn.PgConn().Exec(ctx, "CREATE_REPLICATION_SLOT "+pgx.Identifier{name}.Sanitize()+" LOGICAL pgoutput EXPORT_SNAPSHOT")
	rows, err := res.ReadAll()
	if err == nil && (len(rows) != 1 || len(rows[0].Rows) != 1 || len(rows[0].Rows[0]) < 3) {
		err = fmt.Errorf("unexpected reply %v", rows)
	}
	if err != nil {
		conn.Close(context.Background())
		return nil, s.wrap("create slot", err)
	}
	row := rows[0].Rows[0]
	return &SlotSnapshot{Slot: name, LSN: string(row[1]), Snapshot: string(row[2]), conn: conn}, nil
}

// DropMoveSlot drops the replication slot if it exists, ending a
// walsender still streaming from it (a subscription being dropped).
func (s *Shard) DropMoveSlot(ctx context.Context, name string) error {
	for attempt := 0; ; attempt++ {
		_, err := s.exec(ctx, `
			SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
			WHERE slot_name = $1 AND active_pid IS NOT NULL`, name)
		if err == nil {
			_, err = s.exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1`, name)
		}
		if err == nil {
			return nil
		}
		// 55006: the slot is still active (its walsender is exiting).
		if attempt >= 50 || !isCode(err, "55006") {
			return s.wrap("drop slot", err)
		}
		select {
		case <-ctx.Done():
			return s.wrap("drop slot", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// CopyProgress is told how many rows a copy has moved so far.
type CopyProgress func(rows int64)

// CopyPartitions copies every row of partitions from this shard, as of
// snap, to target, in one transaction on the target that fires no
// triggers (session_replication_role = replica: the rows keep their
// versions and ticks, as logical replication's apply does). Rows of those
// partitions already on the target fail the copy on their keys: clear it
// first (DeletePartitions). pace is called between chunks and may sleep to
// slow the copy down; progress is called as rows go by. It returns the
// rows copied.
func (s *Shard) CopyPartitions(ctx context.Context, snap *SlotSnapshot, partitions []int32, target *Shard, pace func(context.Context) error, progress CopyProgress) (int64, error) {
	if err := checkPartitions(partitions); err != nil {
		return 0, s.wrap("copy partitions", err)
	}
	src, err := s.acquire(ctx)
	if err != nil {
		return 0, s.wrap("copy partitions", err)
	}
	defer src.Release()
	dst, err := target.acquire(ctx)
	if err != nil {
		return 0, target.wrap("copy partitions", err)
	}
	defer dst.Release()

	srcTx, err := src.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return 0, s.wrap("copy partitions", err)
	}
	defer srcTx.Rollback(context.Background())
	if _, err := srcTx.Exec(ctx, "SET TRANSACTION SNAPSHOT '"+strings.ReplaceAll(snap.Snapshot, "'", "")+"'"); err != nil {
		return 0, s.wrap("copy partitions: import snapshot", err)
	}
	dstTx, err := dst.Begin(ctx)
	if err != nil {
		return 0, target.wrap("copy partitions", err)
	}
	defer dstTx.Rollback(context.Background())
	if _, err := dstTx.Exec(ctx, "SET LOCAL session_replication_role = replica"); err != nil {
		return 0, target.wrap("copy partitions (the mover needs a superuser on the target)", err)
	}

	counter := &rowCounter{ctx: ctx, pace: pace, progress: progress}
	for _, table := range moveTables {
		cols, err := copyColumns(ctx, srcTx, table)
		if err != nil {
			return counter.rows, s.wrap("copy partitions", err)
		}
		out := "COPY (SELECT " + cols + " FROM " + table + " WHERE partition = ANY (" + partitionArray(partitions) + ")) TO STDOUT"
		in := "COPY " + table + " (" + cols + ") FROM STDIN"
		if err := pipeCopy(ctx, srcTx, dstTx, out, in, counter); err != nil {
			return counter.rows, fmt.Errorf("shard %s → %s: copy %s: %w", s.Name(), target.Name(), table, err)
		}
	}
	if err := dstTx.Commit(ctx); err != nil {
		return counter.rows, target.wrap("copy partitions: commit", err)
	}
	counter.report()
	return counter.rows, nil
}

// rowCounter counts the rows of a text-format COPY stream (one newline per
// row: newlines inside values are escaped) and paces it.
type rowCounter struct {
	ctx      context.Context
	pace     func(context.Context) error
	progress CopyProgress
	rows     int64
	since    int64 // rows since the last pace and report
}

const paceEvery = 5000 // rows between calls to pace and progress

func (c *rowCounter) count(b []byte) error {
	for _, x := range b {
		if x == '\n' {
			c.rows++
			c.since++
		}
	}
	if c.since < paceEvery {
		return nil
	}
	c.since = 0
	c.report()
	if c.pace != nil {
		return c.pace(c.ctx)
	}
	return nil
}

func (c *rowCounter) report() {
	if c.progress != nil {
		c.progress(c.rows)
	}
}

// pipeCopy streams COPY out of one transaction into COPY in of the other.
func pipeCopy(ctx context.Context, from, to pgx.Tx, out, in string, counter *rowCounter) error {
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		_, err := from.Conn().PgConn().CopyTo(ctx, countingWriter{pw, counter}, out)
		pw.CloseWithError(err) // nil: EOF for the reader
		done <- err
	}()
	_, inErr := to.Conn().PgConn().CopyFrom(ctx, pr, in)
	pr.CloseWithError(errCopyInEnded) // unblocks the writer if COPY in ended first
	outErr := <-done
	switch {
	case inErr != nil:
		return fmt.Errorf("write: %w", inErr)
	case outErr != nil:
		return fmt.Errorf("read: %w", outErr)
	}
	return nil
}

var errCopyInEnded = errors.New("copy into the target ended")

// countingWriter passes COPY data on and counts its rows.
type countingWriter struct {
	w io.Writer
	c *rowCounter
}

func (cw countingWriter) Write(b []byte) (int, error) {
	n, err := cw.w.Write(b)
	if err != nil {
		return n, err
	}
	return n, cw.c.count(b)
}

// isCode reports whether err carries the SQLSTATE code.
func isCode(err error, code string) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == code
}

// randomToken returns 16 random bytes in hex, for markers.
func randomToken() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err)) // never fails on Linux
	}
	return hex.EncodeToString(b)
}

// CreateMoveSubscription subscribes this shard (the target) to the
// publication and slot name on the source, reachable at sourceConninfo
// (a libpq connection string the target's PostgreSQL server can use). It
// streams from the slot's consistent point: run it after CopyPartitions.
// An existing subscription of that name is kept. PostgreSQL 15 requires a
// superuser for it.
func (s *Shard) CreateMoveSubscription(ctx context.Context, name, sourceConninfo string) error {
	c, err := s.acquire(ctx)
	if err != nil {
		return s.wrap("create subscription", err)
	}
	defer c.Release()
	var exists bool
	if err := c.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_subscription
		WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()))`, name).Scan(&exists); err != nil {
		return s.wrap("create subscription", err)
	}
	if exists {
		return nil
	}
	var stmt string
	if err := c.QueryRow(ctx, `SELECT format('CREATE SUBSCRIPTION %I CONNECTION %L PUBLICATION %I
		WITH (create_slot = false, slot_name = %L, copy_data = false, enabled = true)', $1::text, $2::text, $1::text, $1::text)`,
		name, sourceConninfo).Scan(&stmt); err != nil {
		return s.wrap("create subscription", err)
	}
	if _, err := c.Exec(ctx, stmt); err != nil {
		return s.wrap("create subscription", redactConninfo(err, sourceConninfo))
	}
	return nil
}

// redactConninfo keeps a connection string out of an error's text.
func redactConninfo(err error, conninfo string) error {
	if conninfo != "" && strings.Contains(err.Error(), conninfo) {
		return errors.New(strings.ReplaceAll(err.Error(), conninfo, "(source connection string)"))
	}
	return err
}

// DropMoveSubscription drops the subscription if it exists. It reports
// whether the slot on the source went with it: when the source cannot be
// reached the subscription is detached from its slot and dropped anyway,
// and the caller must drop the slot on the source later (DropMoveSlot).
func (s *Shard) DropMoveSubscription(ctx context.Context, name string) (slotDropped bool, err error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return false, s.wrap("drop subscription", err)
	}
	defer c.Release()
	var exists bool
	if err := c.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_subscription
		WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()))`, name).Scan(&exists); err != nil {
		return false, s.wrap("drop subscription", err)
	}
	if !exists {
		return true, nil
	}
	ident := pgx.Identifier{name}.Sanitize()
	if _, err := c.Exec(ctx, "DROP SUBSCRIPTION "+ident); err == nil {
		return true, nil
	}
	// The source is unreachable (or refused to drop the slot): keep the
	// slot, lose the subscription.
	for _, stmt := range []string{
		"ALTER SUBSCRIPTION " + ident + " DISABLE",
		"ALTER SUBSCRIPTION " + ident + " SET (slot_name = NONE)",
		"DROP SUBSCRIPTION " + ident,
	} {
		if _, err := c.Exec(ctx, stmt); err != nil {
			return false, s.wrap("drop subscription", err)
		}
	}
	return false, nil
}

// MoveObjects are the replication objects of moves found on one shard.
type MoveObjects struct {
	Publications, Subscriptions, Slots []string
}

// ListMoveObjects lists the publications and subscriptions of this shard's
// database, and the replication slots of this database, whose names start
// with prefix + "_move_".
func (s *Shard) ListMoveObjects(ctx context.Context, prefix string) (MoveObjects, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return MoveObjects{}, s.wrap("list move objects", err)
	}
	defer c.Release()
	var mo MoveObjects
	like := strings.NewReplacer(`\`, `\\`, `_`, `\_`, `%`, `\%`).Replace(prefix+"_move_") + "%"
	err = c.QueryRow(ctx, `
		SELECT (SELECT coalesce(array_agg(pubname::text ORDER BY pubname), '{}') FROM pg_publication WHERE pubname LIKE $1),
		       (SELECT coalesce(array_agg(subname::text ORDER BY subname), '{}') FROM pg_subscription
		        WHERE subname LIKE $1 AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())),
		       (SELECT coalesce(array_agg(slot_name::text ORDER BY slot_name), '{}') FROM pg_replication_slots
		        WHERE slot_name LIKE $1 AND database = current_database())`, like).
		Scan(&mo.Publications, &mo.Subscriptions, &mo.Slots)
	if err != nil {
		return MoveObjects{}, s.wrap("list move objects", err)
	}
	return mo, nil
}

// SlotLag reports how many bytes of WAL the slot's consumer has yet to
// confirm, and whether a consumer is attached. ok is false without such a
// slot. The confirmation trails the apply by up to the subscriber's
// feedback interval, so this is coarse; markers are exact.
func (s *Shard) SlotLag(ctx context.Context, name string) (bytes int64, active, ok bool, err error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return 0, false, false, s.wrap("slot lag", err)
	}
	defer c.Release()
	err = c.QueryRow(ctx, `SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint, active
		FROM pg_replication_slots WHERE slot_name = $1`, name).Scan(&bytes, &active)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, false, false, nil
	}
	if err != nil {
		return 0, false, false, s.wrap("slot lag", err)
	}
	return bytes, active, true, nil
}

// SubscriptionHealth reports, on the target, whether the subscription's
// apply worker runs and how many apply errors it has met (a worker that
// fails keeps restarting; the error is in the target's log).
func (s *Shard) SubscriptionHealth(ctx context.Context, name string) (running bool, applyErrors int64, err error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return false, 0, s.wrap("subscription health", err)
	}
	defer c.Release()
	err = c.QueryRow(ctx, `
		SELECT EXISTS (SELECT 1 FROM pg_stat_subscription WHERE subname = $1 AND pid IS NOT NULL),
		       coalesce((SELECT apply_error_count FROM pg_stat_subscription_stats WHERE subname = $1), 0)`, name).
		Scan(&running, &applyErrors)
	if err != nil {
		return false, 0, s.wrap("subscription health", err)
	}
	return running, applyErrors, nil
}

// Freeze stops writes to partitions, which must all be owned (or already
// frozen): it waits, at most lockTimeout, for in-flight writes to commit;
// later writes get ErrWrongShard, reads go on. A partition in another
// state fails it with ErrNotOwned, freezing nothing. One round trip: the
// freeze's duration is a write pause.
func (s *Shard) Freeze(ctx context.Context, partitions []int32, lockTimeout string) error {
	if err := checkPartitions(partitions); err != nil {
		return s.wrap("freeze", err)
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return s.wrap("freeze", err)
	}
	defer c.Release()
	// A batch runs in one implicit transaction, so the local lock timeout
	// holds for the update, and a refused freeze rolls back whole.
	var b pgx.Batch
	b.Queue(`SELECT set_config('lock_timeout', $1, true)`, lockTimeout)
	b.Queue(`
		WITH rows AS (
		    SELECT partition FROM ownership WHERE partition = ANY($1) AND state IN ('owned', 'frozen') FOR UPDATE
		), ok AS (
		    SELECT count(*) = $2 AS complete FROM rows
		), f AS (
		    UPDATE ownership AS o SET state = 'frozen', updated_at = now()
		    FROM ok WHERE ok.complete AND o.partition = ANY($1) AND o.state = 'owned'
		    RETURNING 1
		)
		SELECT (SELECT complete FROM ok), (SELECT count(*) FROM rows), (SELECT count(*) FROM f)`, partitions, len(partitions))
	var (
		all        bool
		n, changed int
	)
	br := c.SendBatch(ctx, &b)
	_, err = br.Exec()
	if err == nil {
		err = br.QueryRow().Scan(&all, &n, &changed)
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	switch {
	case isCode(err, "55P03"): // lock_not_available
		return s.wrap("freeze", fmt.Errorf("%w: %w", ErrLockTimeout, err))
	case err != nil:
		return s.wrap("freeze", err)
	case !all:
		return s.wrap("freeze", fmt.Errorf("%w: %d of %d partitions are owned or frozen here", ErrNotOwned, n, len(partitions)))
	}
	return nil
}

// Unfreeze lets writes to frozen partitions in again and returns how many
// it unfroze. Partitions in other states are left as they are.
func (s *Shard) Unfreeze(ctx context.Context, partitions []int32) (int, error) {
	if err := checkPartitions(partitions); err != nil {
		return 0, s.wrap("unfreeze", err)
	}
	n, err := s.exec(ctx, `UPDATE ownership SET state = 'owned', updated_at = now() WHERE partition = ANY($1) AND state = 'frozen'`, partitions)
	if err != nil {
		return 0, s.wrap("unfreeze", err)
	}
	return int(n), nil
}

// MarkMoved gives partitions away: frozen → moved, after which the shard
// serves neither reads nor writes of them. Every partition must be frozen
// (or moved already); otherwise nothing changes and the error wraps
// ErrNotFrozen, since writes may have happened after the freeze. One
// statement: it runs inside a write pause.
func (s *Shard) MarkMoved(ctx context.Context, partitions []int32) error {
	if err := checkPartitions(partitions); err != nil {
		return s.wrap("mark moved", err)
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return s.wrap("mark moved", err)
	}
	defer c.Release()
	var (
		all  bool
		good int
	)
	err = c.QueryRow(ctx, `
		WITH rows AS (
		    SELECT partition, state FROM ownership WHERE partition = ANY($1) FOR UPDATE
		), ok AS (
		    SELECT count(*) FILTER (WHERE state IN ('frozen', 'moved')) AS good FROM rows
		), m AS (
		    UPDATE ownership AS o SET state = 'moved', updated_at = now()
		    FROM ok WHERE ok.good = $2 AND o.partition = ANY($1) AND o.state = 'frozen'
		    RETURNING 1
		)
		SELECT (SELECT good FROM ok) = $2, (SELECT good FROM ok) FROM (SELECT count(*) FROM m) AS done`,
		partitions, len(partitions)).Scan(&all, &good)
	if err != nil {
		return s.wrap("mark moved", err)
	}
	if !all {
		return s.wrap("mark moved", fmt.Errorf("%w: %d of %d partitions are frozen or moved", ErrNotFrozen, good, len(partitions)))
	}
	return nil
}

// OwnershipOf returns the state of each of partitions that the shard
// lists; a partition it does not list is absent from the map.
func (s *Shard) OwnershipOf(ctx context.Context, partitions []int32) (map[int32]OwnershipState, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return nil, s.wrap("ownership", err)
	}
	defer c.Release()
	rows, err := c.Query(ctx, `SELECT partition, state FROM ownership WHERE partition = ANY($1)`, partitions)
	if err != nil {
		return nil, s.wrap("ownership", err)
	}
	out := make(map[int32]OwnershipState, len(partitions))
	var (
		p  int32
		st string
	)
	_, err = pgx.ForEachRow(rows, []any{&p, &st}, func() error {
		out[p] = OwnershipState(st)
		return nil
	})
	if err != nil {
		return nil, s.wrap("ownership", err)
	}
	return out, nil
}

// WriteMarker writes a new marker of the move on this shard (the source)
// and returns its token.
func (s *Shard) WriteMarker(ctx context.Context, moveID int64) (string, error) {
	token := randomToken()
	c, err := s.acquire(ctx)
	if err != nil {
		return "", s.wrap("write marker", err)
	}
	defer c.Release()
	// A flushed commit: logical decoding sees WAL only once it is flushed,
	// and with synchronous_commit off a marker would wait for the WAL
	// writer (up to wal_writer_delay) before it could travel.
	err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SET LOCAL synchronous_commit = on`); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `INSERT INTO move_markers (move_id, token) VALUES ($1, $2)`, moveID, token)
		return err
	})
	if err != nil {
		return "", s.wrap("write marker", err)
	}
	return token, nil
}

// WaitForMarker polls this shard (the target) every poll until the move's
// marker token has arrived, or ctx ends (its error is returned).
func (s *Shard) WaitForMarker(ctx context.Context, moveID int64, token string, poll time.Duration) error {
	c, err := s.acquire(ctx)
	if err != nil {
		return s.wrap("wait for marker", err)
	}
	defer c.Release()
	for {
		var seen bool
		err := c.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM move_markers WHERE move_id = $1 AND token = $2)`, moveID, token).Scan(&seen)
		if err != nil {
			return s.wrap("wait for marker", err)
		}
		if seen {
			return nil
		}
		select {
		case <-ctx.Done():
			return s.wrap("wait for marker", ctx.Err())
		case <-time.After(poll):
		}
	}
}

// Checksum is one table's rows of one partition: how many, and the sum of
// a 64-bit hash of each row's text (order-independent), as a decimal.
type Checksum struct {
	Table     string
	Partition int32
	Rows      int64
	Sum       string
}

// Snapshot is a read-only, repeatable-read transaction: every read in it
// sees the shard as it was when BeginSnapshot returned.
type Snapshot struct {
	s    *Shard
	conn *pgxpool.Conn
	tx   pgx.Tx
}

// BeginSnapshot takes a snapshot of the shard. Close it when done: it holds
// a connection, and old row versions stay until it ends.
func (s *Shard) BeginSnapshot(ctx context.Context) (*Snapshot, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return nil, s.wrap("snapshot", err)
	}
	tx, err := c.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		c.Release()
		return nil, s.wrap("snapshot", err)
	}
	// Row text depends on these; both shards of a comparison set them alike.
	// The statement also takes the snapshot.
	if _, err := tx.Exec(ctx, `SELECT set_config('TimeZone', 'UTC', true), set_config('DateStyle', 'ISO, YMD', true)`); err != nil {
		tx.Rollback(context.Background())
		c.Release()
		return nil, s.wrap("snapshot", err)
	}
	return &Snapshot{s: s, conn: c, tx: tx}, nil
}

// Close ends the snapshot's transaction.
func (sn *Snapshot) Close() {
	if sn == nil || sn.tx == nil {
		return
	}
	sn.tx.Rollback(context.Background())
	sn.conn.Release()
	sn.tx = nil
}

// Checksums returns a Checksum per moved table (the outbox aside) and
// partition of partitions that holds rows, in table and partition order.
func (sn *Snapshot) Checksums(ctx context.Context, partitions []int32) ([]Checksum, error) {
	var out []Checksum
	for _, table := range verifyTables {
		rows, err := sn.tx.Query(ctx, `SELECT partition, count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text
			FROM `+table+` AS t WHERE partition = ANY($1) GROUP BY partition ORDER BY partition`, partitions)
		if err != nil {
			return nil, sn.s.wrap("checksum "+table, err)
		}
		ck := Checksum{Table: table}
		_, err = pgx.ForEachRow(rows, []any{&ck.Partition, &ck.Rows, &ck.Sum}, func() error {
			out = append(out, ck)
			return nil
		})
		if err != nil {
			return nil, sn.s.wrap("checksum "+table, err)
		}
	}
	return out, nil
}

// deleteChunk is how many rows one delete statement removes.
const deleteChunk = 5000

// DeletePartitions deletes every row of partitions from this shard, in
// chunks, along with their ownership rows (which must say moved, or be
// absent) and the move's markers: a source's copy after its move, or a
// target's partial copy after a failed one. If the shard owns or has
// frozen any of them, it deletes nothing and returns ErrStillServed. The
// partitions must not be published or subscribed to by a move at the
// time, or the deletes would travel. pace, if set, is called between
// chunks and may sleep to spare a busy shard. It returns the rows deleted.
func (s *Shard) DeletePartitions(ctx context.Context, partitions []int32, moveID int64, pace func(context.Context) error) (int64, error) {
	if err := checkPartitions(partitions); err != nil {
		return 0, s.wrap("delete partitions", err)
	}
	c, err := s.acquire(ctx)
	if err != nil {
		return 0, s.wrap("delete partitions", err)
	}
	defer c.Release()
	var total int64
	for _, table := range moveTables {
		for {
			var n int64
			err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				var served bool
				if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM ownership
					WHERE partition = ANY($1) AND state IN ('owned', 'frozen') FOR SHARE)`, partitions).Scan(&served); err != nil {
					return err
				}
				if served {
					return ErrStillServed
				}
				tag, err := tx.Exec(ctx, `DELETE FROM `+table+` WHERE ctid = ANY (ARRAY(
					SELECT ctid FROM `+table+` WHERE partition = ANY($1) LIMIT $2))`, partitions, deleteChunk)
				n = tag.RowsAffected()
				return err
			})
			if err != nil {
				return total, s.wrap("delete partitions", err)
			}
			total += n
			if n < deleteChunk {
				break
			}
			if pace != nil {
				if err := pace(ctx); err != nil {
					return total, s.wrap("delete partitions", err)
				}
			}
		}
	}
	if _, err := c.Exec(ctx, `DELETE FROM ownership WHERE partition = ANY($1) AND state = 'moved'`, partitions); err != nil {
		return total, s.wrap("delete partitions", err)
	}
	if _, err := c.Exec(ctx, `DELETE FROM move_markers WHERE move_id = $1`, moveID); err != nil {
		return total, s.wrap("delete partitions", err)
	}
	return total, nil
}

// DeleteMarkers deletes the move's markers (a target's, after the move).
func (s *Shard) DeleteMarkers(ctx context.Context, moveID int64) error {
	if _, err := s.exec(ctx, `DELETE FROM move_markers WHERE move_id = $1`, moveID); err != nil {
		return s.wrap("delete markers", err)
	}
	return nil
}

// Holdings is what a shard database holds: ownership rows and rows of
// the tables that move with partitions.
type Holdings struct {
	Partitions int64 // ownership rows, any state
	Rows       int64
}

// Empty reports whether the database holds nothing.
func (h Holdings) Empty() bool { return h.Partitions == 0 && h.Rows == 0 }

func (h Holdings) String() string {
	return fmt.Sprintf("%d ownership rows and %d data, tombstone and outbox rows", h.Partitions, h.Rows)
}

// Holdings counts what the shard holds.
func (s *Shard) Holdings(ctx context.Context) (Holdings, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return Holdings{}, s.wrap("holdings", err)
	}
	defer c.Release()
	var h Holdings
	q := `SELECT (SELECT count(*) FROM ownership), 0`
	for _, t := range moveTables {
		q += " + (SELECT count(*) FROM " + t + ")"
	}
	if err := c.QueryRow(ctx, q).Scan(&h.Partitions, &h.Rows); err != nil {
		return Holdings{}, s.wrap("holdings", err)
	}
	return h, nil
}

// PartitionSizes estimates what each partition the shard lists holds:
// rows (counted) and bytes (rows times each table's average row size).
func (s *Shard) PartitionSizes(ctx context.Context) (map[int32]Size, error) {
	c, err := s.acquire(ctx)
	if err != nil {
		return nil, s.wrap("partition sizes", err)
	}
	defer c.Release()
	out := map[int32]Size{}
	for _, t := range moveTables {
		rows, err := c.Query(ctx, `
			WITH w AS (
			    SELECT CASE WHEN reltuples > 0 THEN pg_total_relation_size(oid) / reltuples ELSE 100 END AS width
			    FROM pg_class WHERE oid = $1::regclass
			)
			SELECT partition, count(*), (count(*) * (SELECT width FROM w))::bigint FROM `+t+` GROUP BY partition`, t)
		if err != nil {
			return nil, s.wrap("partition sizes", err)
		}
		var (
			p    int32
			n, b int64
		)
		_, err = pgx.ForEachRow(rows, []any{&p, &n, &b}, func() error {
			sz := out[p]
			sz.Rows += n
			sz.Bytes += b
			out[p] = sz
			return nil
		})
		if err != nil {
			return nil, s.wrap("partition sizes", err)
		}
	}
	return out, nil
}

// Size is how much a partition holds.
type Size struct {
	Rows, Bytes int64
}

// ProbeLatency runs a trivial indexed read and returns how long the round
// trip took: the throttle's measure of how busy the shard is.
func (s *Shard) ProbeLatency(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	if _, err := s.exec(ctx, `SELECT 1 FROM ownership WHERE partition = 0`); err != nil {
		return 0, s.wrap("probe", err)
	}
	return time.Since(start), nil
}

// pgxOnlyParams are DSN parameters pgx understands and libpq does not.
var pgxOnlyParams = []string{"statement_cache_capacity", "description_cache_capacity", "default_query_exec_mode", "min_read_buffer_size"}

// Conninfo turns a shard DSN as Shardgate uses it into a connection string
// for a PostgreSQL server (libpq): a subscription on the target connects to
// the source with it. pgx's own parameters (pool_*, statement caches) are
// dropped; the rest is kept as written.
func Conninfo(dsn string) (string, error) {
	if _, err := pgconn.ParseConfig(dsn); err != nil {
		return "", errors.New("invalid DSN (parser details withheld: they may quote a password)")
	}
	drop := func(key string) bool {
		return strings.HasPrefix(key, "pool_") || slices.Contains(pgxOnlyParams, key)
	}
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		// Drop parameters from the query text itself: re-encoding the URL
		// could change what is left (an empty host loses its "//").
		base, query, ok := strings.Cut(dsn, "?")
		if !ok {
			return dsn, nil
		}
		var kept []string
		for _, param := range strings.Split(query, "&") {
			key, _, _ := strings.Cut(param, "=")
			if k, err := url.QueryUnescape(key); err == nil && drop(k) {
				continue
			}
			kept = append(kept, param)
		}
		if len(kept) == 0 {
			return base, nil
		}
		return base + "?" + strings.Join(kept, "&"), nil
	}
	// key=value form: values may be quoted; drop whole settings by key.
	var kept []string
	for _, kv := range splitConninfo(dsn) {
		if !drop(kv[0]) {
			kept = append(kept, kv[0]+"="+kv[1])
		}
	}
	return strings.Join(kept, " "), nil
}

// splitConninfo splits a key=value connection string into its settings,
// each [key, value as written] (a quoted value keeps its quotes and
// escapes). Whitespace may surround the '='. It assumes the string parsed.
func splitConninfo(s string) [][2]string {
	var out [][2]string
	i := 0
	skip := func() {
		for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r' || s[i] == '\f' || s[i] == '\v') {
			i++
		}
	}
	for {
		skip()
		if i >= len(s) {
			return out
		}
		start := i
		for i < len(s) && s[i] != '=' && s[i] != ' ' && s[i] != '\t' && s[i] != '\n' && s[i] != '\r' && s[i] != '\f' && s[i] != '\v' {
			i++
		}
		key := s[start:i]
		skip()
		if i < len(s) && s[i] == '=' {
			i++
		}
		skip()
		start = i
		if i < len(s) && s[i] == '\'' {
			i++
			for i < len(s) && s[i] != '\'' {
				if s[i] == '\\' {
					i++
				}
				i++
			}
			i++ // the closing quote
		} else {
			for i < len(s) && s[i] != ' ' && s[i] != '\t' && s[i] != '\n' && s[i] != '\r' && s[i] != '\f' && s[i] != '\v' {
				if s[i] == '\\' {
					i++
				}
				i++
			}
		}
		out = append(out, [2]string{key, s[start:min(i, len(s))]})
	}
}
