package mover

// The move state machine: which actions a move in a given state runs next,
// and which state an outcome leads to. It does no I/O; the executor runs
// the actions against the shards and the catalog and records each new
// state. A crash at any point leaves the last recorded state, and every
// state's actions are safe to run again from the start, so the next
// executor simply runs them again (see machine_test.go, which crashes a
// simulated move after every action).

// State is a move's state as recorded in the catalog.
type State string

const (
	// Planned: recorded by StartRebalance, nothing done yet.
	Planned State = "planned"
	// Copying: publication, slot and bulk copy to the target, then the
	// subscription that streams the changes made since.
	Copying State = "copying"
	// CatchingUp: the target applies the stream; once a marker's round
	// trip fits the freeze budget, a short freeze takes matching
	// snapshots of both sides and their checksums are compared.
	CatchingUp State = "catching_up"
	// Verified: the copy matched its source at the verification point
	// and keeps following it; waiting for a moment to cut over.
	Verified State = "verified"
	// Frozen: recorded just before the source's partitions are frozen
	// for the cutover. After a crash the source tells whether the cutover
	// got past its point of no return (partitions marked moved).
	Frozen State = "frozen"
	// CutOver: the catalog names the target as owner; the source's copy
	// and the replication objects are still to go.
	CutOver State = "cut_over"
	// CleanedUp: done; nothing of the move is left on the source.
	CleanedUp State = "cleaned_up"
	// RollingBack: undoing a move that failed or was cancelled before
	// its cutover: the source keeps the partitions, the target's copy and
	// the replication objects go.
	RollingBack State = "rolling_back"
	// Failed: rolled back after an error (the move's last error says which).
	Failed State = "failed"
	// Cancelled: rolled back on request.
	Cancelled State = "cancelled"
)

// Terminal reports whether a move in state s is over.
func (s State) Terminal() bool { return s == CleanedUp || s == Failed || s == Cancelled }

// Valid reports whether s is a state of the machine.
func (s State) Valid() bool {
	switch s {
	case Planned, Copying, CatchingUp, Verified, Frozen, CutOver, CleanedUp, RollingBack, Failed, Cancelled:
		return true
	}
	return false
}

// CanCancel reports whether a move in state s can still be rolled back:
// once the source gave the partitions away (during Frozen, after the
// marker) the move only goes forward.
func (s State) CanCancel() bool {
	switch s {
	case Planned, Copying, CatchingUp, Verified, Frozen:
		return true
	}
	return false
}

// Action is one piece of I/O the executor performs for a move.
type Action string

const (
	// DropSubscription drops the move's subscription on the target (and
	// its slot on the source, when the source answers).
	DropSubscription Action = "drop-subscription"
	// DropSlot drops the move's replication slot on the source.
	DropSlot Action = "drop-slot"
	// DropPublication drops the move's publication on the source.
	DropPublication Action = "drop-publication"
	// ClearTarget deletes the target's rows of the partitions (refused
	// where the target serves them) and the move's markers on both sides.
	ClearTarget Action = "clear-target"
	// Publish creates the publication on the source.
	Publish Action = "publish"
	// Copy creates the slot with its snapshot and copies the partitions.
	Copy Action = "copy"
	// Subscribe creates the target's subscription on the slot.
	Subscribe Action = "subscribe"
	// AwaitCatchUp waits until a marker's round trip fits in half the
	// freeze budget.
	AwaitCatchUp Action = "await-catch-up"
	// Freeze freezes the source's partitions (owned → frozen).
	Freeze Action = "freeze"
	// Marker writes a marker on the source and waits, within the freeze
	// budget, until the target has applied it.
	Marker Action = "marker"
	// Snapshot takes snapshots of both sides, for the checksums.
	Snapshot Action = "snapshot"
	// Unfreeze unfreezes the source's partitions (frozen → owned).
	Unfreeze Action = "unfreeze"
	// Compare compares the snapshots' checksums.
	Compare Action = "compare"
	// CheckSource asks the source whether it already marked the
	// partitions moved (the cutover's point of no return).
	CheckSource Action = "check-source"
	// MarkMoved gives the partitions away on the source (frozen → moved).
	MarkMoved Action = "mark-moved"
	// OwnTarget makes the target own the partitions.
	OwnTarget Action = "own-target"
	// Flip makes the target the owner in the catalog (a compare-and-set)
	// and records the move as cut over.
	Flip Action = "flip"
	// DeleteSource deletes the source's rows of the partitions.
	DeleteSource Action = "delete-source"
)

// Outcome is how a step (the actions of a state) ended.
type Outcome string

