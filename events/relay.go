package events

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/pglock"
	"github.com/shardgate/shardgate/shards"
)

// RelayOptions tune a relay. The zero value of a field means its default;
// Redis is required.
type RelayOptions struct {
	Redis rueidis.Client
	// Prefix starts every Redis key (default DefaultPrefix).
	Prefix string
	// MaxLen is the approximate number of entries each stream keeps
	// (XADD MAXLEN ~; default 100000). Older entries are trimmed: a cursor
	// behind them gets ErrCursorExpired.
	MaxLen int64
	// BatchSize is the most outbox rows read, published and deleted at once
	// (default 500).
	BatchSize int
	// PollInterval is the longest a leading relay goes without reading its
	// outbox when no wake-up comes (default 500ms): the most a lost
	// wake-up delays an event. After a read that found events it polls
	// again after MinPollInterval, doubling while reads come back empty.
	PollInterval time.Duration
	// MinPollInterval is the first poll after activity (default 10ms).
	MinPollInterval time.Duration
	// ElectInterval is how often a relay that lost the election tries again
	// (default 1s, with jitter): the longest a dead relay goes unreplaced,
	// once Postgres has noticed its connection is gone.
	ElectInterval time.Duration
	// MaxPayloadBytes caps the payload copied into a stream entry (default
	// 64 KiB); a larger one is left out and the entry says so. Negative:
	// never copy payloads.
	MaxPayloadBytes int
	// Invalidate, if set, is called with each batch after it is in Redis
	// and before it is marked delivered, so the caller can drop cache
	// entries the changes made stale. An error leaves the batch
	// undelivered; it is published again (deduplicated by Redis) and
	// handed over again after a pause.
	Invalidate func(ctx context.Context, evs []Event) error
	// Tracer, if set, records a span per delivered batch; nil: none.
	Tracer trace.Tracer
	// Retention is how long delivered events stay in the outbox (default
	// DefaultRetention; negative: for good), so a stream Redis lost can be
	// published again and a Watch cursor older than the stream is served
	// from Postgres. The leading relay prunes older ones every
	// PruneInterval (default a minute, or Retention/4 if shorter).
	Retention     time.Duration
	PruneInterval time.Duration
	// ReconcileInterval is how often the leading relay checks every stream
	// it has delivered to against its delivered tick, publishing the
	// retained events again into a stream Redis lost (default 5s). A
	// stream that gets new events is checked as they are published too.
	ReconcileInterval time.Duration
	Logger            *slog.Logger
}

// DefaultMaxPayloadBytes is RelayOptions.MaxPayloadBytes's default.
const DefaultMaxPayloadBytes = 64 << 10

// DefaultRetention is RelayOptions.Retention's default.
const DefaultRetention = 24 * time.Hour

