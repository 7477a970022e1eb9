package events

import (
	"testing"
	"time"
)

// A write's instance wakes the leading relay of another instance through
// Redis: the event is published long before the relay's next poll.
func TestWakeThroughRedisReachesTheLeader(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 1)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	// Polls so rare that only a wake-up can deliver within the test.
	leader := NewManager(RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger(), PollInterval: time.Minute, MinPollInterval: time.Minute})
	defer leader.Close()
	leader.Sync(map[string]string{"s": s.dsn})
	waitFor(t, "the relay to lead", func() bool { return leader.WakeLocal("s") })
	// Let the relay's first, immediate pass go by and reach its long wait.
	time.Sleep(200 * time.Millisecond)
	// Another instance, leading nothing, wakes through Redis.
	other := NewWaker(rc, prefix, nil, quietLogger())
	defer other.Close()
	ctx := testCtx(t, time.Minute)
	for i := range 3 {
		if _, err := s.pool().Exec(ctx, insertEvent, 1, "u"+itoa(int64(i))); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		other.Wake("s")
		waitFor(t, "the woken relay to publish", func() bool { return len(readStream(t, rc, keys, 1)) == i+1 })
		if el := time.Since(start); el > 30*time.Second {
			t.Fatalf("event %d published %s after its wake-up: the wake-up did not arrive", i, el)
		}
	}
	if other.Published() < 3 {
		t.Fatalf("%d wake-ups published, want 3", other.Published())
	}
}

// A wake-up lost on purpose (none is sent) costs latency, not the event:
// the relay's poll finds it within its poll interval.
func TestLostWakeUpStillDelivers(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 1)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	const poll = 300 * time.Millisecond
	m := NewManager(RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger(), PollInterval: poll})
	defer m.Close()
	m.Sync(map[string]string{"s": s.dsn})
	waitFor(t, "the relay to lead", func() bool { return m.WakeLocal("s") })
	time.Sleep(2 * poll) // idle: the relay polls at its longest interval
	ctx := testCtx(t, time.Minute)
	if _, err := s.pool().Exec(ctx, insertEvent, 1, "lost"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the event, without a wake-up", func() bool { return len(readStream(t, rc, keys, 1)) == 1 })
}

// An idle relay does not spin: after a short ramp it reads its outbox once
// per poll interval.
func TestIdleRelayDoesNotSpin(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 1)
	rc, prefix := newRedis(t)
	const poll = 200 * time.Millisecond
	m := NewManager(RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger(), PollInterval: poll, MinPollInterval: 10 * time.Millisecond})
	defer m.Close()
	m.Sync(map[string]string{"s": s.dsn})
	waitFor(t, "the relay to lead", func() bool { return m.WakeLocal("s") })
	time.Sleep(time.Second) // past the ramp (10, 20, 40, 80, 160 ms)
	before := m.Reads()
	const idle = 2 * time.Second
	time.Sleep(idle)
	reads := m.Reads() - before
	if limit := int64(idle/poll) + 2; reads > limit {
		t.Fatalf("an idle relay read its outbox %d times in %s; at most %d expected (one per %s)", reads, idle, limit, poll)
	}
	if reads == 0 {
		t.Fatal("an idle relay never polled")
	}
}
