package mover

import (
	"fmt"
	"slices"
	"testing"
)

func TestNext(t *testing.T) {
	cases := []struct {
		s         State
		out       Outcome
		cancelled bool
		want      State
	}{
		{Planned, Done, false, Copying},
		{Planned, Cancel, true, RollingBack},
		{Copying, Done, false, CatchingUp},
		{Copying, Retry, false, Copying},
		{Copying, GiveUp, false, RollingBack},
		{Copying, Cancel, true, RollingBack},
		{CatchingUp, Done, false, Verified},
		{CatchingUp, Timeout, false, CatchingUp},
		{CatchingUp, Mismatch, false, RollingBack},
		{CatchingUp, Cancel, true, RollingBack},
		{Verified, Done, false, Frozen},
		{Verified, Retry, false, Verified},
		{Verified, Cancel, true, RollingBack},
		{Frozen, Done, false, CutOver},
		{Frozen, Timeout, false, Verified},
		{Frozen, Retry, false, Frozen},
		{Frozen, Cancel, true, RollingBack},
		{Frozen, GiveUp, false, RollingBack},
		{CutOver, Done, false, CleanedUp},
		{CutOver, Retry, false, CutOver},
		{CutOver, Cancel, true, CutOver}, // past the point of no return
		{CutOver, GiveUp, false, CutOver},
		{RollingBack, Done, false, Failed},
		{RollingBack, Done, true, Cancelled},
		{RollingBack, Forward, true, Frozen},
		{RollingBack, Retry, false, RollingBack},
		{CleanedUp, Done, false, CleanedUp},
		{Failed, Done, false, Failed},
		{Cancelled, Cancel, true, Cancelled},
	}
	for _, c := range cases {
		if got := Next(c.s, c.out, c.cancelled); got != c.want {
			t.Errorf("Next(%s, %s, cancelled=%v) = %s, want %s", c.s, c.out, c.cancelled, got, c.want)
		}
	}
}

func TestActions(t *testing.T) {
	cases := []struct {
		s             State
		cancel, moved bool
		want          []Action
		out           Outcome
	}{
		{Planned, false, false, nil, Done},
		{Copying, false, false, copyActions, Done},
		{Copying, true, false, nil, Cancel},
		{CatchingUp, false, false, catchUpActions, Done},
		{CatchingUp, true, false, []Action{Unfreeze}, Cancel},
		{Verified, false, false, prepareActions, Done},
		{Frozen, false, false, cutOverActions, Done},
		{Frozen, false, true, rollForwardActions, Done},
		{Frozen, true, false, []Action{Unfreeze}, Cancel},
		{Frozen, true, true, rollForwardActions, Done}, // cancel comes too late
		{CutOver, false, false, cleanupActions, Done},
		{CutOver, true, false, cleanupActions, Done},
		{RollingBack, true, false, rollbackActions, Done},
		{RollingBack, false, true, nil, Forward},
	}
	for _, c := range cases {
		if got := Actions(c.s, c.cancel, c.moved); !slices.Equal(got, c.want) {
			t.Errorf("Actions(%s, cancel=%v, moved=%v) = %v, want %v", c.s, c.cancel, c.moved, got, c.want)
		}
		if got := SuccessOutcome(c.s, c.cancel, c.moved); got != c.out {
			t.Errorf("SuccessOutcome(%s, cancel=%v, moved=%v) = %s, want %s", c.s, c.cancel, c.moved, got, c.out)
		}
	}
	if acts, out := OnTimeout(Frozen, false); !slices.Equal(acts, []Action{Unfreeze}) || out != Timeout {
		t.Errorf("OnTimeout(Frozen, not moved) = %v, %s", acts, out)
	}
	if acts, out := OnTimeout(Frozen, true); acts != nil || out != Retry {
		t.Errorf("OnTimeout(Frozen, moved) = %v, %s", acts, out)
	}
	if acts, out := OnTimeout(CatchingUp, false); !slices.Equal(acts, []Action{Unfreeze}) || out != Timeout {
		t.Errorf("OnTimeout(CatchingUp) = %v, %s", acts, out)
	}
}

// world is a simulated move of one batch: what the source, the target and
// the catalog hold, and the data as a version that writers bump. It checks
// the invariants a move must keep after every action.
type world struct {
	t *testing.T

	src      string // source's ownership: owned, frozen, moved, "" (row deleted)
	tgt      string // target's ownership: "" or owned
	catalog  string // owner in the catalog: source or target
	recorded State  // the move's state in the catalog

	pub, slot, sub   bool // replication objects
	srcRows, tgtRows bool // who holds a copy of the rows
	srcVer, tgtVer   int  // data versions: the target follows while subscribed
	snapSrc, snapTgt int  // the versions the verification's snapshots saw

	// Faults to inject.
	slowMarkers int  // this many markers time out
	mismatch    bool // the verification finds a difference
	log         []string
}

