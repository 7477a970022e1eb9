package events

import (
	"context"
	"log/slog"
	"strconv"
	"strings"
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
// instance's relays listen on. A wake-up names the partitions written when
// the writer knows them ("shard-0:12,40"), so the relay reads only those
// (see Relay.relay); a bare name means any. A wake-up that is lost (Redis
// down, a message dropped) or names too little costs latency, not events:
// relays also poll, quickly after activity and at most PollInterval apart.

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
	local   func(name string, streams []int32) bool // wakes a leading relay here; false if none
	log     *slog.Logger

	mu      sync.Mutex
	pending map[string]*wakeSet
	kick    chan struct{}
	stop    context.CancelFunc
	done    chan struct{}

	published, failed atomic.Int64
}

// wakeSet is what wake-ups of one database said: the partitions they
// named, or that any may have rows (all). The Waker keeps one per
// database until it is sent, a Relay one until its next read.
type wakeSet struct {
	all   bool
	parts map[int32]struct{}
}

// add records a wake-up for streams; nil means any.
func (ws *wakeSet) add(streams []int32) {
	switch {
	case streams == nil:
		ws.all, ws.parts = true, nil
	case !ws.all:
		if ws.parts == nil {
			ws.parts = make(map[int32]struct{}, len(streams))
		}
		for _, p := range streams {
			ws.parts[p] = struct{}{}
		}
	}
}

// NewWaker returns a Waker publishing on rc under prefix (DefaultPrefix if
// empty). local, if set, is asked first (with the partitions written, nil
// for any) and returns whether a relay of this instance took the
// wake-up. Close stops it.
func NewWaker(rc rueidis.Client, prefix string, local func(name string, streams []int32) bool, log *slog.Logger) *Waker {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if log == nil {
		log = slog.Default()
	}
	ctx, stop := context.WithCancel(context.Background())
	w := &Waker{rc: rc, channel: wakeChannel(prefix), local: local, log: log,
		pending: map[string]*wakeSet{}, kick: make(chan struct{}, 1), stop: stop, done: make(chan struct{})}
	go w.publish(ctx)
	return w
}

// Wake says that the outbox of database name (a shard's name, or
// ConfigWake) has rows a relay should publish. Call it after the write
// committed.
func (w *Waker) Wake(name string) { w.wake(name, -1) }

// WakePartition is Wake for rows of one partition of shard name: the relay
// reads that partition only.
func (w *Waker) WakePartition(name string, partition int32) { w.wake(name, partition) }

// wake wakes name's relay for partition, or for any if it is negative.
func (w *Waker) wake(name string, partition int32) {
	if w == nil {
		return
	}
	var streams []int32
	if partition >= 0 {
		streams = []int32{partition}
	}
	if w.local != nil && w.local(name, streams) {
		return
	}
	w.mu.Lock()
	ws := w.pending[name]
	if ws == nil {
		ws = &wakeSet{}
		w.pending[name] = ws
	}
	ws.add(streams)
	if len(ws.parts) > maxWakePartitions {
		ws.add(nil)
	}
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
		msgs := make([]string, 0, len(w.pending))
		for n, pw := range w.pending {
			msgs = append(msgs, formatWake(n, pw))
		}
		clear(w.pending)
		w.mu.Unlock()
		cmds := make(rueidis.Commands, len(msgs))
		for i, m := range msgs {
			cmds[i] = w.rc.B().Publish().Channel(w.channel).Message(m).Build()
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

// maxWakePartitions caps the partitions one wake-up message names; past
// it, the message names none (any), and the relay reads every partition.
const maxWakePartitions = 256

// formatWake is the message of a pending wake-up: the name, then ':' and
// the partitions (a shard name holds no ':', nor does ConfigWake).
func formatWake(name string, ws *wakeSet) string {
	if ws.all || len(ws.parts) == 0 {
		return name
	}
	b := make([]byte, 0, len(name)+1+6*len(ws.parts))
	b = append(b, name...)
	sep := byte(':')
	for p := range ws.parts {
		b = append(b, sep)
		b = strconv.AppendInt(b, int64(p), 10)
		sep = ','
	}
	return string(b)
}

// parseWake reads a wake-up message. Anyone who can publish on the channel
// can send one, so a malformed list reads as "any partition" (a wasted
// read, never a missed one), and so does one naming too many.
func parseWake(msg string) (name string, streams []int32) {
	name, list, ok := strings.Cut(msg, ":")
	if !ok || list == "" {
		return name, nil
	}
	for f := range strings.SplitSeq(list, ",") {
		p, err := strconv.ParseInt(f, 10, 32)
		if err != nil || p < 0 || len(streams) == maxWakePartitions {
			return name, nil
		}
		streams = append(streams, int32(p))
	}
	return name, streams
}

// listenWakes subscribes to the wake-up channel until ctx ends, handing
// every message to wake; it resubscribes after a lost connection.
func listenWakes(ctx context.Context, rc rueidis.Client, prefix string, wake func(name string, streams []int32), log *slog.Logger) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	channel := wakeChannel(prefix)
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := rc.Receive(ctx, rc.B().Subscribe().Channel(channel).Build(), func(m rueidis.PubSubMessage) {
			wake(parseWake(m.Message))
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