func (o RelayOptions) withDefaults() RelayOptions {
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if o.MaxLen <= 0 {
		o.MaxLen = 100000
	}
	if o.BatchSize <= 0 {
		o.BatchSize = 500
	}
	if o.PollInterval <= 0 {
		o.PollInterval = 500 * time.Millisecond
	}
	if o.MinPollInterval <= 0 {
		o.MinPollInterval = 10 * time.Millisecond
	}
	o.MinPollInterval = min(o.MinPollInterval, o.PollInterval)
	if o.ElectInterval <= 0 {
		o.ElectInterval = time.Second
	}
	if o.MaxPayloadBytes == 0 {
		o.MaxPayloadBytes = DefaultMaxPayloadBytes
	}
	if o.Retention == 0 {
		o.Retention = DefaultRetention
	}
	if o.PruneInterval <= 0 {
		o.PruneInterval = time.Minute
		if o.Retention > 0 {
			o.PruneInterval = min(o.PruneInterval, max(o.Retention/4, 10*time.Millisecond))
		}
	}
	if o.ReconcileInterval <= 0 {
		o.ReconcileInterval = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// RelayApplicationName names a relay's connection in pg_stat_activity.
const RelayApplicationName = "shardgate-relay"

// source is what differs between a shard's outbox and the config outbox.
type source struct {
	what    string // for logs and errors
	lockKey int32
	outbox  outbox
}

// outbox reads a relay's rows and records what it delivered; the SQL lives
// with the database's own package (shards, catalog).
type outbox interface {
	// read appends to evs the undelivered events after `after` and before
	// end, at most limit, with payloads capped at maxPayload (see
	// RelayOptions).
	read(ctx context.Context, conn *pgx.Conn, after, end Position, limit, maxPayload int, evs []Event) ([]Event, error)
	// readStreams is read for the undelivered events of streams only (in
	// stream order, each from its delivered tick), at most limit.
	readStreams(ctx context.Context, conn *pgx.Conn, streams []int32, limit, maxPayload int, evs []Event) ([]Event, error)
	// retained appends to evs the events of stream, delivered or not, with
	// after < tick <= upTo, at most limit.
	retained(ctx context.Context, conn *pgx.Conn, stream int32, after, upTo int64, limit, maxPayload int, evs []Event) ([]Event, error)
	// markDelivered records each stream's delivered tick.
	markDelivered(ctx context.Context, conn *pgx.Conn, upTo map[int32]int64) error
	// delivered returns the streams' delivered ticks (those above 0).
	delivered(ctx context.Context, conn *pgx.Conn) (map[int32]int64, error)
	// prune deletes delivered events committed before cutoff (see
	// shards.PruneOutbox).
	prune(ctx context.Context, conn *pgx.Conn, cutoff time.Time, after int64, window int) (deleted, next int64, err error)
}

func shardSource() source {
	return source{what: "shard outbox", lockKey: pglock.KeyRelayShard, outbox: &shardOutbox{}}
}

// The config outbox has a single stream, ConfigStream: quarantining it
// holds back every config event.
func configSource() source {
	return source{what: "config outbox", lockKey: pglock.KeyRelayConfig, outbox: &configOutbox{}}
}

// shardOutbox is a shard's outbox. rows is a buffer its reads reuse (a
// relay reads from one goroutine).
type shardOutbox struct{ rows []shards.OutboxRow }

// ShardEvent is the event of a shard's outbox row.
func ShardEvent(r *shards.OutboxRow) Event {
	return Event{ID: r.EventID, Partition: r.Partition, Tick: r.Tick, UserID: r.UserID,
		Entity: r.Entity, Key: r.Key, Op: r.Op, Version: r.Version,
		Payload: r.Payload, Omitted: r.Omitted, CommittedAt: r.CommittedAt}
}

// ConfigEvent is the event of a config outbox row.
func ConfigEvent(r *catalog.ConfigOutboxRow) Event {
	return Event{ID: r.EventID, Partition: ConfigStream, Tick: r.Tick,
		Entity: EntityConfig, Key: r.Namespace + "/" + r.Key, Op: r.Op, Version: r.Version,
		Payload: r.Payload, Omitted: r.Omitted, CommittedAt: r.CommittedAt}
}

func (o *shardOutbox) read(ctx context.Context, conn *pgx.Conn, after, end Position, limit, maxPayload int, evs []Event) ([]Event, error) {
	rows, err := shards.ReadOutbox(ctx, conn, shards.OutboxPos{Partition: after.Stream, Tick: after.Tick},
		shards.OutboxPos{Partition: end.Stream, Tick: end.Tick}, limit, maxPayload, o.rows[:0])
	return o.appendEvents(evs, rows, err)
}

func (o *shardOutbox) readStreams(ctx context.Context, conn *pgx.Conn, streams []int32, limit, maxPayload int, evs []Event) ([]Event, error) {
	rows, err := shards.ReadOutboxPartitions(ctx, conn, streams, limit, maxPayload, o.rows[:0])
	return o.appendEvents(evs, rows, err)
}

// appendEvents appends the events of rows (a read into o.rows's buffer
// that returned err) to evs, and keeps the buffer for the next read, not
// the payloads.
func (o *shardOutbox) appendEvents(evs []Event, rows []shards.OutboxRow, err error) ([]Event, error) {
	defer func() { o.rows = rows; clear(rows) }()
	if err != nil {
		return nil, err
	}
	for i := range rows {
		evs = append(evs, ShardEvent(&rows[i]))
	}
	return evs, nil
}

func (o *shardOutbox) retained(ctx context.Context, conn *pgx.Conn, stream int32, after, upTo int64, limit, maxPayload int, evs []Event) ([]Event, error) {
	rows, err := shards.ReadRetained(ctx, conn, stream, after, upTo, limit, maxPayload, nil)
	if err != nil {
		return nil, err
	}
	for i := range rows {
		evs = append(evs, ShardEvent(&rows[i]))
	}
	return evs, nil
}

func (o *shardOutbox) markDelivered(ctx context.Context, conn *pgx.Conn, upTo map[int32]int64) error {
	parts := make([]int32, 0, len(upTo))
	ticks := make([]int64, 0, len(upTo))
	for p, t := range upTo {
		parts, ticks = append(parts, p), append(ticks, t)
	}
	return shards.MarkDelivered(ctx, conn, parts, ticks)
}

func (o *shardOutbox) delivered(ctx context.Context, conn *pgx.Conn) (map[int32]int64, error) {
	return shards.DeliveredTicks(ctx, conn)
}

func (o *shardOutbox) prune(ctx context.Context, conn *pgx.Conn, cutoff time.Time, after int64, window int) (int64, int64, error) {
	return shards.PruneOutbox(ctx, conn, cutoff, after, window)
}

// configOutbox is the catalog's config outbox; rows as in shardOutbox.
type configOutbox struct{ rows []catalog.ConfigOutboxRow }

// readStreams reads the one stream there is, whatever streams says.
func (o *configOutbox) readStreams(ctx context.Context, conn *pgx.Conn, _ []int32, limit, maxPayload int, evs []Event) ([]Event, error) {
	return o.read(ctx, conn, Position{Stream: math.MinInt32}, Position{Stream: math.MaxInt32, Tick: math.MaxInt64}, limit, maxPayload, evs)
}

func (o *configOutbox) read(ctx context.Context, conn *pgx.Conn, after, end Position, limit, maxPayload int, evs []Event) ([]Event, error) {
	// The part of ConfigStream between after and end, in ticks.
	from, before := int64(math.MinInt64), int64(math.MaxInt64)
	switch {
	case after.Stream > ConfigStream || end.Stream < ConfigStream:
		return evs, nil
	case after.Stream == ConfigStream:
		from = after.Tick
	}
	if end.Stream == ConfigStream {
		before = end.Tick
	}
	rows, err := catalog.ReadConfigOutbox(ctx, conn, from, before, limit, maxPayload, o.rows[:0])
	defer func() { o.rows = rows; clear(rows) }()
	if err != nil {
		return nil, err
	}
	for i := range rows {
		evs = append(evs, ConfigEvent(&rows[i]))
	}
	return evs, nil
}

func (o *configOutbox) retained(ctx context.Context, conn *pgx.Conn, stream int32, after, upTo int64, limit, maxPayload int, evs []Event) ([]Event, error) {
	rows, err := catalog.ReadConfigRetained(ctx, conn, after, upTo, limit, maxPayload, nil)
	if err != nil {
		return nil, err
	}
	for i := range rows {
		evs = append(evs, ConfigEvent(&rows[i]))
	}
	return evs, nil
}

func (o *configOutbox) markDelivered(ctx context.Context, conn *pgx.Conn, upTo map[int32]int64) error {
	return catalog.MarkConfigDelivered(ctx, conn, upTo[ConfigStream])
}

func (o *configOutbox) delivered(ctx context.Context, conn *pgx.Conn) (map[int32]int64, error) {
	t, err := catalog.ConfigDelivered(ctx, conn)
	if err != nil || t == 0 {
		return map[int32]int64{}, err
	}
	return map[int32]int64{ConfigStream: t}, nil
}

func (o *configOutbox) prune(ctx context.Context, conn *pgx.Conn, cutoff time.Time, after int64, window int) (int64, int64, error) {
	return catalog.PruneConfigOutbox(ctx, conn, cutoff, after, window)
}

// Relay publishes one database's outbox to Redis Streams. Run it on every
// instance: an advisory lock, held on the relay's own connection, makes
// exactly one of them active per database, and another takes over within
// ElectInterval of the holder's connection ending.
//
// A partition whose stream disagrees with its outbox clock (the stream
// holds another event at a tick the outbox hands out, or none though the
// tick lies within the stream) is quarantined: the leader stops publishing
// it and keeps its events in the outbox, while the other partitions flow
// on. Quarantine lasts while this relay leads; the next leader checks the
// partition again, so it resumes once an operator has repaired the clock.
type Relay struct {
	name   string
	dsn    string
	src    source
	opts   RelayOptions
	keys   Keys
	script script

	mu          sync.Mutex
	quarantined map[int32]bool // under mu; streams held back while leading

	// Owned by the leading relay's goroutine, reset each term: each
	// stream's delivered tick as far as this term knows (never above the
	// database's), and the delivered tick up to which a reset stream had
	// no retained events left to publish again (not checked again until
	// its delivered tick moves).
	delivered  map[int32]int64
	barren     map[int32]int64
	reconciled time.Time // the last reconcile

	republished atomic.Int64 // events published again into reset streams
	pruned      atomic.Int64 // delivered events pruned past the retention

	leading atomic.Bool
	wake    chan struct{} // a wake-up waiting for the relay's next wait
	woken   wakeSet       // under mu: what wake-ups said since the relay last took it
	reads   atomic.Int64  // outbox reads while leading
	// published counts events delivered (in Redis and marked delivered).
	published atomic.Int64
}

// Published counts the events this relay delivered.
func (r *Relay) Published() int64 { return r.published.Load() }

// Leading reports whether this relay holds its database's lock.
func (r *Relay) Leading() bool { return r.leading.Load() }

// Republished counts the events this relay published again into streams
// Redis had lost.
func (r *Relay) Republished() int64 { return r.republished.Load() }

// Pruned counts the delivered events this relay pruned past the retention.
func (r *Relay) Pruned() int64 { return r.pruned.Load() }

// takeWake returns and clears what wake-ups said since the last call: the
// streams they named, sorted, and whether one named none.
func (r *Relay) takeWake() (streams []int32, all bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	all = r.woken.all
	if !all && len(r.woken.parts) > 0 {
		streams = slices.Sorted(maps.Keys(r.woken.parts))
	}
	r.woken.all = false
	clear(r.woken.parts) // kept for the next wake-ups
	return streams, all
}

// Reads counts the relay's reads of its outbox (each a query or a few,
// one per stretch between quarantined partitions).
func (r *Relay) Reads() int64 { return r.reads.Load() }

// Wake tells a leading relay that its outbox has new rows, and reports
// whether it leads; a relay that does not lead ignores it.
func (r *Relay) Wake() bool { return r.WakeStreams(nil) }

// WakeStreams is Wake for new rows in streams only (a shard's partitions):
// the relay reads just those, not every stream's clock (see relay). Nil
// streams: any may have rows.
func (r *Relay) WakeStreams(streams []int32) bool {
	if !r.leading.Load() {
		return false
	}
	r.mu.Lock()
	r.woken.add(streams)
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default: // one is pending already
	}
	return true
}

// NewShardRelay returns a relay for the outbox of the shard database at dsn.
func NewShardRelay(name, dsn string, opts RelayOptions) *Relay {
	opts = opts.withDefaults()
	return &Relay{name: name, dsn: dsn, src: shardSource(), opts: opts, keys: Keys{opts.Prefix}, script: publishLua, wake: make(chan struct{}, 1)}
}

// NewConfigRelay returns a relay for the config outbox of the catalog
// database at dsn.
func NewConfigRelay(dsn string, opts RelayOptions) *Relay {
	opts = opts.withDefaults()
	return &Relay{name: "catalog", dsn: dsn, src: configSource(), opts: opts, keys: Keys{opts.Prefix}, script: publishLua, wake: make(chan struct{}, 1)}
}

// Run relays until ctx ends: it competes for the lock and, while it holds
// it, publishes. Errors (a lost connection, Redis down) are logged and
// retried; Run returns only ctx's error.
func (r *Relay) Run(ctx context.Context) error {
	log := r.opts.Logger.With("relay", r.name)
	for {
		leader, err := r.runOnce(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			log.Warn("event relay interrupted", "leader", leader, "err", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(r.electWait()):
		}
	}
}

// electWait is the pause before the next try for the lock; jitter spreads
// instances that lost together.
func (r *Relay) electWait() time.Duration {
	return r.opts.ElectInterval/2 + rand.N(r.opts.ElectInterval)
}

// runOnce connects, tries the lock until it gets it and then relays until
// an error. It reports whether it was the leader.
func (r *Relay) runOnce(ctx context.Context) (bool, error) {
	cfg, err := pglock.HolderConfig(r.dsn, RelayApplicationName)
	if err != nil {
		return false, fmt.Errorf("%s DSN: %w", r.src.what, err)
	}
	// The relay's only writes delete delivered rows. Losing the last few in
	// a crash means publishing them again, which Redis refuses as
	// duplicates; waiting for each delete's WAL flush would only add latency.
	cfg.RuntimeParams["synchronous_commit"] = "off"
	// The outbox read goes partition by partition from each one's
	// delivered tick (shards.ReadOutbox); with a bitmap scan Postgres reads
	// and sorts each partition's whole backlog before the limit applies,
	// which cost a draining relay more than half its throughput.
	cfg.RuntimeParams["enable_bitmapscan"] = "off"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	if err := pglock.AwaitSessionLock(ctx, conn, pglock.ClassRelay, r.src.lockKey, r.electWait); err != nil {
		return false, err
	}
	r.opts.Logger.Info("event relay elected", "relay", r.name)
	r.leading.Store(true)
	defer r.leading.Store(false)
	if r.opts.Retention > 0 {
		pctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { r.pruneLoop(pctx) })
		defer wg.Wait()
		defer stop()
	}
	return true, r.relay(ctx, conn)
}

// relay publishes until an error. A pass pages through the outbox in
// (partition, tick) order, going round from the start whenever a page comes
// back short, so a busy partition cannot starve the others. It waits for a
// wake-up (see Waker) after a pass found less than a page, for at most the
// poll interval: MinPollInterval after reads that found events, twice as
// long after each wait whose reads found none, up to PollInterval.
//
// A wake-up that names the partitions written (WakeStreams: the instance
// that acknowledged a write knows its partition) is answered by reading
// those partitions only. A pass reads every partition's clock row, about a
// thousand per shard, and a busy relay woken hundreds of times a second
// spent most of its database time there. A pass still runs when the timer
// ends a wait, when a wake-up names no partition, after a named read
// that filled a page, and at least every PollInterval while wake-ups keep
// coming: a wake-up that named too little (or was lost) delays an event
// by at most PollInterval, as a lost one always could.
func (r *Relay) relay(ctx context.Context, conn *pgx.Conn) error {
	// Each term checks every stream again, so one whose clock was repaired
	// meanwhile flows again; a follower holds nothing back.
	r.clearQuarantine()
	defer r.clearQuarantine()
	r.delivered, r.barren = map[int32]int64{}, map[int32]int64{}
	if err := r.reconcile(ctx, conn); err != nil {
		return err
	}
	r.reconciled = time.Now()
	full := true // the next read is a pass
	var lastPass time.Time
	poll := r.opts.MinPollInterval
	timer := time.NewTimer(poll)
	defer timer.Stop()
	for {
		read, found := false, false
		streams, all := r.takeWake()
		switch {
		case full || all || time.Since(lastPass) >= r.opts.PollInterval:
			// What the wake-ups just taken named committed before this
			// pass starts, so it reads it.
			n, err := r.pass(ctx, conn)
			if err != nil {
				return err
			}
			read, found = true, n > 0
			lastPass, full = time.Now(), false
		case len(streams) > 0:
			if err := r.maybeReconcile(ctx, conn); err != nil {
				return err
			}
			r.reads.Add(1)
			evs, err := r.fetchStreams(ctx, conn, streams)
			if err != nil {
				return err
			}
			if len(evs) > 0 {
				if err := r.deliver(ctx, conn, evs); err != nil {
					return err
				}
			}
			if len(evs) == r.opts.BatchSize {
				full = true // a backlog: page through it all
				continue
			}
			read, found = true, len(evs) > 0
		}

		switch {
		case found:
			poll = r.opts.MinPollInterval
		case read:
			poll = min(2*poll, r.opts.PollInterval)
		}
		timer.Reset(poll)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-r.wake:
			timer.Stop() // Go 1.23+: no stale tick remains after Stop
		case <-timer.C:
			full = true
		}
	}
}

