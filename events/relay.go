package events

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/redis/rueidis"
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
	// PollInterval is how often the outbox is read without a notification
	// (default 1s); notifications wake the relay at once.
	PollInterval time.Duration
	// ElectInterval is how often a relay that lost the election tries again
	// (default 1s, with jitter): the longest a dead relay goes unreplaced,
	// once Postgres has noticed its connection is gone.
	ElectInterval time.Duration
	// MaxPayloadBytes caps the payload copied into a stream entry (default
	// 64 KiB); a larger one is left out and the entry says so. Negative:
	// never copy payloads.
	MaxPayloadBytes int
	// Invalidate, if set, is called with each batch after it is in Redis
	// and before its outbox rows are deleted, so the caller can drop cache
	// entries the changes made stale. An error keeps the rows; the batch is
	// published (deduplicated by Redis) and handed over again after a pause.
	Invalidate func(ctx context.Context, evs []Event) error
	Logger     *slog.Logger
}

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
		o.PollInterval = time.Second
	}
	if o.ElectInterval <= 0 {
		o.ElectInterval = time.Second
	}
	if o.MaxPayloadBytes == 0 {
		o.MaxPayloadBytes = 64 << 10
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// RelayApplicationName names a relay's connection in pg_stat_activity.
const RelayApplicationName = "shardgate-relay"

// The relay's advisory lock. Advisory locks belong to one database, so the
// same key elects one relay per shard database and one for the catalog.
const (
	lockClass = 0x53470001 // "SG" + 1: apart from goose's single-key lock
	lockShard = 1
	lockCatal = 2
)

// source is what differs between a shard's outbox and the config outbox.
type source struct {
	what    string // for logs and errors
	lockKey int32
	channel string
	fetch   string // $1, $2: start after (partition, tick); $3: limit; $4: payload cap
	delete  string // $1: partitions, $2: ticks
}

var shardSource = source{
	what:    "shard outbox",
	lockKey: lockShard,
	channel: "shardgate_outbox",
	fetch: `
SELECT partition, tick, event_id::text, user_id, entity, key, op, version,
       CASE WHEN octet_length(payload::text) <= $4 THEN payload END,
       payload IS NOT NULL AND octet_length(payload::text) > $4,
       committed_at
FROM outbox
WHERE (partition, tick) > ($1::integer, $2::bigint)
ORDER BY partition, tick
LIMIT $3`,
	delete: `DELETE FROM outbox WHERE (partition, tick) IN (SELECT * FROM unnest($1::integer[], $2::bigint[]))`,
}

var configSource = source{
	what:    "config outbox",
	lockKey: lockCatal,
	channel: "shardgate_config_outbox",
	fetch: `
SELECT -1, tick, event_id::text, '', 'config', namespace || '/' || key, op, version,
       CASE WHEN octet_length(payload::text) <= $4 THEN payload END,
       payload IS NOT NULL AND octet_length(payload::text) > $4,
       committed_at
FROM config_outbox
WHERE $1::integer IS NOT NULL AND tick > $2::bigint
ORDER BY tick
LIMIT $3`,
	delete: `DELETE FROM config_outbox WHERE $1::integer[] IS NOT NULL AND tick = ANY ($2::bigint[])`,
}

// Relay publishes one database's outbox to Redis Streams. Run it on every
// instance: an advisory lock, held on the relay's own connection, makes
// exactly one of them active per database, and another takes over within
// ElectInterval of the holder's connection ending.
type Relay struct {
	name   string
	dsn    string
	src    source
	opts   RelayOptions
	keys   Keys
	script script
}

// NewShardRelay returns a relay for the outbox of the shard database at dsn.
func NewShardRelay(name, dsn string, opts RelayOptions) *Relay {
	opts = opts.withDefaults()
	return &Relay{name: name, dsn: dsn, src: shardSource, opts: opts, keys: Keys{opts.Prefix}, script: publishLua}
}

// NewConfigRelay returns a relay for the config outbox of the catalog
// database at dsn.
func NewConfigRelay(dsn string, opts RelayOptions) *Relay {
	opts = opts.withDefaults()
	return &Relay{name: "catalog", dsn: dsn, src: configSource, opts: opts, keys: Keys{opts.Prefix}, script: publishLua}
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
	cfg, err := pgx.ParseConfig(r.dsn)
	if err != nil {
		return false, fmt.Errorf("%s DSN: invalid", r.src.what) // never repeat a DSN
	}
	cfg.RuntimeParams["application_name"] = RelayApplicationName
	// The relay's only writes delete delivered rows. Losing the last few in
	// a crash means publishing them again, which Redis refuses as
	// duplicates; waiting for each delete's WAL flush would only add latency.
	cfg.RuntimeParams["synchronous_commit"] = "off"
	// The lock is released only when Postgres notices the session gone. A
	// leader whose host dies sends no FIN; the server's keepalives and
	// user timeout find it within about 30 s instead of the kernel's
	// default two hours, and another instance takes over.
	cfg.RuntimeParams["tcp_keepalives_idle"] = "10"
	cfg.RuntimeParams["tcp_keepalives_interval"] = "5"
	cfg.RuntimeParams["tcp_keepalives_count"] = "3"
	cfg.RuntimeParams["tcp_user_timeout"] = "20000"
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	// A follower keeps its connection and retries the lock on it, rather
	// than connecting anew each time (a backend start per try, per
	// instance, per database).
	for {
		var got bool
		if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, $2)`, int32(lockClass), r.src.lockKey).Scan(&got); err != nil {
			return false, err
		}
		if got {
			break
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(r.electWait()):
		}
	}
	if _, err := conn.Exec(ctx, "LISTEN "+r.src.channel); err != nil {
		return true, err
	}
	r.opts.Logger.Info("event relay elected", "relay", r.name)
	return true, r.relay(ctx, conn)
}

// relay publishes until an error. It pages through the outbox in
// (partition, tick) order, going round from the start whenever a page comes
// back short, so a busy partition cannot starve the others; it waits for a
// notification (or PollInterval) only after a full pass from the start found
// less than a page.
func (r *Relay) relay(ctx context.Context, conn *pgx.Conn) error {
	start := Position{Stream: -2}
	pos := start
	for {
		evs, err := r.fetch(ctx, conn, pos)
		if err != nil {
			return err
		}
		if len(evs) > 0 {
			if err := r.deliver(ctx, conn, evs); err != nil {
				return err
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
		wctx, cancel := context.WithTimeout(ctx, r.opts.PollInterval)
		_, err = conn.WaitForNotification(wctx)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
	}
}

func (r *Relay) fetch(ctx context.Context, conn *pgx.Conn, after Position) ([]Event, error) {
	rows, err := conn.Query(ctx, r.src.fetch, after.Stream, after.Tick, r.opts.BatchSize, r.opts.MaxPayloadBytes)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.src.what, err)
	}
	evs := make([]Event, 0, r.opts.BatchSize)
	for rows.Next() {
		var (
			e       Event
			payload pgtype.Text
		)
		if err := rows.Scan(&e.Partition, &e.Tick, &e.ID, &e.UserID, &e.Entity, &e.Key, &e.Op, &e.Version,
			&payload, &e.Omitted, &e.CommittedAt); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read %s: %w", r.src.what, err)
		}
		if payload.Valid && r.opts.MaxPayloadBytes >= 0 {
			e.Payload = []byte(payload.String)
		}
		e.Omitted = e.Omitted || (payload.Valid && r.opts.MaxPayloadBytes < 0)
		evs = append(evs, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", r.src.what, err)
	}
	return evs, nil
}

// deliver puts evs into their streams, hands them to Invalidate, then
// deletes them from the outbox: an event leaves the outbox only once it is
// in Redis.
func (r *Relay) deliver(ctx context.Context, conn *pgx.Conn, evs []Event) error {
	if err := r.publish(ctx, evs); err != nil {
		return err
	}
	if r.opts.Invalidate != nil {
		if err := r.opts.Invalidate(ctx, evs); err != nil {
			return fmt.Errorf("invalidate: %w", err)
		}
	}
	parts := make([]int32, len(evs))
	ticks := make([]int64, len(evs))
	for i, e := range evs {
		parts[i], ticks[i] = e.Partition, e.Tick
	}
	if _, err := conn.Exec(ctx, r.src.delete, parts, ticks); err != nil {
		return fmt.Errorf("trim %s: %w", r.src.what, err)
	}
	return nil
}

// publishScript XADDs a batch of entries to one stream (KEYS[1]) in order
// and stops at the first failure, so a stream never gets a later event
// without the ones before it: a failed XADD (out of memory, say) followed
// by a successful one would leave a hole that no retry could fill, since an
// ID below the top is refused. An ID at or below the top is an entry
// already there; the script returns those IDs for checking. ARGV: MAXLEN,
// then per entry its ID, its number of fields and the field-value pairs.
const publishScript = `
local dups = {}
local i = 2
while i <= #ARGV do
  local id, nf = ARGV[i], tonumber(ARGV[i + 1])
  local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id}
  for j = i + 2, i + 1 + 2 * nf do
    args[#args + 1] = ARGV[j]
  end
  local res = redis.pcall(unpack(args))
  if type(res) == 'table' and res.err then
    if string.find(res.err, 'equal or smaller than the target stream top item', 1, true) then
      dups[#dups + 1] = id
    else
      return redis.error_reply(res.err)
    end
  end
  i = i + 2 + 2 * nf
end
return dups`

// script is a Lua script and its SHA-1, for EVALSHA.
type script struct{ body, sha string }

func newScript(body string) script {
	h := sha1.Sum([]byte(body))
	return script{body: body, sha: hex.EncodeToString(h[:])}
}

var publishLua = newScript(publishScript)

// publish appends evs to their streams: one script call per stream, all
// in one pipeline. Entries Redis already holds are checked, not re-added.
func (r *Relay) publish(ctx context.Context, evs []Event) error {
	c := r.opts.Redis
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
		args[g] = []string{maxLen}
		for _, i := range groups[p] {
			f := evs[i].fields()
			args[g] = append(args[g], entryID(evs[i].Tick), strconv.Itoa(len(f)/2))
			args[g] = append(args[g], f...)
		}
	}
	// Commands are built per send: rueidis recycles a command once sent.
	send := func() []rueidis.RedisResult {
		cmds := make(rueidis.Commands, len(order))
		for g, p := range order {
			cmds[g] = c.B().Evalsha().Sha1(r.script.sha).Numkeys(1).Key(r.keys.Stream(p)).Arg(args[g]...).Build()
		}
		return c.DoMulti(ctx, cmds...)
	}
	results := send()
	for _, res := range results {
		if re, ok := rueidis.IsRedisErr(res.Error()); ok && re.IsNoScript() {
			// First use on this Redis (or after a restart): load and redo.
			// Streams that did get their entries report them as duplicates.
			if err := c.Do(ctx, c.B().ScriptLoad().Script(r.script.body).Build()).Error(); err != nil {
				return fmt.Errorf("load publish script: %w", err)
			}
			results = send()
			break
		}
	}
	var dups []int
	for g, res := range results {
		ids, err := res.AsStrSlice()
		if err != nil {
			return fmt.Errorf("publish to %s: %w", r.keys.Stream(order[g]), err)
		}
		byID := make(map[string]int, len(groups[order[g]]))
		for _, i := range groups[order[g]] {
			byID[entryID(evs[i].Tick)] = i
		}
		for _, id := range ids {
			dups = append(dups, byID[id])
		}
	}
	return r.checkDuplicates(ctx, evs, dups)
}

// checkDuplicates makes sure that the entries Redis refused as duplicates
// (rare: only after a crash or a leader overlap) hold the same events. A
// different event at the same tick means the outbox clock went backwards
// (a shard restored from a backup, a partition moved without its clock
// row); the relay stops rather than drop events as duplicates. An entry
// already trimmed cannot be checked and counts as delivered.
func (r *Relay) checkDuplicates(ctx context.Context, evs []Event, dups []int) error {
	if len(dups) == 0 {
		return nil
	}
	c := r.opts.Redis
	cmds := make(rueidis.Commands, len(dups))
	for j, i := range dups {
		id := entryID(evs[i].Tick)
		cmds[j] = c.B().Xrange().Key(r.keys.Stream(evs[i].Partition)).Start(id).End(id).Build()
	}
	for j, res := range c.DoMulti(ctx, cmds...) {
		e := evs[dups[j]]
		entries, err := res.AsXRange()
		if err != nil {
			return fmt.Errorf("check %s: %w", r.keys.Stream(e.Partition), err)
		}
		if len(entries) > 0 && entries[0].FieldValues[fieldID] != e.ID {
			return fmt.Errorf("stream %s holds another event at tick %d than the outbox (event %s): "+
				"the outbox clock went backwards (restored shard? partition moved without its outbox_clock row?); not publishing",
				r.keys.Stream(e.Partition), e.Tick, e.ID)
		}
	}
	return nil
}
