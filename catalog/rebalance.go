package catalog

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/shardgate/shardgate/internal/pglock"
)

// Errors of rebalance records.
var (
	// ErrRebalanceRunning means a rebalance is running already.
	ErrRebalanceRunning = errors.New("a rebalance is already running")
	// ErrNoRebalance means there is no (running) rebalance.
	ErrNoRebalance = errors.New("no rebalance")
	// ErrStalePlan means the topology changed after the plan was made.
	ErrStalePlan = errors.New("the topology changed since the plan was made; plan again")
	// ErrDeposed means another executor took over: this one's term ended.
	ErrDeposed = errors.New("the rebalancing executor lost its term to another")
	// ErrOwnerChanged means an owner flip found a partition owned by
	// neither the move's source nor its target.
	ErrOwnerChanged = errors.New("a partition's owner changed under the move")
)

// Rebalance states.
const (
	RebalanceRunning   = "running"
	RebalanceDone      = "done"
	RebalanceFailed    = "failed"
	RebalanceCancelled = "cancelled"
)

// Rebalance is one run of moves that takes the map to a new placement.
type Rebalance struct {
	ID              int64
	State           string
	CancelRequested bool
	MaxParallel     int
	FreezeBudget    time.Duration
	PlannedVersion  int64
	CreatedAt       time.Time
	FinishedAt      time.Time // zero while running
	Error           string
}

// MoveSpec is a planned move: a batch of partitions from one shard to
// another, with its estimated size.
type MoveSpec struct {
	Source, Target string
	Partitions     []int32
	Rows, Bytes    int64
}

// Move is a move's durable record: its state is what an executor resumes
// from after a crash.
type Move struct {
	ID, RebalanceID int64
	Source, Target  string
	Partitions      []int32
	State           string
	RowsTotal       int64
	BytesTotal      int64
	RowsCopied      int64
	Attempts        int
	Freezes         int
	LastFreeze      time.Duration
	MaxFreeze       time.Duration
	VerifiedRows    int64
	LastError       string
	CreatedAt       time.Time
	StartedAt       time.Time // zero until it starts
	UpdatedAt       time.Time
	FinishedAt      time.Time // zero until it ends
}

// StartRebalance records a rebalance and its planned moves, if the
// topology is still at plannedVersion (else ErrStalePlan) and no other
// rebalance runs (else ErrRebalanceRunning). An executor picks it up.
func (c *Catalog) StartRebalance(ctx context.Context, plannedVersion int64, maxParallel int, freezeBudget time.Duration, moves []MoveSpec) (int64, error) {
	var id int64
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		var v int64
		// FOR SHARE: a topology change waits for this plan's record, or
		// this waits for it and then sees the new version.
		if err := tx.QueryRow(ctx, `SELECT version FROM topology FOR SHARE`).Scan(&v); err != nil {
			return err
		}
		if v != plannedVersion {
			return ErrStalePlan
		}
		err := tx.QueryRow(ctx, `INSERT INTO rebalances (max_parallel, freeze_budget_ms, planned_version, state)
			VALUES ($1, $2, $3, CASE WHEN $4 THEN 'done' ELSE 'running' END) RETURNING id`,
			maxParallel, freezeBudget.Milliseconds(), plannedVersion, len(moves) == 0).Scan(&id)
		if err != nil {
			return err
		}
		rows := make([][]any, len(moves))
		for i, m := range moves {
			rows[i] = []any{id, m.Source, m.Target, m.Partitions, m.Rows, m.Bytes}
		}
		_, err = tx.CopyFrom(ctx, pgx.Identifier{"moves"},
			[]string{"rebalance_id", "source", "target", "partitions", "rows_total", "bytes_total"}, pgx.CopyFromRows(rows))
		return err
	})
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23505" {
		return 0, ErrRebalanceRunning
	}
	if err != nil {
		if errors.Is(err, ErrStalePlan) {
			return 0, err
		}
		return 0, fmt.Errorf("start rebalance: %w", err)
	}
	return id, nil
}

const rebalanceColumns = `id, state, cancel_requested, max_parallel, freeze_budget_ms, planned_version, created_at, finished_at, coalesce(error, '')`

func scanRebalance(row pgx.Row) (Rebalance, error) {
	var (
		r        Rebalance
		budgetMS int64
		finished pgtype.Timestamptz
	)
	err := row.Scan(&r.ID, &r.State, &r.CancelRequested, &r.MaxParallel, &budgetMS, &r.PlannedVersion, &r.CreatedAt, &finished, &r.Error)
	r.FreezeBudget = time.Duration(budgetMS) * time.Millisecond
	r.FinishedAt = finished.Time
	return r, err
}

