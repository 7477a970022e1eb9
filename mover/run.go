package mover

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/shards"
)

var (
	// errMarkerTimeout: a marker did not arrive within the freeze budget
	// (or the freeze could not be had within it).
	errMarkerTimeout = errors.New("the marker did not reach the target within the freeze budget")
	// errMismatch wraps a verification failure.
	errMismatch = errors.New("the copy differs from its source")
	// errCancelled ends a catch-up when the rebalance was cancelled
	// meanwhile.
	errCancelled = errors.New("the rebalance was cancelled")
)

// cancelPoll is how often a catch-up rereads the rebalance's cancel flag.
const cancelPoll = time.Second

// moveRun is one move being run by the executor: the machine's decisions
// executed against the shards and the catalog.
type moveRun struct {
	e      *Executor
	term   int64
	r      catalog.Rebalance
	m      catalog.Move
	prefix string

	// Per step.
	src, tgt       *shards.Shard
	srcDSN, tgtDSN string
	timeouts       int           // freezes undone for lack of budget, in this run
	frozenAt       time.Time     // when the freeze of this step began
	markerAt       time.Time     // when its marker arrived
	lockWait       time.Duration // how long the freeze waited for writers
	snapSrc        *shards.Snapshot
	snapTgt        *shards.Snapshot
}

func (mr *moveRun) name() string { return shards.MoveObjectName(mr.prefix, mr.m.ID) }

func (mr *moveRun) log() *slog.Logger {
	return mr.e.log.With("move", mr.m.ID, "source", mr.m.Source, "target", mr.m.Target, "partitions", len(mr.m.Partitions))
}

// run steps the move until it ends, the context ends or the executor is
// deposed (an error).
func (mr *moveRun) run(ctx context.Context) error {
	backoff := time.Second
	for !State(mr.m.State).Terminal() {
		cancel, err := mr.cancelRequested(ctx)
		if err != nil {
			return err
		}
		s := State(mr.m.State)
		out, err := mr.step(ctx, s, cancel)
		if errors.Is(err, catalog.ErrDeposed) || errors.Is(err, errAborted) || ctx.Err() != nil {
			return errors.Join(err, ctx.Err())
		}
		next := Next(s, out, cancel)
		if next != s {
			mr.m.Attempts = 0
			backoff = time.Second
		}
		mr.m.State = string(next)
		if err := mr.e.cat.UpdateMove(ctx, mr.term, mr.m); err != nil {
			return err
		}
		if next.Terminal() {
			mr.e.metrics.movesEnded.WithLabelValues(string(next)).Inc()
			mr.log().Info("move ended", "state", next, "last_error", mr.m.LastError)
		}
		if out == Retry || out == Timeout {
			if err := sleepCtx(ctx, backoff); err != nil {
				return err
			}
			backoff = min(2*backoff, 30*time.Second)
		}
	}
	return nil
}

// cancelRequested rereads the rebalance's cancel flag.
func (mr *moveRun) cancelRequested(ctx context.Context) (bool, error) {
	r, err := mr.e.cat.RunningRebalance(ctx)
	if errors.Is(err, catalog.ErrNoRebalance) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return r.ID == mr.r.ID && r.CancelRequested, nil
}

