package events

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/internal/testenv"
)

// A stream that already holds a different event at a tick the outbox hands
// out (the clock went backwards) gets its partition quarantined: that
// event and the partition's later ones stay in the outbox, unpublished,
// while the other partitions of the same batch, and later events of theirs,
// are published and trimmed. The relay says so once, at ERROR, and keeps
// running.
func TestRelayQuarantinesAClockThatWentBackwards(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 2, 4)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	ctx := testCtx(t, 2*time.Minute)
	seedEntry(t, rc, keys, 2, 1, "someone-else")
	insertEvents(t, s.pool(), event{2, "u"}, event{4, "v"}, event{2, "w"})

	var logs testenv.LogBuffer
	r := NewShardRelay("s", s.dsn, RelayOptions{Redis: rc, Prefix: prefix, Logger: logs.Logger()})
	runRelay(t, ctx, r)
	waitFor(t, "partition 4 to be delivered", func() bool {
		return len(readStream(t, rc, keys, 4)) == 1 && len(outboxTicks(t, s.pool(), 4)) == 0
	})
	if q := r.Quarantined(); !slices.Equal(q, []int32{2}) {
		t.Fatalf("quarantined %v, want [2]", q)
	}
	if ticks := outboxTicks(t, s.pool(), 2); !slices.Equal(ticks, []int64{1, 2}) {
		t.Fatalf("partition 2 outbox ticks %v, want [1 2] kept", ticks)
	}

	// Later events: partition 4's flow, partition 2's stay. Written in one
	// transaction, so the fetch that delivers partition 4's saw both.
	insertEvents(t, s.pool(), event{2, "x"}, event{4, "y"})
	waitFor(t, "partition 4's later event to be delivered", func() bool {
		return len(readStream(t, rc, keys, 4)) == 2 && len(outboxTicks(t, s.pool(), 4)) == 0
	})
	if evs := readStream(t, rc, keys, 2); len(evs) != 1 || evs[0].ID != "someone-else" {
		t.Fatalf("partition 2 stream: %+v, want only the entry that was there", evs)
	}
	if ticks := outboxTicks(t, s.pool(), 2); !slices.Equal(ticks, []int64{1, 2, 3}) {
		t.Fatalf("partition 2 outbox ticks %v, want [1 2 3] kept", ticks)
	}

	out := logs.String()
	if n := strings.Count(out, "level=ERROR"); n != 1 {
		t.Fatalf("%d ERROR lines, want 1:\n%s", n, out)
	}
	for _, want := range []string{"partition=2", "tick=1", "someone-else", "stream_top=1-0", "outbox_clock"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "interrupted") || strings.Contains(out, s.dsn) {
		t.Errorf("relay stopped, or logged its DSN:\n%s", out)
	}
}

