package shards

import (
	"context"
	"slices"
	"sync"
	"time"
)

// flushQueue is what group commit (groupcommit.go) and read batching
// (readbatch.go) share: callers' requests queue up, and flushers take
// batches of them until the queue is empty. Nobody waits for a batch to
// fill. One flusher runs while it keeps up, which makes the biggest
// batches; another starts only while more is queued than the running ones
// take in one batch each, or when no batch has finished for flushStall
// while requests wait.
type flushQueue[T queued] struct {
	maxFlushers, maxBatch int
	// fits reports whether r may join batch, which holds fewer than
	// maxBatch requests; nil lets every request join.
	fits func(batch []T, r T) bool
	// run answers a batch: it sets each request's outcome; the queue then
	// wakes their callers.
	run func(batch []T)
	// gaveUp is the error of a request whose caller gave up before a
	// flusher took it.
	gaveUp func(error) error

	mu       sync.Mutex
	queue    []T
	flushers int
	progress time.Time // when a flusher last started or finished a batch
}

// waiter is the part of a request the queue handles: its caller's context,
// its outcome and the channel closed once it is known.
type waiter struct {
	ctx  context.Context
	err  error
	done chan struct{}
}

func newWaiter(ctx context.Context) waiter { return waiter{ctx: ctx, done: make(chan struct{})} }

func (w *waiter) waiting() *waiter { return w }

// queued is a request type: a pointer to a struct embedding waiter.
type queued interface {
	comparable
	waiting() *waiter
}

// flushStall is how long the flushers may go without finishing a batch
// while requests wait before another flusher starts. A batch waiting for a
// lock (a partition being frozen, a user being deleted, a table locked)
// would otherwise hold up the whole shard's requests behind it.
const flushStall = 20 * time.Millisecond

// submit queues r and returns once a flusher has answered it (its err), or
// its caller gave up before a flusher took it (gaveUp's error).
func (q *flushQueue[T]) submit(r T) error {
	w := r.waiting()
	q.mu.Lock()
	q.queue = append(q.queue, r)
	if q.flushers == 0 || (q.flushers < q.maxFlushers && len(q.queue) > q.flushers*q.maxBatch) {
		q.startFlusher()
	}
	q.mu.Unlock()
	stall := time.NewTimer(flushStall)
	defer stall.Stop()
	for {
		select {
		case <-w.done:
			return w.err
		case <-w.ctx.Done():
			if q.remove(r) {
				return q.gaveUp(w.ctx.Err())
			}
			// A flusher has it: its outcome may still be written, so wait
			// for the end.
			<-w.done
			return w.err
		case <-stall.C:
			q.unstall(r)
			stall.Reset(flushStall)
		}
	}
}

// startFlusher starts one more flusher; q.mu is held.
func (q *flushQueue[T]) startFlusher() {
	q.flushers++
	q.progress = time.Now()
	go q.flushLoop()
}

// unstall starts another flusher if r is still queued and no batch has
// finished for flushStall.
func (q *flushQueue[T]) unstall(r T) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.flushers < q.maxFlushers && time.Since(q.progress) >= flushStall && slices.Contains(q.queue, r) {
		q.startFlusher()
	}
}

// remove takes r out of the queue if no flusher has taken it yet.
func (q *flushQueue[T]) remove(r T) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if i := slices.Index(q.queue, r); i >= 0 {
		q.queue = slices.Delete(q.queue, i, i+1)
		return true
	}
	return false
}

// flushLoop answers batches until the queue is empty.
func (q *flushQueue[T]) flushLoop() {
	for {
		batch := q.take()
		if batch == nil {
			return
		}
		q.run(batch)
		for _, r := range batch {
			close(r.waiting().done)
		}
		q.mu.Lock()
		q.progress = time.Now()
		q.mu.Unlock()
	}
}

// take removes the next batch from the queue: the oldest requests that
// fit, at most maxBatch. A request whose caller gave up is finished here.
// nil when the queue is empty, in which case the calling flusher is done.
func (q *flushQueue[T]) take() []T {
	q.mu.Lock()
	defer q.mu.Unlock()
	var batch []T
	rest := q.queue[:0]
	for _, r := range q.queue {
		w := r.waiting()
		switch {
		case w.ctx.Err() != nil:
			w.err = q.gaveUp(w.ctx.Err())
			close(w.done)
		case len(batch) < q.maxBatch && (q.fits == nil || q.fits(batch, r)):
			batch = append(batch, r)
		default:
			rest = append(rest, r)
		}
	}
	clear(q.queue[len(rest):])
	q.queue = rest
	if len(batch) == 0 {
		q.flushers--
		return nil
	}
	return batch
}

// batchContext bounds a batch by the latest deadline among its callers'
// contexts (none if one of them has none); a caller that gives up does not
// cancel its neighbours' statements.
func batchContext[T queued](batch []T) (context.Context, context.CancelFunc) {
	var latest time.Time
	for _, r := range batch {
		d, ok := r.waiting().ctx.Deadline()
		if !ok {
			return context.WithCancel(context.Background())
		}
		if d.After(latest) {
			latest = d
		}
	}
	return context.WithDeadline(context.Background(), latest)
}