func newWorld(t *testing.T) *world {
	return &world{t: t, src: "owned", catalog: "source", recorded: Planned, srcRows: true, srcVer: 1}
}

func (w *world) fail(format string, args ...any) {
	w.t.Helper()
	w.t.Fatalf("%s\nafter: %v", fmt.Sprintf(format, args...), w.log)
}

// write is a client's write, routed by the catalog as a router would be,
// refused where the owner does not take writes.
func (w *world) write() {
	switch {
	case w.catalog == "source" && w.src == "owned":
		w.srcVer++
	case w.catalog == "target" && w.tgt == "owned":
		w.tgtVer++
	}
}

// replicate is the subscription applying what the source committed.
func (w *world) replicate() {
	if w.pub && w.slot && w.sub && w.tgtRows {
		w.tgtVer = w.srcVer
	}
}

// do runs one action; it reports a marker timeout or a mismatch.
func (w *world) do(a Action) (timeout, mismatch bool) {
	w.log = append(w.log, string(a))
	switch a {
	case DropSubscription:
		w.sub = false
	case DropSlot:
		w.slot = false
	case DropPublication:
		w.pub = false
	case ClearTarget:
		if w.sub {
			w.fail("target cleared while subscribed: the stream would refill it")
		}
		if w.tgt == "owned" {
			w.fail("target cleared while it owns the partitions")
		}
		w.tgtRows, w.tgtVer = false, 0
	case Publish:
		w.pub = true
	case Copy:
		if w.tgtRows {
			w.fail("copy onto a target that holds rows")
		}
		w.slot, w.tgtRows, w.tgtVer = true, true, w.srcVer
	case Subscribe:
		if !w.slot || !w.pub {
			w.fail("subscribe without slot or publication")
		}
		w.sub = true
	case AwaitCatchUp:
		w.replicate()
	case Freeze:
		if w.src != "owned" && w.src != "frozen" {
			w.fail("freeze of a source in state %q", w.src)
		}
		w.src = "frozen"
	case Marker:
		if w.slowMarkers > 0 {
			w.slowMarkers--
			return true, false
		}
		w.replicate()
	case Snapshot:
		w.snapSrc, w.snapTgt = w.srcVer, w.tgtVer
	case Compare:
		if w.mismatch {
			w.mismatch = false
			return false, true
		}
		if w.snapSrc != w.snapTgt {
			w.fail("verification compared snapshots of different points: source %d, target %d", w.snapSrc, w.snapTgt)
		}
	case Unfreeze:
		if w.src == "frozen" {
			w.src = "owned"
		}
	case MarkMoved:
		if w.src != "frozen" && w.src != "moved" {
			w.fail("mark moved of a source in state %q", w.src)
		}
		w.src = "moved"
	case OwnTarget:
		if w.src != "moved" {
			w.fail("target owns while the source is %q", w.src)
		}
		if w.tgtVer != w.srcVer {
			w.fail("target owns at version %d, the source acknowledged %d: writes lost", w.tgtVer, w.srcVer)
		}
		w.tgt = "owned"
	case Flip:
		if w.tgt != "owned" || w.src != "moved" {
			w.fail("catalog flipped with target %q, source %q", w.tgt, w.src)
		}
		w.catalog = "target"
		w.recorded = CutOver // in the same transaction
	case DeleteSource:
		if w.sub || w.pub || w.slot {
			w.fail("source rows deleted while replicating: the deletes would travel")
		}
		if w.src == "owned" || w.src == "frozen" || w.catalog != "target" {
			w.fail("source rows deleted while it serves them (%q, catalog %s)", w.src, w.catalog)
		}
		w.srcRows, w.src = false, ""
	default:
		w.fail("unknown action %s", a)
	}
	return false, false
}

// checkEnd fails unless the world is consistent for a move that ended in
// state s: everything at the target and nothing left at the source, or
// the other way round, with no replication object anywhere.
func (w *world) checkEnd(s State) {
	w.t.Helper()
	if w.pub || w.slot || w.sub {
		w.fail("ended %s with replication objects: pub %v slot %v sub %v", s, w.pub, w.slot, w.sub)
	}
	switch s {
	case CleanedUp:
		if w.catalog != "target" || w.tgt != "owned" || w.srcRows || w.src != "" || !w.tgtRows {
			w.fail("cleaned up but catalog %s, target %q, source rows %v/%q", w.catalog, w.tgt, w.srcRows, w.src)
		}
	case Failed, Cancelled:
		if w.catalog != "source" || w.src != "owned" || w.tgtRows || w.tgt != "" {
			w.fail("%s but catalog %s, source %q, target rows %v/%q", s, w.catalog, w.src, w.tgtRows, w.tgt)
		}
	default:
		w.fail("ended in non-terminal state %s", s)
	}
}