// pass reads and delivers the undelivered events of every stream, a page
// at a time, until a read from the start comes back short. It returns how
// many it delivered.
func (r *Relay) pass(ctx context.Context, conn *pgx.Conn) (int, error) {
	start := Position{Stream: -2}
	pos := start
	n := 0
	for {
		// Also while busy: a stream that gets no new events is found
		// only here.
		if err := r.maybeReconcile(ctx, conn); err != nil {
			return n, err
		}
		r.reads.Add(1)
		evs, err := r.fetch(ctx, conn, pos)
		if err != nil {
			return n, err
		}
		if len(evs) > 0 {
			n += len(evs)
			if err := r.deliver(ctx, conn, evs); err != nil {
				return n, err
			}
		}
		if len(evs) == r.opts.BatchSize {
			last := evs[len(evs)-1]
			pos = Position{Stream: last.Partition, Tick: last.Tick}
			continue
		}
		if pos != start {
			pos = start
			continue
		}
		return n, nil
	}
}

// maybeReconcile reconciles when ReconcileInterval has passed since the
// last time.
func (r *Relay) maybeReconcile(ctx context.Context, conn *pgx.Conn) error {
	if time.Since(r.reconciled) < r.opts.ReconcileInterval {
		return nil
	}
	if err := r.reconcile(ctx, conn); err != nil {
		return err
	}
	r.reconciled = time.Now()
	return nil
}

