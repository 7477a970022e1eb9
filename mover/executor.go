package mover

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/migrations"
	"github.com/shardgate/shardgate/shards"
)

// Defaults of a rebalance's knobs.
const (
	DefaultFreezeBudget = 100 * time.Millisecond
	DefaultMaxParallel  = 2
	// MaxFreezeBudget keeps a freeze well inside the 2 s a router waits
	// for a frozen partition before it answers Unavailable.
	MaxFreezeBudget = time.Second
)

// ExecutorOptions tune an Executor. The zero value of a field means its
// default; CatalogDSN is required.
type ExecutorOptions struct {
	// CatalogDSN is where the executor takes its lock (a connection of its
	// own) and reads and writes move records.
	CatalogDSN string
	// Holder names this instance in the catalog's executor record.
	Holder string
	// Interval is how often a leader looks for work (default 1s).
	Interval time.Duration
	// LockInterval is how often an executor that does not lead tries the
	// lock (default 200ms): how soon it takes over from one that died,
	// when a move it left frozen holds writes.
	LockInterval time.Duration
	// ReapInterval is how often the leader looks for replication objects
	// that no unfinished move owns (default 1 min).
	ReapInterval time.Duration
	// MarkerPoll is how often the target is asked whether a marker arrived
	// (default 2ms).
	MarkerPoll time.Duration
	// CatchUpTimeout bounds one wait for a marker while catching up
	// (default 1 min); the move retries after it.
	CatchUpTimeout time.Duration
	// MaxAttempts is how many failed attempts of one state a move makes
	// before it rolls back (default 30), while it still can.
	MaxAttempts int
	// Throttle slows copies down while shards are busy.
	Throttle ThrottleOptions
	// ShardPool sizes the executor's own pools, one per shard (default 8
	// connections).
	ShardPool shards.PoolOptions
	Logger    *slog.Logger
	// BeforeAction, if set, is called before every action of every move.
	// An error ends this executor's term at once, recording nothing, as a
	// crash at that point would: for fault-injection tests.
	BeforeAction func(ctx context.Context, move int64, s State, a Action) error
}

// errAborted wraps the error of a BeforeAction hook that ended a term.
var errAborted = errors.New("executor aborted")