// step runs the actions of state s and returns the outcome.
func (mr *moveRun) step(ctx context.Context, s State, cancel bool) (Outcome, error) {
	defer mr.closeSnapshots()
	mr.frozenAt = time.Time{}
	if err := mr.open(ctx); err != nil {
		return mr.failed(s, false, err), nil
	}
	moved := false
	if ChecksSource(s) {
		st, err := mr.src.OwnershipOf(ctx, mr.m.Partitions)
		if err != nil {
			return mr.failed(s, false, err), nil
		}
		moved = len(st) > 0
		for _, p := range mr.m.Partitions {
			if st[p] != shards.Moved {
				moved = false
			}
		}
	}
	for _, a := range Actions(s, cancel, moved) {
		if hook := mr.e.opts.BeforeAction; hook != nil {
			if err := hook(ctx, mr.m.ID, s, a); err != nil {
				return Retry, fmt.Errorf("%w before %s in %s: %w", errAborted, a, s, err)
			}
		}
		err := mr.do(ctx, s, a)
		switch {
		case err == nil:
			continue
		case errors.Is(err, catalog.ErrDeposed):
			return Retry, err
		case errors.Is(err, errMarkerTimeout):
			comp, out := OnTimeout(s, moved)
			for _, c := range comp {
				if cerr := mr.do(ctx, s, c); cerr != nil {
					mr.m.LastError = fmt.Sprintf("%s after a freeze timeout: %v", c, cerr)
					return Retry, nil
				}
			}
			mr.timeouts++
			if out == Timeout && mr.timeouts >= mr.e.opts.MaxAttempts && s.CanCancel() && !moved {
				mr.m.LastError = fmt.Sprintf("%d freezes in a row did not fit the %s budget (last: %s, %s); raise --freeze-budget or move when writes are fewer",
					mr.timeouts, mr.r.FreezeBudget, err, a)
				mr.log().Warn("move gives up: its freezes do not fit the budget", "timeouts", mr.timeouts, "budget", mr.r.FreezeBudget)
				return GiveUp, nil
			}
			mr.m.LastError = fmt.Sprintf("%s (%s); will retry", err, a)
			mr.log().Info("freeze undone: the marker was late", "state", s, "budget", mr.r.FreezeBudget)
			return out, nil
		case errors.Is(err, errMismatch):
			mr.m.LastError = err.Error()
			mr.log().Error("move verification failed; rolling back", "err", err)
			return Mismatch, nil
		case errors.Is(err, errCancelled):
			// Nothing is frozen while catching up: roll back now.
			mr.log().Info("move cancelled while catching up", "state", s)
			return Cancel, nil
		default:
			mr.log().Warn("move step failed", "state", s, "action", a, "attempt", mr.m.Attempts+1, "err", err)
			if !mr.frozenAt.IsZero() && ctx.Err() == nil {
				// The step froze the partitions and cannot go on (the
				// target is down, say): let writes in again now, as after
				// a late marker, not after the backoff and the next
				// attempt; writers wait in their routers only so long.
				// Partitions already marked moved stay moved.
				comp, _ := OnTimeout(s, moved)
				for _, c := range comp {
					if cerr := mr.do(ctx, s, c); cerr != nil {
						mr.log().Warn("cannot undo the freeze of a failed step", "state", s, "action", c, "err", cerr)
					}
				}
			}
			return mr.failed(s, moved, fmt.Errorf("%s: %w", a, err)), nil
		}
	}
	if s != RollingBack {
		mr.m.LastError = ""
	}
	return SuccessOutcome(s, cancel, moved), nil
}

// failed records a failed attempt and decides: retry, or give up (roll
// back) once attempts run out and the move can still go back.
func (mr *moveRun) failed(s State, moved bool, err error) Outcome {
	mr.m.Attempts++
	mr.m.LastError = err.Error()
	if mr.m.Attempts >= mr.e.opts.MaxAttempts && s.CanCancel() && !moved {
		return GiveUp
	}
	return Retry
}

// open gets the executor's pools of the move's two shards.
func (mr *moveRun) open(ctx context.Context) error {
	var err error
	if mr.src, mr.srcDSN, err = mr.e.shard(ctx, mr.m.Source); err != nil {
		return err
	}
	mr.tgt, mr.tgtDSN, err = mr.e.shard(ctx, mr.m.Target)
	return err
}

func (mr *moveRun) closeSnapshots() {
	mr.snapSrc.Close()
	mr.snapTgt.Close()
	mr.snapSrc, mr.snapTgt = nil, nil
}

