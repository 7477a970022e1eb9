package mover_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// The machinery of the fault tests: where a move is in its step (from the
// calls of ExecutorOptions.BeforeAction), hooks that hold or kill an
// executor there, and a workload whose failed calls are judged at the end
// instead of failing the test at once.

// point is one action of a move's step: the Index-th action of
// mover.Actions(State, false, false), the list a move runs when nothing
// is cancelled.
type point struct {
	State mover.State
	Index int
}

func (p point) Action() mover.Action { return mover.Actions(p.State, false, false)[p.Index] }

// String names the point by state and action, numbering an action that
// appears more than once in its state's list: catching_up:unfreeze#2.
func (p point) String() string {
	acts := mover.Actions(p.State, false, false)
	a := acts[p.Index]
	s := fmt.Sprintf("%s:%s", p.State, a)
	if n := countOf(acts, a); n > 1 {
		s += fmt.Sprintf("#%d", countOf(acts[:p.Index+1], a))
	}
	return s
}

func countOf(acts []mover.Action, a mover.Action) int {
	n := 0
	for _, x := range acts {
		if x == a {
			n++
		}
	}
	return n
}

// normalPoints lists every action a move runs from planned to cleaned up
// when nothing fails, walking the machine: the kill matrix follows it as
// the machine changes.
func normalPoints() []point {
	var out []point
	s := mover.Planned
	for range 20 { // a guard: the machine's normal path is short
		if s.Terminal() {
			return out
		}
		for i := range mover.Actions(s, false, false) {
			out = append(out, point{s, i})
		}
		next := mover.Next(s, mover.SuccessOutcome(s, false, false), false)
		if next == s {
			break
		}
		s = next
	}
	panic(fmt.Sprintf("the machine's normal path does not end (at %s)", s))
}

// rollbackPoints lists the actions of a rollback.
func rollbackPoints() []point {
	var out []point
	for i := range mover.Actions(mover.RollingBack, true, false) {
		out = append(out, point{mover.RollingBack, i})
	}
	return out
}

// findPoint returns the point of pts named name (see point.String).
func findPoint(pts []point, name string) (point, bool) {
	i := slices.IndexFunc(pts, func(p point) bool { return p.String() == name })
	if i < 0 {
		return point{}, false
	}
	return pts[i], true
}

// stepTracker follows where each move is in its step, from the calls of
// BeforeAction: a step runs its state's actions in order, from the first.
type stepTracker struct {
	mu sync.Mutex
	at map[int64]point
}

// next records that move is about to run action a in state s and returns
// its point; Index is -1 for an action off the normal list (a rollback's
// roll-forward, a cancelled step).
func (t *stepTracker) next(move int64, s mover.State, a mover.Action) point {
	acts := mover.Actions(s, false, false)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.at == nil {
		t.at = map[int64]point{}
	}
	prev, ok := t.at[move]
	p := point{s, -1}
	switch {
	case ok && prev.State == s && prev.Index+1 < len(acts) && acts[prev.Index+1] == a:
		p.Index = prev.Index + 1
	case len(acts) > 0 && acts[0] == a:
		p.Index = 0 // a step begins
	}
	t.at[move] = p
	return p
}

// gate holds the first n moves that reach point p until it is opened.
type gate struct {
	p    point
	n    int
	open chan struct{}

	mu   sync.Mutex
	held []int64 // the moves held, in order of arrival
}

func newGate(p point, n int) *gate {
	return &gate{p: p, n: n, open: make(chan struct{})}
}

// moves returns the moves held so far.
func (g *gate) moves() []int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.held)
}