// run is an executor: it runs steps from the recorded state until the move
// ends, or crashes after crashAfter actions (counting from 0; -1: never).
// cancelAt cancels the rebalance once that many actions ran (-1: never).
// It reports whether it crashed.
func (w *world) run(crashAfter, cancelAt int, actions *int) (crashed bool) {
	for !w.recorded.Terminal() {
		cancel := cancelAt >= 0 && *actions >= cancelAt
		s := w.recorded
		moved := false
		if ChecksSource(s) {
			if *actions == crashAfter {
				return true
			}
			*actions++
			w.write()
			moved = w.src == "moved"
		}
		out := SuccessOutcome(s, cancel, moved)
		for _, a := range Actions(s, cancel, moved) {
			if *actions == crashAfter {
				return true
			}
			*actions++
			w.write()
			timeout, mismatch := w.do(a)
			if timeout {
				var comp []Action
				comp, out = OnTimeout(s, moved)
				for _, c := range comp {
					w.do(c)
				}
				break
			}
			if mismatch {
				out = Mismatch
				break
			}
		}
		w.write()
		if next := Next(s, out, cancel); w.recorded == s { // Flip may have recorded already
			w.recorded = next
		}
	}
	return false
}

// finish runs executors, each crashing once at the given points, then one
// that does not crash, and checks the end.
func (w *world) finish(crashes []int, cancelAt int) State {
	actions := 0
	for _, at := range crashes {
		if !w.run(at, cancelAt, &actions) {
			break
		}
		w.log = append(w.log, "CRASH")
	}
	w.run(-1, cancelAt, &actions)
	w.checkEnd(w.recorded)
	return w.recorded
}

// totalActions counts the actions of an undisturbed move.
func totalActions(t *testing.T) int {
	w := newWorld(t)
	n := 0
	w.run(-1, -1, &n)
	return n
}

// A move killed after any one of its actions, and the next executor
// resuming from the recorded state, ends cleaned up; so does one killed
// twice, at any two points; a marker that times out is retried.
func TestMoveSurvivesACrashAtEveryPoint(t *testing.T) {
	n := totalActions(t)
	if n < 20 {
		t.Fatalf("an undisturbed move runs %d actions; the simulation looks broken", n)
	}
	for i := 0; i <= n; i++ {
		if got := newWorld(t).finish([]int{i}, -1); got != CleanedUp {
			t.Fatalf("crash after %d actions: ended %s", i, got)
		}
		for j := i; j <= n+5; j += 3 {
			if got := newWorld(t).finish([]int{i, j}, -1); got != CleanedUp {
				t.Fatalf("crashes after %d and %d actions: ended %s", i, j, got)
			}
		}
		w := newWorld(t)
		w.slowMarkers = 2
		if got := w.finish([]int{i}, -1); got != CleanedUp {
			t.Fatalf("slow markers, crash after %d: ended %s", i, got)
		}
	}
}

// A cancel at any point rolls the move back unless it came after the
// source gave the partitions away; either way the move ends consistent,
// also when the executor crashes on the way.
func TestCancelAtEveryPoint(t *testing.T) {
	n := totalActions(t)
	ended := map[State]int{}
	for c := 0; c <= n; c++ {
		for _, crash := range []int{-1, c, c + 1, c + 3} {
			got := newWorld(t).finish([]int{crash}, c)
			ended[got]++
		}
	}
	if ended[Cancelled] == 0 || ended[CleanedUp] == 0 {
		t.Fatalf("cancels ended %v: want both cancelled and cleaned-up moves", ended)
	}
}

// A verification that finds a difference rolls the move back, leaving
// the source the owner.
func TestMismatchRollsBack(t *testing.T) {
	for i := -1; i <= totalActions(t); i += 2 {
		w := newWorld(t)
		w.mismatch = true
		if got := w.finish([]int{i}, -1); got != Failed && got != CleanedUp {
			t.Fatalf("mismatch, crash after %d: ended %s", i, got)
		}
	}
	w := newWorld(t)
	w.mismatch = true
	if got := w.finish(nil, -1); got != Failed {
		t.Fatalf("mismatch: ended %s, want failed", got)
	}
}