// LatestRebalance returns the running rebalance or, without one, the last
// that ran, with its moves in ID order. ErrNoRebalance if there never was
// one.
func (c *Catalog) LatestRebalance(ctx context.Context) (Rebalance, []Move, error) {
	r, err := scanRebalance(c.pool.QueryRow(ctx, `SELECT `+rebalanceColumns+` FROM rebalances
		ORDER BY state = 'running' DESC, id DESC LIMIT 1`))
	if errors.Is(err, pgx.ErrNoRows) {
		return Rebalance{}, nil, ErrNoRebalance
	}
	if err != nil {
		return Rebalance{}, nil, fmt.Errorf("rebalance: %w", err)
	}
	moves, err := c.Moves(ctx, r.ID)
	return r, moves, err
}

// RunningRebalance returns the running rebalance, or ErrNoRebalance.
func (c *Catalog) RunningRebalance(ctx context.Context) (Rebalance, error) {
	r, err := scanRebalance(c.pool.QueryRow(ctx, `SELECT `+rebalanceColumns+` FROM rebalances WHERE state = 'running'`))
	if errors.Is(err, pgx.ErrNoRows) {
		return Rebalance{}, ErrNoRebalance
	}
	if err != nil {
		return Rebalance{}, fmt.Errorf("rebalance: %w", err)
	}
	return r, nil
}

const moveColumns = `id, rebalance_id, source, target, partitions, state, rows_total, bytes_total, rows_copied,
	attempts, freezes, coalesce(last_freeze_ms, 0), coalesce(max_freeze_ms, 0), coalesce(verified_rows, 0),
	coalesce(last_error, ''), created_at, started_at, updated_at, finished_at`

