package events

import (
	"maps"
	"slices"
	"strings"
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

// A wake-up naming a partition makes the relay read that partition only;
// one naming none (or a pass) reads the rest. Both in-process and through
// Redis.
func TestWakeNamingPartitionsReadsThem(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 1, 2, 3)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	// Polls so rare that only wake-ups deliver within the test.
	m := NewManager(RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger(), PollInterval: time.Minute, MinPollInterval: time.Minute})
	defer m.Close()
	m.Sync(map[string]string{"s": s.dsn})
	waitFor(t, "the relay to lead", func() bool { return m.WakeLocal("s") })
	time.Sleep(200 * time.Millisecond) // past the first pass, into the long wait
	ctx := testCtx(t, time.Minute)
	for _, p := range []int32{1, 2, 3} {
		if _, err := s.pool().Exec(ctx, insertEvent, p, "u"); err != nil {
			t.Fatal(err)
		}
	}
	settle := func() { time.Sleep(300 * time.Millisecond) }

	if !m.WakeLocalStreams("s", []int32{2}) {
		t.Fatal("the relay does not lead")
	}
	waitFor(t, "partition 2's event", func() bool { return len(readStream(t, rc, keys, 2)) == 1 })
	settle()
	if n1, n3 := len(readStream(t, rc, keys, 1)), len(readStream(t, rc, keys, 3)); n1+n3 != 0 {
		t.Fatalf("a wake-up naming partition 2 published %d events of 1 and %d of 3", n1, n3)
	}

	other := NewWaker(rc, prefix, nil, quietLogger())
	defer other.Close()
	other.WakePartition("s", 3)
	waitFor(t, "partition 3's event, woken through Redis", func() bool { return len(readStream(t, rc, keys, 3)) == 1 })
	settle()
	if n := len(readStream(t, rc, keys, 1)); n != 0 {
		t.Fatalf("a wake-up naming partition 3 published %d events of 1", n)
	}

	other.Wake("s")
	waitFor(t, "partition 1's event after a wake-up naming none", func() bool { return len(readStream(t, rc, keys, 1)) == 1 })
}

// Wake-ups that keep naming one partition do not hold back another's
// event past the poll interval: a pass runs at least that often.
func TestNamedWakeUpsStillPass(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 1, 2)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	const poll = 300 * time.Millisecond
	// The timer never ends a wait while wake-ups come every 20 ms.
	m := NewManager(RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger(), PollInterval: poll, MinPollInterval: poll})
	defer m.Close()
	m.Sync(map[string]string{"s": s.dsn})
	waitFor(t, "the relay to lead", func() bool { return m.WakeLocal("s") })
	ctx := testCtx(t, time.Minute)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if _, err := s.pool().Exec(ctx, insertEvent, 1, "u"+itoa(int64(i))); err != nil {
				t.Error(err)
				return
			}
			m.WakeLocalStreams("s", []int32{1})
		}
	}()
	defer func() { close(stop); <-done }()
	time.Sleep(100 * time.Millisecond)
	if _, err := s.pool().Exec(ctx, insertEvent, 2, "unwoken"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for len(readStream(t, rc, keys, 2)) == 0 {
		if time.Since(start) > 10*poll {
			t.Fatalf("partition 2's event not published %s after it committed, while wake-ups named partition 1", time.Since(start))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(readStream(t, rc, keys, 1)) == 0 {
		t.Fatal("the named partition's events were not published")
	}
}

func TestFormatParseWake(t *testing.T) {
	for _, tc := range []struct {
		msg  string
		name string
		want []int32
	}{
		{"shard-0", "shard-0", nil},
		{"shard-0:5", "shard-0", []int32{5}},
		{"shard-0:5,7,4095", "shard-0", []int32{5, 7, 4095}},
		{"#config", "#config", nil},
		{"shard-0:", "shard-0", nil},
		{"shard-0:5,x", "shard-0", nil},
		{"shard-0:-1", "shard-0", nil},
		{"shard-0:99999999999", "shard-0", nil},
		{"shard-0:5,,6", "shard-0", nil},
	} {
		name, got := parseWake(tc.msg)
		if name != tc.name || !slices.Equal(got, tc.want) {
			t.Errorf("parseWake(%q) = %q %v, want %q %v", tc.msg, name, got, tc.name, tc.want)
		}
	}
	ws := &wakeSet{parts: map[int32]struct{}{3: {}, 1: {}, 2: {}}}
	name, got := parseWake(formatWake("s", ws))
	slices.Sort(got)
	if name != "s" || !slices.Equal(got, []int32{1, 2, 3}) {
		t.Fatalf("round trip: %q %v", name, got)
	}
	if msg := formatWake("s", &wakeSet{all: true, parts: ws.parts}); msg != "s" {
		t.Fatalf("a wake-up for any partition: %q", msg)
	}
	many := strings.Repeat("1,", maxWakePartitions) + "1"
	if _, got := parseWake("s:" + many); got != nil {
		t.Fatalf("%d partitions read as %d, want any", maxWakePartitions+1, len(got))
	}
}

// FuzzParseWake: whatever a neighbour publishes on the channel, the parse
// returns the name before the first ':' and either nothing (any
// partition) or at most maxWakePartitions partitions, none negative; a
// message formatWake made reads back as what it said.
func FuzzParseWake(f *testing.F) {
	for _, s := range []string{"shard-0", "shard-0:1,2,3", "#config", "s:", "s:-1", "s:1,,2", "s:" + strings.Repeat("7,", 300)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, msg string) {
		name, got := parseWake(msg)
		if want, _, _ := strings.Cut(msg, ":"); name != want {
			t.Fatalf("name %q, want %q", name, want)
		}
		if len(got) > maxWakePartitions {
			t.Fatalf("%d partitions", len(got))
		}
		for _, p := range got {
			if p < 0 {
				t.Fatalf("partition %d", p)
			}
		}
		if len(got) > 0 {
			ws := &wakeSet{parts: map[int32]struct{}{}}
			for _, p := range got {
				ws.parts[p] = struct{}{}
			}
			_, again := parseWake(formatWake(name, ws))
			slices.Sort(again)
			want := slices.Compact(slices.Sorted(maps.Keys(ws.parts)))
			if !slices.Equal(again, want) {
				t.Fatalf("round trip of %v: %v", want, again)
			}
		}
	})
}