// fetchStreams reads up to BatchSize undelivered events of streams (sorted),
// passing over quarantined ones.
func (r *Relay) fetchStreams(ctx context.Context, conn *pgx.Conn, streams []int32) ([]Event, error) {
	if held := r.Quarantined(); len(held) > 0 {
		streams = slices.DeleteFunc(streams, func(p int32) bool { return slices.Contains(held, p) })
		if len(streams) == 0 {
			return nil, nil
		}
	}
	return r.src.outbox.readStreams(ctx, conn, streams, r.opts.BatchSize, r.opts.MaxPayloadBytes, make([]Event, 0, min(r.opts.BatchSize, 64)))
}

// fetch reads up to BatchSize events after the position, in (partition,
// tick) order, passing over quarantined partitions. It reads the stretches
// between them as index ranges, one query each, so a quarantined backlog
// (which may grow large) is never scanned, as a filter on the partition
// would scan it on every read.
func (r *Relay) fetch(ctx context.Context, conn *pgx.Conn, after Position) ([]Event, error) {
	held := r.Quarantined() // ascending
	evs := make([]Event, 0, r.opts.BatchSize)
	for {
		if slices.Contains(held, after.Stream) {
			after.Tick = math.MaxInt64 // past the held stream's rows
		}
		end := Position{Stream: math.MaxInt32, Tick: math.MaxInt64}
		for _, q := range held {
			if q > after.Stream {
				end = Position{Stream: q} // ticks start at 1: before all of q
				break
			}
		}
		var err error
		if evs, err = r.src.outbox.read(ctx, conn, after, end, r.opts.BatchSize-len(evs), r.opts.MaxPayloadBytes, evs); err != nil {
			return nil, err
		}
		if len(evs) == r.opts.BatchSize || end.Stream == math.MaxInt32 {
			return evs, nil
		}
		after = end
	}
}

