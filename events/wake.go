package events

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// Wake-ups. A relay learns of new outbox rows from the instance that wrote
// them, not from a NOTIFY at commit: PostgreSQL serializes every notifying
// commit on a server (the notify queue's lock is held through the commit's
// WAL flush), which cost more than half of the write throughput. The
// writer's instance wakes its own relay in-process when that relay leads,
// and otherwise publishes the database's name on a Redis channel that every
// instance's relays listen on. A wake-up that is lost (Redis down, a
// message dropped) costs latency, not events: relays also poll, quickly
// after activity and at most PollInterval apart when idle.

// ConfigWake is the name a wake-up of the catalog's config outbox carries.
// It cannot be a shard's name (shard names hold no '#').
const ConfigWake = "#config"

// wakeChannel is the Pub/Sub channel of wake-ups under prefix.
func wakeChannel(prefix string) string { return prefix + "events:wake" }

// Waker sends wake-ups: in-process to a relay of this instance that leads,
// through Redis to whichever instance leads otherwise. Wake never blocks:
// wake-ups of one database coalesce while one is on its way.
type Waker struct {
	rc      rueidis.Client
	channel string
	local   func(name string) bool // wakes a leading relay here; false if none
	log     *slog.Logger

	mu      sync.Mutex
	pending map[string]bool
	kick    chan struct{}
	stop    context.CancelFunc
	done    chan struct{}

	published, failed atomic.Int64
}

// NewWaker returns a Waker publishing on rc under prefix (DefaultPrefix if
// empty). local, if set, is asked first and returns whether a relay of
// this instance took the wake-up. Close stops it.
func NewWaker(rc rueidis.Client, prefix string, local func(name string) bool, log *slog.Logger) *Waker {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if log == nil {
		log = slog.Default()
	}
	ctx, stop := context.WithCancel(context.Background())
	w := &Waker{rc: rc, channel: wakeChannel(prefix), local: local, log: log,
		pending: map[string]bool{}, kick: make(chan struct{}, 1), stop: stop, done: make(chan struct{})}
	go w.publish(ctx)
	return w
}

// Wake says that the outbox of database name (a shard's name, or
// ConfigWake) has rows a relay should publish. Call it after the write
// committed.
func (w *Waker) Wake(name string) {
	if w == nil {
		return
	}
	if w.local != nil && w.local(name) {
		return
	}
	w.mu.Lock()
	w.pending[name] = true
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// publishTimeout bounds one round of wake-up messages: a lost one only
// delays an event until the relay's next poll.
const publishTimeout = 250 * time.Millisecond

// publish sends the pending wake-ups, one message per database, all in one
// pipeline, while there are any.
func (w *Waker) publish(ctx context.Context) {
	defer close(w.done)
	var lastLog time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
		}
		w.mu.Lock()
		names := make([]string, 0, len(w.pending))
		for n := range w.pending {
			names = append(names, n)
		}
		clear(w.pending)
		w.mu.Unlock()
		cmds := make(rueidis.Commands, len(names))
		for i, n := range names {
			cmds[i] = w.rc.B().Publish().Channel(w.channel).Message(n).Build()
		}
		pctx, cancel := context.WithTimeout(ctx, publishTimeout)
		for _, res := range w.rc.DoMulti(pctx, cmds...) {
			if err := res.Error(); err != nil {
				w.failed.Add(1)
				if time.Since(lastLog) > 10*time.Second && ctx.Err() == nil {
					lastLog = time.Now()
					w.log.Warn("relay wake-up not sent; the relay will find the events at its next poll", "err", err)
				}
				continue
			}
			w.published.Add(1)
		}
		cancel()
	}
}

// Published and Failed count the wake-up messages sent through Redis and
// those that could not be.
func (w *Waker) Published() int64 { return w.published.Load() }

// Failed counts wake-up messages that could not be sent.
func (w *Waker) Failed() int64 { return w.failed.Load() }

// Close stops the Waker.
func (w *Waker) Close() {
	w.stop()
	<-w.done
}

// listenWakes subscribes to the wake-up channel until ctx ends, handing
// every message to wake; it resubscribes after a lost connection.
func listenWakes(ctx context.Context, rc rueidis.Client, prefix string, wake func(name string), log *slog.Logger) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	channel := wakeChannel(prefix)
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := rc.Receive(ctx, rc.B().Subscribe().Channel(channel).Build(), func(m rueidis.PubSubMessage) {
			wake(m.Message)
		})
		if ctx.Err() != nil {
			return
		}
		log.Debug("relay wake-up subscription lost; relays poll meanwhile", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}