func (g *gate) wait(ctx context.Context, move int64, at point) error {
	if at != g.p {
		return nil
	}
	g.mu.Lock()
	if slices.Contains(g.held, move) || len(g.held) >= g.n {
		g.mu.Unlock()
		return nil
	}
	g.held = append(g.held, move)
	g.mu.Unlock()
	select {
	case <-g.open:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// errKilled is what a killed executor's hook answers.
var errKilled = errors.New("executor killed by the fault test")

// script is the BeforeAction hook of one executor: it holds moves at a
// gate, if any, and kills the executor before the action at kill, if set.
// Once killed, the executor fails before every action, so it makes no
// progress even if it takes the lock again before the test stops it.
type script struct {
	steps  stepTracker
	gate   *gate
	kill   *point
	killed chan struct{} // closed when the kill fires
	dead   atomic.Bool
}

func newScript(g *gate, kill *point) *script {
	return &script{gate: g, kill: kill, killed: make(chan struct{})}
}

func (sc *script) hook(ctx context.Context, move int64, s mover.State, a mover.Action) error {
	at := sc.steps.next(move, s, a)
	if sc.dead.Load() {
		return errKilled
	}
	if sc.gate != nil {
		if err := sc.gate.wait(ctx, move, at); err != nil {
			return err
		}
	}
	if sc.kill != nil && at == *sc.kill && sc.dead.CompareAndSwap(false, true) {
		close(sc.killed)
		return errKilled
	}
	if sc.dead.Load() {
		return errKilled
	}
	return nil
}

// callFailure is a client call that failed.
type callFailure struct {
	at   time.Time
	op   string
	user string
	err  error
}

// load drives a workload (see rebalance_test.go) for a fault test:
// writers, a reader and a watch. Failed calls are recorded, to be judged
// by the test once it knows which outages it caused; the watch's failures
// fail the workload's check as usual.
type load struct {
	w    *workload
	pace time.Duration // pause between a writer's users: a light load

	stopLoad, stopWatch context.CancelFunc
	wg, watching        sync.WaitGroup

	mu       sync.Mutex
	failures []callFailure
}

// startLoad creates the workload's users through data, opens the watch on
// watch, and starts a writer on each of writers and a reader on data.
func startLoad(w *workload, data pb.DataServiceClient, watch pb.DataServiceClient, writers []pb.DataServiceClient) *load {
	t := w.t
	t.Helper()
	l := &load{w: w, pace: 2 * time.Millisecond}
	wctx, stopWatch := context.WithCancel(context.Background())
	l.stopWatch = stopWatch
	ready := make(chan struct{})
	l.watching.Go(func() { w.watch(wctx, watch, ready) })
	<-ready
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, u := range w.users {
		r, err := data.PutUser(ctx, &pb.PutUserRequest{UserId: u, ProfileJson: `{"n": 0}`})
		if err != nil {
			t.Fatal(err)
		}
		w.ack("user/"+u, r.GetVersion(), `{"n": 0}`)
	}
	lctx, stopLoad := context.WithCancel(context.Background())
	l.stopLoad = stopLoad
	for i, c := range writers {
		var mine []string
		for j := i; j < len(w.users); j += len(writers) {
			mine = append(mine, w.users[j])
		}
		l.wg.Go(func() { l.write(lctx, c, mine) })
	}
	l.wg.Go(func() { l.read(lctx, data) })
	return l
}

func (l *load) failed(op, user string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.failures = append(l.failures, callFailure{at: time.Now(), op: op, user: user, err: err})
}

// write runs one writer over its users. Once ctx ends it finishes with a
// round in which every write succeeded, so that each key's last write is
// acknowledged and the check knows its value.
func (l *load) write(ctx context.Context, data pb.DataServiceClient, mine []string) {
	w := l.w
	var giveUp time.Time
	for n := 1; ; n++ {
		clean := true
		for _, u := range mine {
			cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			profile := fmt.Sprintf(`{"n": %d}`, n)
			w.calls.Add(1)
			r, err := data.PutUser(cctx, &pb.PutUserRequest{UserId: u, ProfileJson: profile})
			if err != nil {
				cancel()
				l.failed("put user", u, err)
				clean = false
				continue
			}
			w.ack("user/"+u, r.GetVersion(), profile)
			value := fmt.Sprintf(`"v%d"`, n)
			w.calls.Add(1)
			ri, err := data.PutItem(cctx, &pb.PutItemRequest{UserId: u, Collection: "c", Key: "k", ValueJson: value})
			if err != nil {
				cancel()
				l.failed("put item", u, err)
				clean = false
				continue
			}
			w.ack("item/"+u, ri.GetVersion(), value)
			if n%4 == 0 {
				w.calls.Add(1)
				s, err := data.CreateSession(cctx, &pb.CreateSessionRequest{UserId: u, DataJson: `{}`, TtlSeconds: 3600})
				if err != nil {
					l.failed("create session", u, err)
				} else {
					w.mu.Lock()
					w.tokens[u] = s.GetToken()
					w.mu.Unlock()
				}
			}
			cancel()
			time.Sleep(l.pace)
		}
		if ctx.Err() == nil {
			continue
		}
		if clean {
			return
		}
		if giveUp.IsZero() {
			giveUp = time.Now().Add(30 * time.Second)
		} else if time.Now().After(giveUp) {
			w.fail("writer", errors.New("no round of writes succeeded in the 30 s after the load stopped"))
			return
		}
	}
}

// read reads random users and their sessions until ctx ends.
func (l *load) read(ctx context.Context, data pb.DataServiceClient) {
	w := l.w
	for ctx.Err() == nil {
		u := w.users[rand.N(len(w.users))]
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		w.calls.Add(1)
		if _, err := data.GetUser(cctx, &pb.GetUserRequest{UserId: u}); err != nil {
			l.failed("get user", u, err)
		}
		w.mu.Lock()
		tok := w.tokens[u]
		w.mu.Unlock()
		if tok != "" {
			w.calls.Add(1)
			if _, err := data.GetSession(cctx, &pb.GetSessionRequest{Token: tok}); err != nil {
				l.failed("get session", u, err)
			}
		}
		cancel()
		time.Sleep(l.pace)
	}
}

// stop ends the writers (each after a clean round) and the reader; the
// watch goes on until finish.
func (l *load) stop() {
	l.stopLoad()
	l.wg.Wait()
}

// finish ends the watch.
func (l *load) finish() {
	l.stopWatch()
	l.watching.Wait()
}

// checkFailures fails the test for each failed call that excused does not
// excuse (nil excuses none), logs how many were excused and returns when
// the last of them failed.
func (l *load) checkFailures(excused func(callFailure) bool) time.Time {
	t := l.w.t
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	var last time.Time
	for _, f := range l.failures {
		if excused == nil || !excused(f) {
			t.Fatalf("%s of %s failed at %s (%d of %d calls failed): %v", f.op, f.user, f.at.Format("15:04:05.000"),
				len(l.failures), l.w.calls.Load(), f.err)
		}
		n++
		last = f.at
	}
	if n > 0 {
		t.Logf("%d of %d client calls failed, as expected during the outage", n, l.w.calls.Load())
	}
	return last
}