// deliver puts evs into their streams, hands them to Invalidate, then
// marks them delivered: an event counts as delivered only once it is in
// Redis. A stream that clashes with the outbox clock is quarantined: its
// event at the clashing tick and every later one stay undelivered,
// unpublished and not handed to Invalidate; the rest of the batch goes on.
// A stream found reset (Redis lost events it had delivered) first gets
// its retained events again.
func (r *Relay) deliver(ctx context.Context, conn *pgx.Conn, evs []Event) (err error) {
	if r.opts.Tracer != nil {
		var span trace.Span
		ctx, span = r.opts.Tracer.Start(ctx, "relay.publish", trace.WithAttributes(
			attribute.String("shardgate.relay", r.name), attribute.Int("shardgate.events", len(evs))))
		defer func() {
			if err != nil {
				span.RecordError(err)
				span.SetStatus(codes.Error, "")
			}
			span.End()
		}()
	}
	clashes, resets, err := r.publish(ctx, evs, true)
	if err != nil {
		return err
	}
	if len(resets) > 0 {
		again := make([]Event, 0, len(evs))
		n := 0
		for _, rs := range resets {
			k, err := r.republish(ctx, conn, rs.stream, rs.last)
			if err != nil {
				return err
			}
			n += k
		}
		r.logRepublished(len(resets), n)
		held := r.Quarantined()
		for _, e := range evs {
			if _, ok := resets[e.Partition]; ok && !slices.Contains(held, e.Partition) {
				again = append(again, e)
			}
		}
		// No check this time: the stream now ends at its delivered tick,
		// or at what the retention kept of it.
		if len(again) > 0 {
			more, _, err := r.publish(ctx, again, false)
			if err != nil {
				return err
			}
			clashes = append(clashes, more...)
		}
	}
	if len(clashes) > 0 || len(resets) > 0 {
		from := make(map[int32]int64, len(clashes)) // stream → first tick held back
		for _, c := range clashes {
			r.quarantine(c)
			from[c.ev.Partition] = c.ev.Tick
		}
		for _, p := range r.Quarantined() { // quarantined while republishing
			if _, ok := from[p]; !ok {
				from[p] = 0
			}
		}
		// A new slice: the caller pages on with evs.
		kept := make([]Event, 0, len(evs))
		for _, e := range evs {
			// Ticks below the clash are in the stream (added, or refused as
			// copies or trimmed ones), so they are delivered.
			if t, ok := from[e.Partition]; !ok || e.Tick < t {
				kept = append(kept, e)
			}
		}
		evs = kept
		if len(evs) == 0 {
			return nil
		}
	}
	if r.opts.Invalidate != nil {
		if err := r.opts.Invalidate(ctx, evs); err != nil {
			return fmt.Errorf("invalidate: %w", err)
		}
	}
	upTo := make(map[int32]int64, 8)
	for _, e := range evs {
		upTo[e.Partition] = max(upTo[e.Partition], e.Tick)
	}
	if err := r.src.outbox.markDelivered(ctx, conn, upTo); err != nil {
		return err
	}
	r.published.Add(int64(len(evs)))
	for p, t := range upTo {
		r.delivered[p] = max(r.delivered[p], t)
	}
	return nil
}