// A tick the outbox hands out that lies within the stream but has no entry
// there (a hole) is not counted as delivered: the partition is quarantined.
// Once the clock is repaired as docs/events.md says, a new relay publishes the
// backlog in order, right after the stream's top.
func TestRelayQuarantinesAHoleAndResumesAfterRepair(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 6, 7)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	ctx := testCtx(t, 2*time.Minute)
	seedEntry(t, rc, keys, 6, 1, "a")
	seedEntry(t, rc, keys, 6, 3, "c")
	if _, err := s.pool().Exec(ctx, `INSERT INTO outbox_clock (partition, tick) VALUES (6, 1)`); err != nil {
		t.Fatal(err)
	}
	insertEvents(t, s.pool(), event{6, "u"}, event{6, "w"}, event{7, "v"}) // ticks 2, 3; 1

	var logs testenv.LogBuffer
	r := NewShardRelay("s", s.dsn, RelayOptions{Redis: rc, Prefix: prefix, Logger: logs.Logger()})
	stop := runRelay(t, ctx, r)
	waitFor(t, "partition 7 to be delivered", func() bool { return len(outboxTicks(t, s.pool(), 7)) == 0 })
	if q := r.Quarantined(); !slices.Equal(q, []int32{6}) {
		t.Fatalf("quarantined %v, want [6]", q)
	}
	if ticks := outboxTicks(t, s.pool(), 6); !slices.Equal(ticks, []int64{2, 3}) {
		t.Fatalf("partition 6 outbox ticks %v, want [2 3] kept", ticks)
	}
	if evs := readStream(t, rc, keys, 6); len(evs) != 2 {
		t.Fatalf("partition 6 stream: %+v, want the two entries that were there", evs)
	}
	if out := logs.String(); !strings.Contains(out, "tick=2") || !strings.Contains(out, "hole") {
		t.Fatalf("log does not report the hole at tick 2:\n%s", out)
	}
	stop()

	repairClock(t, s.pool(), 6, 3, 2)
	r2 := NewShardRelay("s", s.dsn, RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger()})
	runRelay(t, ctx, r2)
	insertEvents(t, s.pool(), event{6, "z"})
	waitFor(t, "the backlog to be delivered", func() bool { return outboxCount(t, s) == 0 })
	var got []string
	for _, e := range readStream(t, rc, keys, 6) {
		got = append(got, itoa(e.Tick)+":"+e.UserID)
	}
	if want := []string{"1:a", "3:c", "4:u", "5:w", "6:z"}; !slices.Equal(got, want) {
		t.Fatalf("partition 6 stream %v, want %v", got, want)
	}
	if q := r2.Quarantined(); len(q) != 0 {
		t.Fatalf("quarantined %v after the repair", q)
	}
}

// A refused tick below the stream's first entry was trimmed since it was
// published: it counts as delivered and leaves the outbox.
func TestRelayCountsATrimmedEntryAsDelivered(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 1)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	ctx := testCtx(t, time.Minute)
	for i := range 6 {
		seedEntry(t, rc, keys, 1, int64(i+1), "e"+itoa(int64(i+1)))
	}
	if err := rc.Do(ctx, rc.B().Xtrim().Key(keys.Stream(1)).Minid().Threshold("5-0").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.pool().Exec(ctx, `INSERT INTO outbox_clock (partition, tick) VALUES (1, 1)`); err != nil {
		t.Fatal(err)
	}
	insertEvents(t, s.pool(), event{1, "late"}) // tick 2, below the first entry 5-0

	var logs testenv.LogBuffer
	r := NewShardRelay("s", s.dsn, RelayOptions{Redis: rc, Prefix: prefix, Logger: logs.Logger()})
	runRelay(t, ctx, r)
	waitFor(t, "the outbox to drain", func() bool { return outboxCount(t, s) == 0 })
	if q := r.Quarantined(); len(q) != 0 {
		t.Fatalf("quarantined %v", q)
	}
	if evs := readStream(t, rc, keys, 1); len(evs) != 2 || evs[0].ID != "e5" || evs[1].ID != "e6" {
		t.Fatalf("stream: %+v, want e5, e6 untouched", evs)
	}
	if out := logs.String(); strings.Contains(out, "level=ERROR") {
		t.Fatalf("an ERROR for a trimmed entry:\n%s", out)
	}
}