func (o ExecutorOptions) withDefaults() ExecutorOptions {
	if o.Interval <= 0 {
		o.Interval = time.Second
	}
	if o.LockInterval <= 0 {
		o.LockInterval = 200 * time.Millisecond
	}
	if o.ReapInterval <= 0 {
		o.ReapInterval = time.Minute
	}
	if o.MarkerPoll <= 0 {
		o.MarkerPoll = 2 * time.Millisecond
	}
	if o.CatchUpTimeout <= 0 {
		o.CatchUpTimeout = time.Minute
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 30
	}
	if o.ShardPool.MaxConns <= 0 {
		o.ShardPool.MaxConns = 8
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// Executor runs rebalances. Run it on every instance: one at a time leads
// (an advisory lock on the catalog), resumes whatever moves the catalog
// records as unfinished, and runs new rebalances as they are started.
type Executor struct {
	opts ExecutorOptions
	cat  *catalog.Catalog
	log  *slog.Logger

	mu    sync.Mutex
	pools map[string]shardPool // the executor's own shard pools, by name

	leading atomic.Bool
	reaping sync.Mutex
	metrics metrics

	// flipNanos estimates how long a cutover takes from its marker's
	// arrival to the catalog flip (an exponential average), so the marker
	// wait leaves that much of the budget.
	flipNanos atomic.Int64
}

// Bounds of the time kept back from the freeze budget for the flip.
const (
	minFlipReserve = 5 * time.Millisecond
	// The flip may take at most this share of the budget: the marker
	// needs the rest.
	maxFlipShare = 2
)

// flipReserve is how much of budget to keep for marking moved, owning and
// flipping after the marker arrived: twice the recent average.
func (e *Executor) flipReserve(budget time.Duration) time.Duration {
	r := max(2*time.Duration(e.flipNanos.Load()), minFlipReserve)
	return min(r, budget/maxFlipShare)
}

func (e *Executor) observeFlip(d time.Duration) {
	old := e.flipNanos.Load()
	if old == 0 {
		e.flipNanos.Store(int64(d))
		return
	}
	e.flipNanos.Store((3*old + int64(d)) / 4)
}

type shardPool struct {
	dsn string // as expanded
	sh  *shards.Shard
}

// NewExecutor returns an executor working on the catalog cat.
func NewExecutor(cat *catalog.Catalog, opts ExecutorOptions) *Executor {
	opts = opts.withDefaults()
	return &Executor{opts: opts, cat: cat, log: opts.Logger.With("component", "mover"), pools: map[string]shardPool{}, metrics: newMetrics()}
}

// Leading reports whether this executor holds the lock.
func (e *Executor) Leading() bool { return e.leading.Load() }

// Run competes for the lock until ctx ends; while it holds it, it runs
// rebalances. It returns ctx's error.
func (e *Executor) Run(ctx context.Context) error {
	defer e.closePools()
	for {
		lock, err := catalog.AwaitExecutorLock(ctx, e.opts.CatalogDSN, e.opts.Holder, e.opts.LockInterval)
		if err != nil && ctx.Err() == nil {
			e.log.Warn("rebalancing executor cannot reach the catalog", "err", err)
		}
		if lock != nil {
			e.lead(ctx, lock)
			lock.Release()
		}
		if err := sleepCtx(ctx, e.opts.Interval/2+rand.N(e.opts.Interval)); err != nil {
			return err
		}
	}
}

// lead runs rebalances for as long as the lock holds, and the reaper
// beside them.
func (e *Executor) lead(ctx context.Context, lock *catalog.ExecutorLock) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	e.leading.Store(true)
	defer e.leading.Store(false)
	e.log.Info("rebalancing executor leads", "term", lock.Term)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { // the lock lives as long as its connection
		for {
			if sleepCtx(ctx, time.Second) != nil {
				return
			}
			pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
			err := lock.Alive(pctx)
			pcancel()
			if err != nil && ctx.Err() == nil {
				e.log.Warn("rebalancing executor lost its lock", "err", err)
				cancel()
				return
			}
		}
	})
	// The reaper runs on its own clock, rebalance or not: it leaves the
	// objects of unfinished moves alone.
	wg.Go(func() {
		for {
			if sleepCtx(ctx, e.opts.ReapInterval) != nil {
				return
			}
			e.reap(ctx)
		}
	})
	for ctx.Err() == nil {
		r, err := e.cat.RunningRebalance(ctx)
		switch {
		case err == nil:
			if err := e.runRebalance(ctx, lock.Term, r); err != nil && ctx.Err() == nil {
				if errors.Is(err, catalog.ErrDeposed) || errors.Is(err, errAborted) {
					e.log.Warn("rebalancing executor's term ends", "term", lock.Term, "err", err)
					return
				}
				e.log.Warn("rebalance interrupted; resuming", "rebalance", r.ID, "err", err)
			} else if ctx.Err() == nil {
				e.reap(ctx) // right after: a finished rebalance leaves nothing
			}
		case !errors.Is(err, catalog.ErrNoRebalance) && ctx.Err() == nil:
			e.log.Warn("rebalancing executor cannot read the catalog", "err", err)
		}
		if sleepCtx(ctx, e.opts.Interval) != nil {
			return
		}
	}
}