// reconcile checks every stream with a delivered tick: one whose last
// entry is below it (missing, emptied or behind: Redis restarted without
// persistence, was flushed, or failed over to a stale replica) gets the
// retained events above its last entry again, with the same IDs.
func (r *Relay) reconcile(ctx context.Context, conn *pgx.Conn) error {
	marks, err := r.src.outbox.delivered(ctx, conn)
	if err != nil {
		return err
	}
	for p, t := range marks {
		r.delivered[p] = max(r.delivered[p], t)
	}
	streams := make([]int32, 0, len(r.delivered))
	held := r.Quarantined()
	for p, t := range r.delivered {
		if t > 0 && r.barren[p] != t && !slices.Contains(held, p) {
			streams = append(streams, p)
		}
	}
	slices.Sort(streams)
	const chunk = 500
	resets, republished := 0, 0
	defer func() { r.logRepublished(resets, republished) }()
	for len(streams) > 0 {
		n := min(chunk, len(streams))
		part := streams[:n]
		streams = streams[n:]
		results, err := r.evalAll(ctx, checkLua, len(part), func(i int) (string, []string) {
			return r.keys.Stream(part[i]), []string{strconv.FormatInt(r.delivered[part[i]], 10)}
		})
		if err != nil {
			return err
		}
		for i, res := range results {
			got, err := res.AsStrSlice()
			if err != nil {
				return fmt.Errorf("check stream %s: %w", r.keys.Stream(part[i]), err)
			}
			if len(got) == 0 {
				continue
			}
			last, err := resetReply(got)
			if err != nil {
				return fmt.Errorf("check stream %s: %w", r.keys.Stream(part[i]), err)
			}
			n, err := r.republish(ctx, conn, part[i], last)
			if err != nil {
				return err
			}
			resets, republished = resets+1, republished+n
		}
	}
	return nil
}

// republish publishes stream's retained events above its last entry
// `last` up to its delivered tick again, with their IDs, and returns how
// many. A stream that lost everything gets at most the last MaxLen of
// them, which is all the stream would hold; older cursors are served from
// Postgres.
func (r *Relay) republish(ctx context.Context, conn *pgx.Conn, stream int32, last int64) (int, error) {
	upTo := r.delivered[stream]
	from := last
	if last == 0 && upTo-from > r.opts.MaxLen {
		from = upTo - r.opts.MaxLen
	}
	total := 0
	for from < upTo {
		evs, err := r.src.outbox.retained(ctx, conn, stream, from, upTo, r.opts.BatchSize, r.opts.MaxPayloadBytes, nil)
		if err != nil {
			return total, err
		}
		if len(evs) == 0 {
			break
		}
		clashes, _, err := r.publish(ctx, evs, false)
		if err != nil {
			return total, err
		}
		if len(clashes) > 0 {
			r.quarantine(clashes[0])
			break
		}
		total += len(evs)
		from = evs[len(evs)-1].Tick
	}
	r.republished.Add(int64(total))
	if total == 0 {
		r.barren[stream] = upTo
	}
	return total, nil
}

// logRepublished says, once per round, that streams were found behind
// their delivered events: after Redis lost everything that is every
// stream, too many for a line each.
func (r *Relay) logRepublished(streams, events int) {
	if streams == 0 {
		return
	}
	r.opts.Logger.Warn("event relay found streams behind their delivered events (Redis lost them) and published the retained ones again",
		"relay", r.name, "streams", streams, "republished", events)
}

// pruneLoop deletes delivered events older than the retention every
// PruneInterval while the relay leads, on a connection of its own so that
// publishing never waits for it.
func (r *Relay) pruneLoop(ctx context.Context) {
	t := time.NewTicker(r.opts.PruneInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := r.pruneOnce(ctx); err != nil && ctx.Err() == nil {
			r.opts.Logger.Warn("event relay could not prune delivered events; retrying next round", "relay", r.name, "err", err)
		}
	}
}

// pruneWindow is how many outbox rows one prune statement looks at.
const pruneWindow = 2000

func (r *Relay) pruneOnce(ctx context.Context) error {
	cfg, err := pgx.ParseConfig(r.dsn)
	if err != nil {
		return err
	}
	cfg.RuntimeParams["application_name"] = RelayApplicationName + "-prune"
	// Losing the last deletes in a crash only means pruning them again.
	cfg.RuntimeParams["synchronous_commit"] = "off"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	cutoff := time.Now().Add(-r.opts.Retention)
	var after int64
	for {
		n, next, err := r.src.outbox.prune(ctx, conn, cutoff, after, pruneWindow)
		r.pruned.Add(n)
		if err != nil || next == 0 {
			return err
		}
		after = next
	}
}