const (
	// Done: every action succeeded.
	Done Outcome = "done"
	// Retry: an action failed in a way worth retrying later; the state
	// stays and the step runs again from its start.
	Retry Outcome = "retry"
	// Timeout: a marker did not arrive within the freeze budget; the
	// freeze was undone and the cutover will be tried again.
	Timeout Outcome = "timeout"
	// Mismatch: the checksums differ; the move is rolled back.
	Mismatch Outcome = "mismatch"
	// GiveUp: too many failed attempts; the move is rolled back.
	GiveUp Outcome = "give-up"
	// Cancel: the operator cancelled; the move is rolled back.
	Cancel Outcome = "cancel"
	// Forward: a rollback found the source had already given the
	// partitions away, so the move must finish instead.
	Forward Outcome = "forward"
)

// The actions of each state. Each list begins by undoing what a crash in
// the middle of it may have left (an earlier attempt's objects, a freeze),
// so running it again from the start is always safe.
var (
	copyActions = []Action{DropSubscription, DropSlot, DropPublication, ClearTarget, Publish, Copy, Subscribe}
	// The verification's short freeze: snapshots of both sides at the
	// same point of the stream, taken while no write can land between.
	catchUpActions = []Action{Unfreeze, AwaitCatchUp, Freeze, Marker, Snapshot, Unfreeze, Compare}
	prepareActions = []Action{AwaitCatchUp}
	// The target owns nothing until the source has given the partitions
	// away, and the source gives them away only once the target has
	// applied every write (the marker): at no moment may both take writes.
	cutOverActions = []Action{Freeze, Marker, MarkMoved, OwnTarget, Flip}
	// After the point of no return: the source takes no writes (moved),
	// so a new marker proves the target has everything.
	rollForwardActions = []Action{Marker, OwnTarget, Flip}
	// The subscription goes before anything is deleted: a delete on the
	// source while it is subscribed would travel to the target.
	cleanupActions  = []Action{DropSubscription, DropSlot, DropPublication, DeleteSource}
	rollbackActions = []Action{Unfreeze, DropSubscription, DropSlot, DropPublication, ClearTarget}
)

// ChecksSource reports whether the step of state s starts with
// CheckSource: the actions then depend on its answer (see Actions).
func ChecksSource(s State) bool { return s == Frozen || s == RollingBack }

// Actions returns what a move in state s does next. sourceMoved is
// CheckSource's answer, for the states that ask (ChecksSource); cancel says
// the operator asked to stop. The step's outcome, when all succeed, is
// SuccessOutcome's.
func Actions(s State, cancel, sourceMoved bool) []Action {
	switch s {
	case Planned:
		return nil
	case Copying:
		if cancel {
			return nil
		}
		return copyActions
	case CatchingUp:
		if cancel {
			return []Action{Unfreeze}
		}
		return catchUpActions
	case Verified:
		if cancel {
			return nil
		}
		return prepareActions
	case Frozen:
		switch {
		case sourceMoved:
			return rollForwardActions
		case cancel:
			return []Action{Unfreeze}
		}
		return cutOverActions
	case CutOver:
		return cleanupActions
	case RollingBack:
		if sourceMoved {
			return nil
		}
		return rollbackActions
	}
	return nil
}

// SuccessOutcome is the outcome of state s's step when every action of
// Actions(s, cancel, sourceMoved) succeeded.
func SuccessOutcome(s State, cancel, sourceMoved bool) Outcome {
	switch {
	case s == RollingBack && sourceMoved:
		return Forward
	case s == Frozen && sourceMoved:
		return Done
	case cancel && s.CanCancel():
		return Cancel
	}
	return Done
}

// OnTimeout is what to run when the Marker action of state s runs out of
// budget: undo the freeze, unless the source already gave the partitions
// away (then waiting longer is all there is to do). The step's outcome is
// Timeout, or Retry when the freeze must stand. A step that fails in
// another way after taking a freeze undoes it the same way, and retries.
func OnTimeout(s State, sourceMoved bool) ([]Action, Outcome) {
	if s == Frozen && sourceMoved {
		return nil, Retry
	}
	return []Action{Unfreeze}, Timeout
}

// Next returns the state a move in state s goes to on outcome out.
// cancelled says the rebalance was cancelled (it picks Cancelled over
// Failed at the end of a rollback). An outcome a state cannot have leaves
// it unchanged.
func Next(s State, out Outcome, cancelled bool) State {
	switch out {
	case Retry:
		return s
	case Cancel, GiveUp, Mismatch:
		if s.CanCancel() {
			return RollingBack
		}
		return s
	}
	switch s {
	case Planned:
		if out == Done {
			return Copying
		}
	case Copying:
		if out == Done {
			return CatchingUp
		}
	case CatchingUp:
		switch out {
		case Done:
			return Verified
		case Timeout:
			return CatchingUp
		}
	case Verified:
		if out == Done {
			return Frozen
		}
	case Frozen:
		switch out {
		case Done:
			return CutOver
		case Timeout:
			return Verified
		}
	case CutOver:
		if out == Done {
			return CleanedUp
		}
	case RollingBack:
		switch out {
		case Done:
			if cancelled {
				return Cancelled
			}
			return Failed
		case Forward:
			return Frozen
		}
	}
	return s
}