// The config relay's single stream is quarantined the same way: config
// events stay in the outbox, and the manager counts the stream. Once the
// clock is repaired and the relay's connection ended, as docs/events.md says,
// the next term publishes them.
func TestConfigRelayQuarantine(t *testing.T) {
	t.Parallel()
	dsn := testenvCatalog(t)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	ctx := testCtx(t, 2*time.Minute)
	seedEntry(t, rc, keys, ConfigStream, 1, "someone-else")
	m := NewManager(RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger(), ElectInterval: 100 * time.Millisecond})
	defer m.Close()
	m.StartConfig(dsn)
	cat := openCatalog(t, dsn)
	if _, err := cat.SetConfig(ctx, "ns", "k", []byte(`1`), nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the config stream to be quarantined", func() bool { return m.QuarantinedStreams() == 1 })
	var n int
	if err := cat.Pool().QueryRow(ctx, `SELECT count(*) FROM config_outbox`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("config outbox holds %d rows (%v), want the event kept", n, err)
	}

	err := pgx.BeginFunc(ctx, cat.Pool(), func(tx pgx.Tx) error {
		for _, q := range []string{
			`SELECT tick FROM config_outbox_clock FOR UPDATE`,
			// The stream's top is 1, the first held tick 1: shift by 1 + 1 - 1.
			`UPDATE config_outbox SET tick = -tick`,
			`UPDATE config_outbox SET tick = -tick + 1`,
			`UPDATE config_outbox_clock SET tick = tick + 1`,
		} {
			if _, err := tx.Exec(ctx, q); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cat.Pool().Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1`, RelayApplicationName); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the config event to be published", func() bool {
		return len(readStream(t, rc, keys, ConfigStream)) == 2 && m.QuarantinedStreams() == 0
	})
	if evs := readStream(t, rc, keys, ConfigStream); evs[1].Tick != 2 || evs[1].Key != "ns/k" {
		t.Fatalf("config stream: %+v", evs)
	}
}

type event struct {
	partition int32
	user      string
}

// insertEvents writes outbox rows in one transaction, in order.
func insertEvents(t testing.TB, pool *pgxpool.Pool, evs ...event) {
	t.Helper()
	err := pgx.BeginFunc(context.Background(), pool, func(tx pgx.Tx) error {
		for _, e := range evs {
			if _, err := tx.Exec(context.Background(), insertEvent, e.partition, e.user); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// repairClock renumbers a partition's undelivered outbox rows (from
// firstHeld on) to start right after the stream's top, and raises its
// clock as much: the repair docs/events.md gives operators.
func repairClock(t testing.TB, pool *pgxpool.Pool, partition int32, top, firstHeld int64) {
	t.Helper()
	ctx := context.Background()
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		for _, q := range []string{
			`SELECT tick FROM outbox_clock WHERE partition = $1 FOR UPDATE`,
			`UPDATE outbox SET tick = -tick WHERE partition = $1
			   AND tick > coalesce((SELECT tick FROM outbox_delivered WHERE partition = $1), 0)`,
			`UPDATE outbox SET tick = -tick + ($2::bigint + 1 - $3::bigint) WHERE partition = $1 AND tick < 0`,
			`UPDATE outbox_clock SET tick = tick + ($2::bigint + 1 - $3::bigint) WHERE partition = $1`,
		} {
			args := []any{partition}
			if strings.Contains(q, "$2") {
				args = append(args, top, firstHeld)
			}
			if _, err := tx.Exec(ctx, q, args...); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// runRelay runs r until the returned stop (or the test's end).
func runRelay(t testing.TB, ctx context.Context, r *Relay) (stop func()) {
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { r.Run(rctx); close(done) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return stop
}

// seedEntry puts an event of its own at tick into a stream, as if an earlier
// owner of the partition had published it; its user ID is eventID too.
func seedEntry(t testing.TB, c rueidis.Client, keys Keys, stream int32, tick int64, eventID string) {
	t.Helper()
	e := Event{ID: eventID, Partition: stream, Tick: tick, UserID: eventID, Entity: EntityUser, Key: eventID,
		Op: OpUpsert, Version: 1, CommittedAt: time.Now()}
	cmd := c.B().Xadd().Key(keys.Stream(stream)).Id(entryID(tick)).FieldValue()
	f := e.fields()
	for i := 0; i < len(f); i += 2 {
		cmd = cmd.FieldValue(f[i], f[i+1])
	}
	if err := c.Do(context.Background(), cmd.Build()).Error(); err != nil {
		t.Fatal(err)
	}
}

// outboxTicks lists the ticks of a partition's undelivered outbox rows.
func outboxTicks(t testing.TB, pool *pgxpool.Pool, partition int32) []int64 {
	t.Helper()
	rows, _ := pool.Query(context.Background(), `SELECT tick FROM outbox WHERE partition = $1
		AND tick > coalesce((SELECT tick FROM outbox_delivered WHERE partition = $1), 0) ORDER BY tick`, partition)
	ticks, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	return ticks
}