// luaPrelude holds what the scripts share. behind(D) tells whether the
// stream KEYS[1] ends below tick D (decimal; '0' checks nothing): missing,
// emptied or behind, as when Redis restarted without persistence or was
// flushed. It returns the tick of its last entry then; an emptied stream
// is deleted, since its last ID would refuse the entries published again.
const luaPrelude = `
local function lt(x, y) -- decimal strings without leading zeros
  if #x ~= #y then return #x < #y end
  return x < y
end
local function behind(d)
  if d == '0' then return nil end
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  local tick = '0'
  if #last > 0 then tick = string.match(last[1][1], '^(%d+)-') or '0' end
  if not lt(tick, d) then return nil end
  if #last == 0 and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('DEL', KEYS[1]) end
  return tick
end
`

// checkScript answers {'reset', the last entry's tick} when the stream
// KEYS[1] ends below the delivered tick ARGV[1], else {}.
const checkScript = luaPrelude + `
local last = behind(ARGV[1])
if last then return {'reset', last} end
return {}`

// publishScript XADDs a batch of entries to one stream (KEYS[1]) in order
// and stops at the first failure, so a stream never gets a later event
// without the ones before it: a failed XADD (out of memory, say) followed
// by a successful one would leave a hole that no retry could fill, since an
// ID below the top is refused.
//
// First, given the stream's delivered tick (ARGV[3], '0' to skip), it
// checks that the stream still ends at or above it; if not it adds nothing
// and returns {'reset', the last entry's tick}, and the relay publishes
// the retained events again before this batch.
//
// An ID at or below the top is refused by Redis. The script checks it on
// the spot, before adding anything after it and with no trimming in
// between: the entry there holds the same event_id (a copy: published
// before a crash, or by an overlapping leader) or there is none and the ID
// lies below the stream's first entry (trimmed since): delivered, go on.
// Otherwise the stream clashes with the outbox clock and the script stops,
// returning {ID, 'other', the event_id found, the stream's top} or {ID,
// 'hole', the stream's first ID, its top}; it returns {} when all is in.
//
// ARGV: MAXLEN, the event_id field's name, the delivered tick, then per
// entry its ID, its number of fields and the field-value pairs.
const publishScript = luaPrelude + `
local function before(a, b) -- stream IDs <ms>-<seq>
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am ~= bm then return lt(am, bm) end
  return lt(as, bs)
end
local function field(list, from, to, name)
  for j = from, to, 2 do
    if list[j] == name then return list[j + 1] end
  end
  return nil
end
local function top()
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  return field(info, 1, #info, 'last-generated-id') or ''
end
local last = behind(ARGV[3])
if last then return {'reset', last} end
local i = 4
while i <= #ARGV do
  local id, nf = ARGV[i], tonumber(ARGV[i + 1])
  local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id}
  for j = i + 2, i + 1 + 2 * nf do
    args[#args + 1] = ARGV[j]
  end
  local res = redis.pcall(unpack(args))
  if type(res) == 'table' and res.err then
    if not string.find(res.err, 'equal or smaller than the target stream top item', 1, true) then
      return redis.error_reply(res.err)
    end
    local at = redis.call('XRANGE', KEYS[1], id, id)
    if #at > 0 then
      local theirs = field(at[1][2], 1, #at[1][2], ARGV[2]) or ''
      if theirs ~= field(ARGV, i + 2, i + 2 * nf, ARGV[2]) then
        return {id, 'other', theirs, top()}
      end
    else
      local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
      if #first > 0 and not before(id, first[1][1]) then
        return {id, 'hole', first[1][1], top()}
      end
    end
  end
  i = i + 2 + 2 * nf
end
return {}`

// script is a Lua script and its SHA-1, for EVALSHA.
type script struct{ body, sha string }

func newScript(body string) script {
	h := sha1.Sum([]byte(body))
	return script{body: body, sha: hex.EncodeToString(h[:])}
}

var (
	publishLua = newScript(publishScript)
	checkLua   = newScript(checkScript)
)

// A clash is an entry a stream refused that is not a copy of the outbox's
// event: the stream holds another event at its tick, or none though the
// tick lies within the stream (a hole). Either way the stream's outbox
// clock went backwards (a restored shard, a partition moved without its
// clock row), and counting the event as delivered would lose it.
type clash struct {
	ev    Event  // the outbox's event at the refused tick
	hole  bool   // the stream holds no entry at the tick
	found string // the event_id the stream holds there; for a hole, its first entry ID
	top   string // the stream's last ID
}

// A reset is a stream that ends below its delivered tick.
type reset struct {
	stream int32
	last   int64 // the tick of its last entry, 0 if none
}

// resetReply parses a script's {'reset', last tick}.
func resetReply(got []string) (int64, error) {
	if len(got) != 2 || got[0] != "reset" {
		return 0, fmt.Errorf("script answered %q", got)
	}
	return strconv.ParseInt(got[1], 10, 64)
}