// runRebalance runs the rebalance's unfinished moves, MaxParallel at a
// time, and records how it ended.
func (e *Executor) runRebalance(ctx context.Context, term int64, r catalog.Rebalance) error {
	moves, err := e.cat.Moves(ctx, r.ID)
	if err != nil {
		return err
	}
	shape, err := e.cat.Shape(ctx)
	if err != nil {
		return err
	}
	e.log.Info("rebalance running", "rebalance", r.ID, "moves", len(moves), "max_parallel", r.MaxParallel)
	// A move that ends the term (deposed, aborted) stops the others too.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	sem := make(chan struct{}, max(r.MaxParallel, 1))
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	for _, m := range moves {
		if State(m.State).Terminal() {
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return ctx.Err()
		}
		wg.Go(func() {
			defer func() { <-sem }()
			run := &moveRun{e: e, term: term, r: r, m: m, prefix: shape.SlotPrefix}
			if err := run.run(ctx); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
				if errors.Is(err, catalog.ErrDeposed) || errors.Is(err, errAborted) {
					stop()
				}
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// Every move ended: record how.
	moves, err = e.cat.Moves(ctx, r.ID)
	if err != nil {
		return err
	}
	state, msg := catalog.RebalanceDone, ""
	failed, cancelled := 0, 0
	for _, m := range moves {
		switch State(m.State) {
		case Failed:
			failed++
		case Cancelled:
			cancelled++
		case CleanedUp:
		default:
			return fmt.Errorf("move %d is %s after its run", m.ID, m.State)
		}
	}
	switch {
	case failed > 0:
		state, msg = catalog.RebalanceFailed, fmt.Sprintf("%d of %d moves failed; see their last errors", failed, len(moves))
	case cancelled > 0:
		state = catalog.RebalanceCancelled
	}
	e.log.Info("rebalance ended", "rebalance", r.ID, "state", state, "moves", len(moves), "failed", failed, "cancelled", cancelled)
	return e.cat.FinishRebalance(ctx, term, r.ID, state, msg)
}

// shard returns the executor's pool for a shard, opening (or reopening,
// after a DSN change) it from the catalog's record.
func (e *Executor) shard(ctx context.Context, name string) (*shards.Shard, string, error) {
	topo, err := e.cat.LoadTopology(ctx)
	if err != nil {
		return nil, "", err
	}
	for _, rec := range topo.Shards {
		if rec.Name != name {
			continue
		}
		dsn, err := catalog.ExpandDSN(rec.DSN)
		if err != nil {
			return nil, "", fmt.Errorf("shard %s: %w", name, err)
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		if p, ok := e.pools[name]; ok && p.dsn == dsn {
			return p.sh, dsn, nil
		} else if ok {
			p.sh.Close()
		}
		sh, err := shards.Open(ctx, name, dsn, e.opts.ShardPool)
		if err != nil {
			return nil, "", err
		}
		e.pools[name] = shardPool{dsn: dsn, sh: sh}
		return sh, dsn, nil
	}
	return nil, "", fmt.Errorf("shard %s: %w", name, catalog.ErrUnknownShard)
}

func (e *Executor) closePools() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for name, p := range e.pools {
		p.sh.Close()
		delete(e.pools, name)
	}
}

// reap drops replication objects of this cluster that no unfinished move
// owns: what an interrupted attempt, or a move whose record is gone, left
// behind. What it cannot drop it logs and counts, and a shard it cannot
// look into counts as one.
func (e *Executor) reap(ctx context.Context) {
	shape, err := e.cat.Shape(ctx)
	if err != nil {
		return
	}
	topo, err := e.cat.LoadTopology(ctx)
	if err != nil {
		return
	}
	debris := 0
	for _, rec := range topo.Shards {
		sh, _, err := e.shard(ctx, rec.Name)
		if err != nil {
			debris++
			continue
		}
		objs, err := sh.ListMoveObjects(ctx, shape.SlotPrefix)
		if err != nil {
			// What it holds is unknown: count the shard, as when its pool
			// cannot be had, or the gauge would say all is clean.
			debris++
			e.log.Warn("reaper cannot list a shard's replication objects", "shard", rec.Name, "err", err)
			continue
		}
		// The moves still going, read after the listing: an object listed
		// belongs to a move recorded before it was made, so a move started
		// meanwhile is in this set.
		active, err := e.cat.ActiveMoveIDs(ctx)
		if err != nil {
			return
		}
		stale := func(name string) bool {
			id, ok := shards.ParseMoveObjectName(shape.SlotPrefix, name)
			return ok && !active[id]
		}
		// Subscriptions first: their slots are in use until they go.
		for _, name := range objs.Subscriptions {
			if stale(name) {
				if _, err := sh.DropMoveSubscription(ctx, name); err != nil {
					debris++
					e.log.Warn("reaper could not drop a subscription", "shard", rec.Name, "subscription", name, "err", err)
				} else {
					e.log.Info("reaper dropped a stale subscription", "shard", rec.Name, "subscription", name)
				}
			}
		}
		for _, name := range objs.Slots {
			if stale(name) {
				if err := sh.DropMoveSlot(ctx, name); err != nil {
					debris++
					e.log.Warn("reaper could not drop a replication slot", "shard", rec.Name, "slot", name, "err", err)
				} else {
					e.log.Info("reaper dropped a stale replication slot", "shard", rec.Name, "slot", name)
				}
			}
		}
		for _, name := range objs.Publications {
			if stale(name) {
				if err := sh.DropMovePublication(ctx, name); err != nil {
					debris++
					e.log.Warn("reaper could not drop a publication", "shard", rec.Name, "publication", name, "err", err)
				} else {
					e.log.Info("reaper dropped a stale publication", "shard", rec.Name, "publication", name)
				}
			}
		}
	}
	e.metrics.debris.Set(float64(debris))
}

// Collectors are the executor's Prometheus metrics.
func (e *Executor) Collectors() []prometheus.Collector {
	return []prometheus.Collector{
		e.metrics.freeze, e.metrics.rowsCopied, e.metrics.movesEnded, e.metrics.debris,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "shardgate_mover_leading",
			Help: "1 while this instance's rebalancing executor holds the cluster-wide lock.",
		}, func() float64 {
			if e.Leading() {
				return 1
			}
			return 0
		}),
	}
}

type metrics struct {
	freeze     *prometheus.HistogramVec
	rowsCopied prometheus.Counter
	movesEnded *prometheus.CounterVec
	debris     prometheus.Gauge
}

func newMetrics() metrics {
	return metrics{
		freeze: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "shardgate_move_freeze_seconds",
			Help:    "How long a move kept its partitions frozen for writes: kind=cutover from the freeze to the catalog flip, kind=verify for the verification's snapshots.",
			Buckets: []float64{.001, .0025, .005, .01, .02, .05, .1, .25, .5, 1},
		}, []string{"kind"}),
		rowsCopied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shardgate_move_rows_copied_total",
			Help: "Rows the bulk copies of moves wrote to their targets.",
		}),
		movesEnded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shardgate_moves_ended_total",
			Help: "Moves this instance's executor ended, by final state (cleaned_up, failed, cancelled).",
		}, []string{"state"}),
		debris: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shardgate_mover_debris",
			Help: "Replication objects of ended moves the last reaper pass could not drop, plus shards it could not list (the log says which).",
		}),
	}
}

// the migrations a move needs on both shards: the same schema.
func sameSchema(ctx context.Context, srcDSN, tgtDSN string) error {
	a, err := migrations.GetStatus(ctx, srcDSN, migrations.Shard)
	if err != nil {
		return fmt.Errorf("source schema: %w", err)
	}
	b, err := migrations.GetStatus(ctx, tgtDSN, migrations.Shard)
	if err != nil {
		return fmt.Errorf("target schema: %w", err)
	}
	if a.Applied != b.Applied {
		return fmt.Errorf("source is at schema version %d, target at %d: run 'shardctl migrate up' first", a.Applied, b.Applied)
	}
	return nil
}
