package events

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
)

// streamIDs lists a stream's entries as tick:event_id.
func streamIDs(t testing.TB, f func() []Event) string {
	t.Helper()
	var out []string
	for _, e := range f() {
		out = append(out, fmt.Sprintf("%d:%s", e.Tick, e.ID))
	}
	return strings.Join(out, ",")
}

// A stream Redis lost (deleted, emptied with its last ID left, or cut
// back) gets the delivered events the outbox retains again, with the same
// IDs: an idle relay finds it within ReconcileInterval, a busy one when
// it publishes the stream's next event. Delivered rows stay in the outbox.
func TestRelayRepublishesAStreamRedisLost(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 1, 2, 3)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	ctx := testCtx(t, 2*time.Minute)
	var logs testenv.LogBuffer
	r := NewShardRelay("s", s.dsn, RelayOptions{Redis: rc, Prefix: prefix, Logger: logs.Logger(),
		ReconcileInterval: 50 * time.Millisecond})
	runRelay(t, ctx, r)
	for i := range 5 {
		insertEvents(t, s.pool(), event{1, fmt.Sprint("a", i)}, event{2, fmt.Sprint("b", i)}, event{3, fmt.Sprint("c", i)})
	}
	waitFor(t, "every event to be delivered", func() bool { return outboxCount(t, s) == 0 })
	want := map[int32]string{}
	for p := int32(1); p <= 3; p++ {
		want[p] = streamIDs(t, func() []Event { return readStream(t, rc, keys, p) })
		if strings.Count(want[p], ",") != 4 {
			t.Fatalf("stream %d: %s", p, want[p])
		}
	}
	var rows int
	if err := s.pool().QueryRow(ctx, `SELECT count(*) FROM outbox`).Scan(&rows); err != nil || rows != 15 {
		t.Fatalf("outbox holds %d rows after delivery (%v), want all 15 retained", rows, err)
	}

	// Missing, emptied (its last ID would refuse the old IDs), behind.
	for _, cmd := range [][]string{
		{"DEL", keys.Stream(1)},
		{"XTRIM", keys.Stream(2), "MAXLEN", "0"},
		{"XTRIM", keys.Stream(3), "MINID", "0"}, // a no-op, then cut below
		{"XDEL", keys.Stream(3), "4-0", "5-0"},
	} {
		if err := rc.Do(ctx, rc.B().Arbitrary(cmd...).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	// XDEL keeps the last ID: set it back, as a stale replica would hold.
	if err := rc.Do(ctx, rc.B().Arbitrary("XSETID", keys.Stream(3), "3-0").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	for p := int32(1); p <= 3; p++ {
		waitFor(t, fmt.Sprint("stream ", p, " to be whole again"), func() bool {
			return streamIDs(t, func() []Event { return readStream(t, rc, keys, p) }) == want[p]
		})
	}
	if n := r.Republished(); n != 5+5+2 {
		t.Errorf("republished %d events, want 12", n)
	}
	if !strings.Contains(logs.String(), "published the retained ones again") {
		t.Errorf("no log of the republish:\n%s", logs.String())
	}

	// Lost again while the relay is busy: the next event finds the reset
	// before it is added, so the stream has no hole.
	if err := rc.Do(ctx, rc.B().Del().Key(keys.Stream(1)).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	insertEvents(t, s.pool(), event{1, "a5"})
	waitFor(t, "the new event after the old ones", func() bool {
		evs := readStream(t, rc, keys, 1)
		return len(evs) == 6 && evs[5].UserID == "a5"
	})
	var ticks []int64
	for _, e := range readStream(t, rc, keys, 1) {
		ticks = append(ticks, e.Tick)
	}
	if !slices.Equal(ticks, []int64{1, 2, 3, 4, 5, 6}) {
		t.Fatalf("stream 1 ticks %v", ticks)
	}
	if q := r.Quarantined(); len(q) != 0 {
		t.Fatalf("quarantined %v", q)
	}
}

// The relay prunes delivered events older than the retention, and keeps
// younger ones and undelivered ones (a quarantined partition's) whatever
// their age.
func TestRelayPrunesDeliveredEventsPastRetention(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 1, 2, 3)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	ctx := testCtx(t, 2*time.Minute)
	seedEntry(t, rc, keys, 2, 1, "someone-else") // quarantines partition 2
	for i := range 3000 {                        // more than a prune window
		insertEvents(t, s.pool(), event{int32(1 + i%2), fmt.Sprint("u", i)})
	}
	r := NewShardRelay("s", s.dsn, RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger(),
		Retention: time.Hour, PruneInterval: 50 * time.Millisecond})
	runRelay(t, ctx, r)
	waitFor(t, "partition 1 to be delivered", func() bool { return len(outboxTicks(t, s.pool(), 1)) == 0 })
	if _, err := s.pool().Exec(ctx, `UPDATE outbox SET committed_at = now() - interval '2 hours'`); err != nil {
		t.Fatal(err)
	}
	insertEvents(t, s.pool(), event{1, "young"}, event{3, "young"})
	count := func(p int32) int {
		var n int
		if err := s.pool().QueryRow(ctx, `SELECT count(*) FROM outbox WHERE partition = $1`, p).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	waitFor(t, "partition 1's old events to be pruned", func() bool { return count(1) == 1 })
	waitFor(t, "the young events to be delivered", func() bool { return outboxCount(t, s) == 1500 })
	time.Sleep(200 * time.Millisecond) // a few more rounds
	if n := count(2); n != 1500 {
		t.Fatalf("partition 2 (quarantined) holds %d rows, want its 1500 undelivered ones", n)
	}
	if n := count(3); n != 1 {
		t.Fatalf("partition 3 holds %d rows, want its young one", n)
	}
	if n := r.Pruned(); n != 1500 {
		t.Fatalf("pruned %d, want 1500", n)
	}
}