// do runs one action.
func (mr *moveRun) do(ctx context.Context, s State, a Action) error {
	parts := mr.m.Partitions
	switch a {
	case DropSubscription:
		_, err := mr.tgt.DropMoveSubscription(ctx, mr.name())
		return err
	case DropSlot:
		return mr.src.DropMoveSlot(ctx, mr.name())
	case DropPublication:
		return mr.src.DropMovePublication(ctx, mr.name())
	case ClearTarget:
		if _, err := mr.tgt.DeletePartitions(ctx, parts, mr.m.ID, mr.throttle(mr.tgt).pace); err != nil {
			return err
		}
		// The source's markers too, as DeleteSource clears the target's:
		// a rolled-back move leaves none behind.
		return mr.src.DeleteMarkers(ctx, mr.m.ID)
	case Publish:
		if err := sameSchema(ctx, mr.srcDSN, mr.tgtDSN); err != nil {
			return err
		}
		return mr.src.CreateMovePublication(ctx, mr.name(), mr.m.ID, parts)
	case Copy:
		return mr.copy(ctx)
	case Subscribe:
		conninfo, err := shards.Conninfo(mr.srcDSN)
		if err != nil {
			return err
		}
		return mr.tgt.CreateMoveSubscription(ctx, mr.name(), conninfo)
	case AwaitCatchUp:
		return mr.awaitCatchUp(ctx)
	case Freeze:
		// Writers wait from the moment the freeze takes their rows' locks,
		// which may be before it returns: the budget counts from its start.
		start := time.Now()
		err := mr.src.Freeze(ctx, parts, lockTimeout(mr.r.FreezeBudget-mr.e.flipReserve(mr.r.FreezeBudget)))
		if errors.Is(err, shards.ErrLockTimeout) {
			return fmt.Errorf("%w: in-flight writes held the partitions", errMarkerTimeout)
		}
		if err == nil {
			mr.frozenAt, mr.lockWait = start, time.Since(start)
		}
		return err
	case Marker:
		return mr.marker(ctx, s)
	case Snapshot:
		var err error
		if mr.snapSrc, err = mr.src.BeginSnapshot(ctx); err != nil {
			return err
		}
		mr.snapTgt, err = mr.tgt.BeginSnapshot(ctx)
		return err
	case Unfreeze:
		_, err := mr.src.Unfreeze(ctx, parts)
		if err == nil && !mr.frozenAt.IsZero() {
			mr.e.metrics.freeze.WithLabelValues("verify").Observe(time.Since(mr.frozenAt).Seconds())
			mr.frozenAt = time.Time{}
		}
		return err
	case Compare:
		return mr.compare(ctx)
	case MarkMoved:
		err := mr.src.MarkMoved(ctx, parts)
		if errors.Is(err, shards.ErrNotFrozen) {
			// Someone unfroze the partitions (a deposed executor's late
			// timeout): writes may have landed, so start the cutover over.
			return fmt.Errorf("%w: %v", errMarkerTimeout, err)
		}
		return err
	case OwnTarget:
		return mr.tgt.SetOwnership(ctx, parts, shards.Owned)
	case Flip:
		if err := mr.e.cat.FlipOwners(ctx, mr.term, mr.m); err != nil {
			return err
		}
		if !mr.frozenAt.IsZero() {
			d := time.Since(mr.frozenAt)
			flip := time.Since(mr.markerAt)
			mr.e.observeFlip(flip)
			mr.m.Freezes++
			mr.m.LastFreeze = d
			mr.m.MaxFreeze = max(mr.m.MaxFreeze, d)
			mr.e.metrics.freeze.WithLabelValues("cutover").Observe(d.Seconds())
			mr.log().Info("move cut over", "freeze", d, "lock_wait", mr.lockWait,
				"marker", mr.markerAt.Sub(mr.frozenAt)-mr.lockWait, "flip", flip)
		}
		return nil
	case DeleteSource:
		if _, err := mr.src.DeletePartitions(ctx, parts, mr.m.ID, mr.throttle(mr.src).pace); err != nil {
			return err
		}
		return mr.tgt.DeleteMarkers(ctx, mr.m.ID)
	}
	return fmt.Errorf("unknown action %s", a)
}

// throttle paces work on one shard by its probe latency alone.
func (mr *moveRun) throttle(sh *shards.Shard) *throttle {
	return newThrottle(mr.e.opts.Throttle, func(ctx context.Context) (time.Duration, int64, error) {
		d, err := sh.ProbeLatency(ctx)
		return d, 0, err
	})
}

// copy bulk-copies the batch from a new slot's snapshot, pacing it and
// recording progress.
func (mr *moveRun) copy(ctx context.Context) error {
	snap, err := mr.src.StartMoveSlot(ctx, mr.name())
	if err != nil {
		return err
	}
	defer snap.Close()
	th := newThrottle(mr.e.opts.Throttle, func(ctx context.Context) (time.Duration, int64, error) {
		a, err := mr.src.ProbeLatency(ctx)
		if err != nil {
			return 0, 0, err
		}
		b, err := mr.tgt.ProbeLatency(ctx)
		if err != nil {
			return 0, 0, err
		}
		lag, _, _, err := mr.src.SlotLag(ctx, mr.name())
		return max(a, b), lag, err
	})
	var (
		mu       sync.Mutex
		lastSave time.Time
		reported int64
	)
	progress := func(rows int64) {
		mu.Lock()
		defer mu.Unlock()
		mr.e.metrics.rowsCopied.Add(float64(rows - reported))
		reported = rows
		mr.m.RowsCopied = rows
		if time.Since(lastSave) >= 500*time.Millisecond {
			lastSave = time.Now()
			if err := mr.e.cat.UpdateMove(ctx, mr.term, mr.m); err != nil {
				mr.log().Warn("cannot record copy progress", "err", err)
			}
		}
	}
	start := time.Now()
	rows, err := mr.src.CopyPartitions(ctx, snap, mr.m.Partitions, mr.tgt, th.pace, progress)
	if err != nil {
		return err
	}
	el := time.Since(start)
	mr.log().Info("move copied", "rows", rows, "took", el, "rows_per_s", int(float64(rows)/max(el.Seconds(), 1e-3)), "throttled", th.throttled)
	return nil
}