// Moves returns a rebalance's moves in ID order.
func (c *Catalog) Moves(ctx context.Context, rebalanceID int64) ([]Move, error) {
	rows, err := c.pool.Query(ctx, `SELECT `+moveColumns+` FROM moves WHERE rebalance_id = $1 ORDER BY id`, rebalanceID)
	if err != nil {
		return nil, fmt.Errorf("moves: %w", err)
	}
	var out []Move
	for rows.Next() {
		m, err := scanMove(rows)
		if err != nil {
			rows.Close()
			return nil, fmt.Errorf("moves: %w", err)
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("moves: %w", err)
	}
	return out, nil
}

// ActiveMoveIDs returns the IDs of moves that have not ended, in any
// rebalance: the reaper keeps their replication objects.
func (c *Catalog) ActiveMoveIDs(ctx context.Context) (map[int64]bool, error) {
	rows, err := c.pool.Query(ctx, `SELECT id FROM moves WHERE state NOT IN ('cleaned_up', 'failed', 'cancelled')`)
	if err != nil {
		return nil, fmt.Errorf("active moves: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("active moves: %w", err)
	}
	out := make(map[int64]bool, len(ids))
	for _, id := range ids {
		out[id] = true
	}
	return out, nil
}

func scanMove(row pgx.Row) (Move, error) {
	var (
		m                 Move
		lastMS, maxMS     float64
		started, finished pgtype.Timestamptz
	)
	err := row.Scan(&m.ID, &m.RebalanceID, &m.Source, &m.Target, &m.Partitions, &m.State, &m.RowsTotal, &m.BytesTotal,
		&m.RowsCopied, &m.Attempts, &m.Freezes, &lastMS, &maxMS, &m.VerifiedRows, &m.LastError,
		&m.CreatedAt, &started, &m.UpdatedAt, &finished)
	m.LastFreeze = time.Duration(lastMS * float64(time.Millisecond))
	m.MaxFreeze = time.Duration(maxMS * float64(time.Millisecond))
	m.StartedAt, m.FinishedAt = started.Time, finished.Time
	return m, err
}

// CancelRebalance asks the running rebalance to stop: moves not yet cut
// over roll back, the others finish. It returns the rebalance's ID.
func (c *Catalog) CancelRebalance(ctx context.Context) (int64, error) {
	var id int64
	err := c.pool.QueryRow(ctx, `UPDATE rebalances SET cancel_requested = true WHERE state = 'running' RETURNING id`).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, ErrNoRebalance
	}
	if err != nil {
		return 0, fmt.Errorf("cancel rebalance: %w", err)
	}
	return id, nil
}

// ExecutorLock is the rebalancing executor's lock on the catalog, held on
// a connection of its own, and the term that taking it began. Every write
// of move state checks the term, so an executor that lost the lock (its
// connection ended) can no longer change anything.
type ExecutorLock struct {
	Term int64
	conn *pgx.Conn
}

// AwaitExecutorLock connects to dsn and tries the executor lock every
// `every` until it has it (or ctx ends), then starts a new term. A standby
// keeps its one connection and retries on it, so it can try often: it
// takes over within about `every` of the holder's connection ending.
func AwaitExecutorLock(ctx context.Context, dsn, holder string, every time.Duration) (*ExecutorLock, error) {
	cfg, err := pglock.HolderConfig(dsn, "shardgate-mover")
	if err != nil {
		return nil, fmt.Errorf("executor lock: catalog DSN: %w", err)
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("executor lock: %w", err)
	}
	err = pglock.AwaitSessionLock(ctx, conn, pglock.ClassMover, pglock.KeyMoverExecutor, func() time.Duration { return every })
	if err != nil {
		conn.Close(context.Background())
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("executor lock: %w", err)
	}
	l := &ExecutorLock{conn: conn}
	if err := conn.QueryRow(ctx, `UPDATE mover_term SET term = term + 1, holder = $1, acquired_at = now() RETURNING term`, holder).Scan(&l.Term); err != nil {
		conn.Close(context.Background())
		return nil, fmt.Errorf("executor lock: %w", err)
	}
	return l, nil
}

// Alive checks that the lock's connection still answers.
func (l *ExecutorLock) Alive(ctx context.Context) error { return l.conn.Ping(ctx) }

// Release gives the lock up.
func (l *ExecutorLock) Release() { l.conn.Close(context.Background()) }

// UpdateMove writes a move's progress and state, if term is still the
// executor's (else ErrDeposed).
func (c *Catalog) UpdateMove(ctx context.Context, term int64, m Move) error {
	tag, err := c.pool.Exec(ctx, `
		UPDATE moves SET state = $3, rows_copied = $4, attempts = $5, freezes = $6,
		       last_freeze_ms = nullif($7::float8, 0), max_freeze_ms = nullif($8::float8, 0),
		       verified_rows = nullif($9::bigint, 0), last_error = nullif($10, ''),
		       started_at = coalesce(started_at, CASE WHEN $3 <> 'planned' THEN now() END),
		       finished_at = CASE WHEN $3 IN ('cleaned_up', 'failed', 'cancelled') THEN coalesce(finished_at, now()) END,
		       updated_at = now()
		WHERE id = $1 AND (SELECT term FROM mover_term) = $2`,
		m.ID, term, m.State, m.RowsCopied, m.Attempts, m.Freezes,
		float64(m.LastFreeze)/float64(time.Millisecond), float64(m.MaxFreeze)/float64(time.Millisecond),
		m.VerifiedRows, m.LastError)
	if err != nil {
		return fmt.Errorf("update move %d: %w", m.ID, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("update move %d: %w", m.ID, ErrDeposed)
	}
	return nil
}

// FlipOwners makes target the owner of the move's partitions in the map,
// if source still owns them (a compare-and-set; partitions the target owns
// already count as flipped), and records the move as cut over, in one
// statement that bumps the topology version. Routers switch to the target
// as the version reaches them. It fails with ErrOwnerChanged, and changes
// nothing, if a partition belongs to a third shard, and with ErrDeposed if
// term is no longer the executor's. One round trip: it runs inside a
// write pause.
func (c *Catalog) FlipOwners(ctx context.Context, term int64, m Move) error {
	var (
		current bool
		others  int
	)
	err := c.pool.QueryRow(ctx, `
		WITH t AS (
		    SELECT 1 FROM mover_term WHERE term = $4 FOR SHARE
		), chk AS (
		    SELECT EXISTS (SELECT 1 FROM t) AS current,
		           (SELECT count(*) FROM partitions WHERE partition = ANY($1) AND shard <> ALL (ARRAY[$2, $3])) AS others
		), flip AS (
		    UPDATE partitions AS p SET shard = $3 FROM chk
		    WHERE chk.current AND chk.others = 0 AND p.partition = ANY($1) AND p.shard = $2
		    RETURNING 1
		), mv AS (
		    UPDATE moves AS m SET state = 'cut_over', updated_at = now() FROM chk
		    WHERE chk.current AND chk.others = 0 AND m.id = $5
		    RETURNING 1
		)
		SELECT current, others FROM chk, (SELECT count(*) FROM flip) AS f, (SELECT count(*) FROM mv) AS v`,
		m.Partitions, m.Source, m.Target, term, m.ID).Scan(&current, &others)
	switch {
	case err != nil:
		return fmt.Errorf("flip owners of move %d: %w", m.ID, err)
	case !current:
		return fmt.Errorf("flip owners of move %d: %w", m.ID, ErrDeposed)
	case others > 0:
		return fmt.Errorf("flip owners of move %d: %w: %d partitions belong to neither %s nor %s", m.ID, ErrOwnerChanged, others, m.Source, m.Target)
	}
	return nil
}

// FinishRebalance ends a running rebalance in state (done, failed or
// cancelled), if term is still the executor's.
func (c *Catalog) FinishRebalance(ctx context.Context, term, id int64, state, errText string) error {
	tag, err := c.pool.Exec(ctx, `UPDATE rebalances SET state = $3, error = nullif($4, ''), finished_at = now()
		WHERE id = $1 AND state = 'running' AND (SELECT term FROM mover_term) = $2`, id, term, state, errText)
	if err != nil {
		return fmt.Errorf("finish rebalance %d: %w", id, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("finish rebalance %d: %w", id, ErrDeposed)
	}
	return nil
}

// PartitionOwners returns the actual map (element p is partition p's
// shard) and the topology version it belongs to.
func (c *Catalog) PartitionOwners(ctx context.Context) ([]string, int64, error) {
	topo, err := c.LoadTopology(ctx)
	if err != nil {
		return nil, 0, err
	}
	return topo.Table.Owners(), topo.Version, nil
}