// evalAll runs sc on n streams in one pipeline, the i-th with key and
// arguments from arg, loading the script first if Redis lacks it.
func (r *Relay) evalAll(ctx context.Context, sc script, n int, arg func(i int) (string, []string)) ([]rueidis.RedisResult, error) {
	c := r.opts.Redis
	// Commands are built per send: rueidis recycles a command once sent.
	send := func() []rueidis.RedisResult {
		cmds := make(rueidis.Commands, n)
		for i := range n {
			key, args := arg(i)
			cmds[i] = c.B().Evalsha().Sha1(sc.sha).Numkeys(1).Key(key).Arg(args...).Build()
		}
		return c.DoMulti(ctx, cmds...)
	}
	results := send()
	for _, res := range results {
		if re, ok := rueidis.IsRedisErr(res.Error()); ok && re.IsNoScript() {
			// First use on this Redis (or after a restart): load and redo.
			// Streams that did get their entries report them as copies.
			if err := c.Do(ctx, c.B().ScriptLoad().Script(sc.body).Build()).Error(); err != nil {
				return nil, fmt.Errorf("load script: %w", err)
			}
			return send(), nil
		}
	}
	return results, nil
}

// publish appends evs to their streams: one script call per stream, all
// in one pipeline. It reports the streams that clash with the outbox
// clock (their entries from the clash on were not added) and, if check,
// those that end below their delivered tick (nothing was added to them).
func (r *Relay) publish(ctx context.Context, evs []Event, check bool) ([]clash, map[int32]reset, error) {
	maxLen := strconv.FormatInt(r.opts.MaxLen, 10)
	var (
		order  []int32
		groups = map[int32][]int{}
	)
	for i, e := range evs {
		if _, ok := groups[e.Partition]; !ok {
			order = append(order, e.Partition)
		}
		groups[e.Partition] = append(groups[e.Partition], i)
	}
	args := make([][]string, len(order))
	for g, p := range order {
		d := "0"
		if check {
			d = strconv.FormatInt(r.delivered[p], 10)
		}
		args[g] = []string{maxLen, fieldID, d}
		for _, i := range groups[p] {
			f := evs[i].fields()
			args[g] = append(args[g], entryID(evs[i].Tick), strconv.Itoa(len(f)/2))
			args[g] = append(args[g], f...)
		}
	}
	results, err := r.evalAll(ctx, r.script, len(order), func(g int) (string, []string) {
		return r.keys.Stream(order[g]), args[g]
	})
	if err != nil {
		return nil, nil, fmt.Errorf("publish: %w", err)
	}
	var (
		clashes []clash
		resets  map[int32]reset
	)
	for g, res := range results {
		stream := r.keys.Stream(order[g])
		got, err := res.AsStrSlice()
		if err != nil {
			return nil, nil, fmt.Errorf("publish to %s: %w", stream, err)
		}
		switch {
		case len(got) == 0:
			continue
		case got[0] == "reset":
			last, err := resetReply(got)
			if err != nil {
				return nil, nil, fmt.Errorf("publish to %s: %w", stream, err)
			}
			if resets == nil {
				resets = map[int32]reset{}
			}
			resets[order[g]] = reset{stream: order[g], last: last}
			continue
		}
		cl, err := r.checkClash(evs, groups[order[g]], got)
		if err != nil {
			return nil, nil, fmt.Errorf("publish to %s: %w", stream, err)
		}
		clashes = append(clashes, cl)
	}
	return clashes, resets, nil
}

// checkClash turns the script's report of a stream whose refused entry is
// no copy ({ID, 'other'|'hole', event_id found or first ID, top}) into a
// clash with the outbox event at that ID; group indexes evs of the stream.
func (r *Relay) checkClash(evs []Event, group []int, got []string) (clash, error) {
	if len(got) != 4 || (got[1] != "other" && got[1] != "hole") {
		return clash{}, fmt.Errorf("publish script answered %q", got)
	}
	for _, i := range group {
		if entryID(evs[i].Tick) != got[0] {
			continue
		}
		return clash{ev: evs[i], hole: got[1] == "hole", found: got[2], top: got[3]}, nil
	}
	return clash{}, fmt.Errorf("publish script reported entry %s, which it was not given", got[0])
}

// quarantine holds c's stream back for the rest of this term and says so,
// once, at ERROR: with the partition, the tick, what the stream holds and
// what an operator has to do.
func (r *Relay) quarantine(c clash) {
	r.mu.Lock()
	if r.quarantined == nil {
		r.quarantined = map[int32]bool{}
	}
	r.quarantined[c.ev.Partition] = true
	r.mu.Unlock()
	found := "another event, " + c.found
	if c.hole {
		found = "no entry, though the stream's first is " + c.found + " (a hole)"
	}
	rows, clock := "the partition's outbox rows", "its outbox_clock row"
	if r.src.lockKey == pglock.KeyRelayConfig {
		rows, clock = "the config_outbox rows", "config_outbox_clock"
	}
	r.opts.Logger.Error("event relay quarantined a stream: the outbox clock went backwards, so its events stay in the outbox, unpublished",
		"relay", r.name, "stream", r.keys.Stream(c.ev.Partition), "partition", c.ev.Partition,
		"tick", c.ev.Tick, "event_id", c.ev.ID, "found", found, "stream_top", c.top,
		"fix", "renumber "+rows+" to start just above the stream's top and raise "+clock+
			" by as much, then end the leading relay's connection (docs/events.md, Quarantine)")
}

func (r *Relay) clearQuarantine() {
	r.mu.Lock()
	r.quarantined = nil
	r.mu.Unlock()
}

// Quarantined returns, in ascending order, the partitions (ConfigStream for
// the config relay) whose events this relay holds back because their stream
// clashes with the outbox clock. It is empty unless the relay leads; the
// next leader checks them again.
func (r *Relay) Quarantined() []int32 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]int32, 0, len(r.quarantined))
	for p := range r.quarantined {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}