// awaitCatchUp writes markers until one reaches the target within half the
// freeze budget: then a freeze's own marker should fit in the budget. The
// lag may stay above that for as long as the load lasts, so it also stops,
// with errCancelled, once the rebalance is cancelled.
func (mr *moveRun) awaitCatchUp(ctx context.Context) error {
	goal := mr.r.FreezeBudget / 2
	var last time.Duration
	checked := time.Now()
	for i := 0; ; i++ {
		token, err := mr.src.WriteMarker(ctx, mr.m.ID)
		if err != nil {
			return err
		}
		start := time.Now()
		wctx, cancel := context.WithTimeout(ctx, mr.e.opts.CatchUpTimeout)
		err = mr.tgt.WaitForMarker(wctx, mr.m.ID, token, mr.e.opts.MarkerPoll)
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				running, applyErrors, herr := mr.tgt.SubscriptionHealth(ctx, mr.name())
				if herr == nil && (!running || applyErrors > 0) {
					return fmt.Errorf("no marker within %s: the subscription's apply worker runs: %v, apply errors: %d (see the target's log)",
						mr.e.opts.CatchUpTimeout, running, applyErrors)
				}
			}
			return fmt.Errorf("no marker within %s: %w", mr.e.opts.CatchUpTimeout, err)
		}
		last = time.Since(start)
		if last <= goal {
			return nil
		}
		if i%10 == 9 {
			mr.log().Info("move catching up", "marker_round_trip", last, "goal", goal)
		}
		if time.Since(checked) >= cancelPoll {
			checked = time.Now()
			if cancel, err := mr.cancelRequested(ctx); err == nil && cancel {
				return errCancelled
			}
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
}

// marker writes a marker on the source and waits for it on the target,
// within what is left of the freeze budget when frozen in this step;
// otherwise (rolling forward) within the catch-up timeout.
func (mr *moveRun) marker(ctx context.Context, s State) error {
	token, err := mr.src.WriteMarker(ctx, mr.m.ID)
	if err != nil {
		return err
	}
	wait := mr.e.opts.CatchUpTimeout
	if !mr.frozenAt.IsZero() {
		// Leave time to flip: the freeze must end within the budget.
		wait = mr.r.FreezeBudget - mr.e.flipReserve(mr.r.FreezeBudget) - time.Since(mr.frozenAt)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err = mr.tgt.WaitForMarker(wctx, mr.m.ID, token, mr.e.opts.MarkerPoll)
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		return errMarkerTimeout
	}
	mr.markerAt = time.Now()
	return err
}

// compare checksums both snapshots, side by side, and fails with
// errMismatch naming the first differing table and partition.
func (mr *moveRun) compare(ctx context.Context) error {
	var (
		a, b       []shards.Checksum
		errA, errB error
		wg         sync.WaitGroup
	)
	wg.Go(func() { a, errA = mr.snapSrc.Checksums(ctx, mr.m.Partitions) })
	wg.Go(func() { b, errB = mr.snapTgt.Checksums(ctx, mr.m.Partitions) })
	wg.Wait()
	if err := errors.Join(errA, errB); err != nil {
		return err
	}
	if diff := diffChecksums(a, b); diff != "" {
		return fmt.Errorf("%w: %s", errMismatch, diff)
	}
	var rows int64
	for _, c := range a {
		rows += c.Rows
	}
	mr.m.VerifiedRows = rows
	return nil
}

// diffChecksums describes the first difference between two checksum lists
// (in table, partition order), or returns "".
func diffChecksums(src, tgt []shards.Checksum) string {
	type key struct {
		table     string
		partition int32
	}
	theirs := make(map[key]shards.Checksum, len(tgt))
	for _, c := range tgt {
		theirs[key{c.Table, c.Partition}] = c
	}
	for _, c := range src {
		k := key{c.Table, c.Partition}
		t, ok := theirs[k]
		switch {
		case !ok:
			return fmt.Sprintf("table %s, partition %d: source has %d rows, target none", c.Table, c.Partition, c.Rows)
		case t != c:
			return fmt.Sprintf("table %s, partition %d: source has %d rows (hash %s), target %d rows (hash %s)",
				c.Table, c.Partition, c.Rows, c.Sum, t.Rows, t.Sum)
		}
		delete(theirs, k)
	}
	for _, c := range tgt {
		if _, ok := theirs[key{c.Table, c.Partition}]; ok {
			return fmt.Sprintf("table %s, partition %d: target has %d rows, source none", c.Table, c.Partition, c.Rows)
		}
	}
	return ""
}

// lockTimeout renders a freeze budget as a Postgres interval.
func lockTimeout(d time.Duration) string {
	return fmt.Sprintf("%dms", max(d.Milliseconds(), 1))
}
