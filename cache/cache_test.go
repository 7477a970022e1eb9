package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/internal/testenv"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// newTestCache returns a cache over a client of its own on addr.
func newTestCache(t testing.TB, addr, prefix string, o Options) *Cache {
	t.Helper()
	o.Prefix = prefix
	if o.MACKey == nil {
		o.MACKey = testMACKey // shared, as by the instances of one cluster
	}
	if o.Logger == nil {
		o.Logger = quiet
	}
	c, err := Dial(addr, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// source is a fake database: one value per key, with a version.
type source struct {
	mu    sync.Mutex
	vals  map[string]Entry
	loads atomic.Int64
	gate  chan struct{} // if set, loads wait on it
}

func newSource() *source { return &source{vals: map[string]Entry{}} }

func (s *source) set(k, v string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.vals[k]
	e.Found, e.Value, e.Version = true, v, e.Version+1
	s.vals[k] = e
	return e.Version
}

func (s *source) loader(k string) Loader {
	return func(ctx context.Context) (Entry, error) {
		s.loads.Add(1)
		s.mu.Lock()
		e := s.vals[k]
		s.mu.Unlock()
		if s.gate != nil {
			<-s.gate
		}
		return e, nil
	}
}

func mustGet(t testing.TB, c *Cache, k string, s *source) Entry {
	t.Helper()
	e, err := c.Get(context.Background(), k, time.Minute, s.loader(k))
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// readUntilLocalHit reads k on c until a read answers from memory. The
// pushes of the first load's lease and store may evict a copy made before
// they arrive, so the first copies may not last.
func readUntilLocalHit(t testing.TB, c *Cache, k string, s *source) {
	t.Helper()
	for i := 0; c.Stats().LocalHits == 0; i++ {
		if i == 100 {
			t.Fatalf("never a local hit: %+v", c.Stats())
		}
		mustGet(t, c, k, s)
	}
}

func TestReadThroughLocalHitAndPrefix(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	k := c.ConfigKey("ns", "a")
	s.set(k, `1`)
	if e := mustGet(t, c, k, s); !e.Found || e.Value != `1` || e.Version != 1 {
		t.Fatalf("first read = %+v", e)
	}
	// Once the first load's pushes have arrived (a copy from memory shows
	// it), reads stay in memory.
	readUntilLocalHit(t, c, k, s)
	before := c.Stats().LocalHits
	for range 5 {
		if e := mustGet(t, c, k, s); e.Value != `1` {
			t.Fatalf("read = %+v", e)
		}
	}
	st := c.Stats()
	if s.loads.Load() != 1 || st.Loads != 1 {
		t.Fatalf("loads: source %d, stats %+v; want 1", s.loads.Load(), st)
	}
	if hits := st.LocalHits - before; hits < 4 {
		t.Fatalf("local hits %d of 5 reads after the first, want ≥ 4 (%+v)", hits, st)
	}
	// Every key the cache wrote carries the prefix, and the session key
	// names the hash, never a token.
	raw := rawClient(t, addr)
	keys, err := raw.Do(context.Background(), raw.B().Keys().Pattern(prefix+"*").Build()).AsStrSlice()
	if err != nil || !slices.Equal(keys, []string{prefix + "c:ns:a"}) {
		t.Fatalf("keys under prefix = %v, %v", keys, err)
	}
	if got, want := c.SessionKey([]byte{0xab, 0x01}), prefix+"s:ab01"; got != want {
		t.Fatalf("SessionKey = %q, want %q", got, want)
	}
}

func rawClient(t testing.TB, addr string) rueidis.Client {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func TestNotFoundIsCached(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	k := c.ConfigKey("ns", "missing")
	for range 3 {
		if e := mustGet(t, c, k, s); e.Found {
			t.Fatalf("read = %+v", e)
		}
	}
	if n := s.loads.Load(); n != 1 {
		t.Fatalf("%d loads, want 1", n)
	}
	raw := rawClient(t, addr)
	pttl, err := raw.Do(context.Background(), raw.B().Pttl().Key(k).Build()).AsInt64()
	if err != nil || pttl <= 0 || pttl > (5*time.Second).Milliseconds() {
		t.Fatalf("not-found entry PTTL = %d ms, %v; want ≤ 5 s", pttl, err)
	}
}

func TestSessionTTLNeverPastExpiry(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{})
	hash := []byte("0123456789abcdef0123456789abcdef")
	expires := time.Now().Add(300 * time.Millisecond)
	load := func(context.Context) (Entry, error) {
		// A database that would still hand out the expired row: the
		// cache must hide it anyway.
		return Entry{Found: true, Owner: "bob", Value: `{}`, Version: 1, ExpiresAt: expires}, nil
	}
	e, err := c.GetSession(context.Background(), hash, load)
	if err != nil || !e.Found {
		t.Fatalf("GetSession = %+v, %v", e, err)
	}
	raw := rawClient(t, addr)
	pttl, err := raw.Do(context.Background(), raw.B().Pttl().Key(c.SessionKey(hash)).Build()).AsInt64()
	if err != nil || pttl > 300 {
		t.Fatalf("session PTTL = %d ms, %v; want ≤ 300", pttl, err)
	}
	time.Sleep(time.Until(expires))
	for range 3 {
		if e, err := c.GetSession(context.Background(), hash, load); err != nil || e.Found {
			t.Fatalf("expired session served: %+v, %v", e, err)
		}
	}
}

func TestSingleLoaderPerKey(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	// Two processes, eight readers each, one key. A Redis call that times
	// out reads the database directly (by design), so on a loaded machine
	// the default 50 ms would count such reads as extra loads.
	a := newTestCache(t, addr, prefix, Options{RedisTimeout: 2 * time.Second})
	b := newTestCache(t, addr, prefix, Options{RedisTimeout: 2 * time.Second})
	s := newSource()
	k := a.ConfigKey("ns", "hot")
	s.set(k, `"v"`)
	s.gate = make(chan struct{})
	var wg sync.WaitGroup
	for i := range 16 {
		c := a
		if i%2 == 1 {
			c = b
		}
		wg.Go(func() {
			if e := mustGet(t, c, k, s); e.Value != `"v"` {
				t.Errorf("read = %+v", e)
			}
		})
	}
	time.Sleep(50 * time.Millisecond) // let every reader arrive
	close(s.gate)
	wg.Wait()
	if n := s.loads.Load(); n != 1 {
		t.Fatalf("%d loads for 16 concurrent readers in 2 processes, want 1", n)
	}
}

func TestStaleSetIsRefused(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	a := newTestCache(t, addr, prefix, Options{})
	b := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	k := a.ConfigKey("ns", "k")
	s.set(k, `"old"`)
	s.gate = make(chan struct{})
	got := make(chan Entry)
	go func() {
		e, _ := a.Get(context.Background(), k, time.Minute, s.loader(k))
		got <- e
	}()
	for s.loads.Load() == 0 { // a has read "old" and waits
		time.Sleep(time.Millisecond)
	}
	s.set(k, `"new"`)
	if err := b.Invalidate(context.Background(), k); err != nil {
		t.Fatal(err)
	}
	close(s.gate)
	if e := <-got; e.Value != `"old"` {
		t.Fatalf("the slow reader got %+v", e) // it started before the write
	}
	s.gate = nil
	raw := rawClient(t, addr)
	if err := raw.Do(context.Background(), raw.B().Get().Key(k).Build()).Error(); !rueidis.IsRedisNil(err) {
		t.Fatalf("Redis holds the slow reader's value: %v", err)
	}
	for _, c := range []*Cache{a, b} {
		if e := mustGet(t, c, k, s); e.Value != `"new"` {
			t.Fatalf("after the write: %+v", e)
		}
	}
}

// TestInvalidationReachesOtherProcess: read on A (now in A's memory),
// write on B, and A reads the new value once Redis's push arrived.
func TestInvalidationReachesOtherProcess(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	pushed := make(chan string, 16)
	a := newTestCache(t, addr, prefix, Options{OnInvalidation: func(k string) { pushed <- k }})
	b := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	k := a.ConfigKey("ns", "k")
	s.set(k, `1`)
	readUntilLocalHit(t, a, k, s)
	if e := mustGet(t, a, k, s); e.Value != `1` {
		t.Fatalf("A reads %+v", e)
	}
	for len(pushed) > 0 {
		<-pushed
	}
	s.set(k, `2`)
	if err := b.Invalidate(context.Background(), k); err != nil {
		t.Fatal(err)
	}
	// The push may follow a late one of the lease or the store: wait for
	// pushes of k until A reads the new value.
	deadline := time.After(10 * time.Second)
	for {
		if e := mustGet(t, a, k, s); e.Value == `2` && e.Version == 2 {
			return
		}
		select {
		case <-pushed:
		case <-deadline:
			t.Fatalf("A still reads the old value: %+v", a.Stats())
		}
	}
}

// TestWriterReadsItsWrite: right after Invalidate returns, the writing
// process never answers from its memory with the old value, even before
// its own invalidation arrives.
func TestWriterReadsItsWrite(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	for i := range 200 {
		k := c.ConfigKey("ns", fmt.Sprint(i%4))
		mustGet(t, c, k, s)
		mustGet(t, c, k, s) // in memory now
		v := s.set(k, fmt.Sprint(i))
		if err := c.Invalidate(context.Background(), k); err != nil {
			t.Fatal(err)
		}
		if e := mustGet(t, c, k, s); e.Version != v {
			t.Fatalf("write %d: read version %d after acknowledging %d", i, e.Version, v)
		}
	}
}

// withLocalCopy returns a cache (FloorWindow 1 ns, so only fetch times
// protect it) holding config key k = "1" in its memory, fetched at least a
// millisecond ago (copies are stamped in whole ms), its source, and Redis's
// address.
func withLocalCopy(t *testing.T) (addr string, c *Cache, s *source, k string) {
	t.Helper()
	addr, prefix := testenv.Redis(t)
	c = newTestCache(t, addr, prefix, Options{FloorWindow: time.Nanosecond})
	s = newSource()
	k = c.ConfigKey("ns", "k")
	s.set(k, "1")
	readUntilLocalHit(t, c, k, s)
	time.Sleep(2 * time.Millisecond)
	return addr, c, s, k
}

// TestWriterDistrustsCopiesFromBeforeItsWrite: a local copy fetched before
// this process's write does not answer after the write, however late the
// write's invalidation push (here it never comes) and long after
// FloorWindow, until Redis confirms it holds the same bytes; a copy fetched
// after the write answers from memory at once.
func TestWriterDistrustsCopiesFromBeforeItsWrite(t *testing.T) {
	t.Parallel()
	addr, c, s, k := withLocalCopy(t)
	// A write whose delete was acknowledged but whose push is lost: mark
	// the floor without deleting, so the copy stays in memory, and Redis
	// still holds what the copy holds.
	c.markFloors([]string{k})
	before := c.Stats()
	mustGet(t, c, k, s)
	after := c.Stats()
	if after.LocalHits != before.LocalHits || after.Predated != before.Predated+1 || after.RedisHits != before.RedisHits+1 {
		t.Fatalf("the copy from before the write answered unchecked: before %+v, after %+v", before, after)
	}
	// Redis held the same bytes: the copy is verified and answers again,
	// until the next write.
	mustGet(t, c, k, s)
	mustGet(t, c, k, s)
	if st := c.Stats(); st.LocalHits != after.LocalHits+2 || st.Predated != after.Predated {
		t.Fatalf("the verified copy did not answer: %+v", st)
	}
	c.markFloors([]string{k})
	before = c.Stats()
	if mustGet(t, c, k, s); c.Stats().Predated != before.Predated+1 {
		t.Fatalf("a new write did not reset the verification: %+v", c.Stats())
	}
	// The delete arrives (its push evicts the copy); the next copy is
	// fetched after the write and answers from memory.
	s.set(k, "2")
	raw := rawClient(t, addr)
	if err := raw.Do(context.Background(), raw.B().Del().Key(k).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		hits := c.Stats().LocalHits
		e := mustGet(t, c, k, s)
		if e.Value == "2" && c.Stats().LocalHits > hits {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no local hit of the new copy: %+v %+v", e, c.Stats())
		}
		time.Sleep(time.Millisecond)
	}
}

// When an overflow ends, memory copies fetched before the flush do not
// answer unchecked: their invalidation may have been dropped.
func TestCopiesFromBeforeAnOverflowsEndAreChecked(t *testing.T) {
	t.Parallel()
	_, c, s, k := withLocalCopy(t)
	c.overflowEnded.Store(time.Now().UnixNano())
	before := c.Stats()
	mustGet(t, c, k, s)
	if st := c.Stats(); st.LocalHits != before.LocalHits || st.Predated != before.Predated+1 {
		t.Fatalf("a copy from before the overflow's end answered unchecked: before %+v, after %+v", before, st)
	}
}

// A floor never moves back: two writes of one key may mark it in either
// order (a late mark of an older write must not let copies fetched between
// the two answer).
func TestFloorsNeverMoveBack(t *testing.T) {
	var f floors
	f.init()
	// Generations turn over per shard: "other" must share k's.
	other := "other"
	for i := 0; f.shard(other) != f.shard("k"); i++ {
		other = fmt.Sprint("other", i)
	}
	t0 := time.Now()
	f.set("k", 2, t0.Add(time.Second), time.Minute)
	f.set("k", 1, t0, time.Minute)
	if fl, _ := f.get("k"); fl.seq != 2 || !fl.at.Equal(t0.Add(time.Second)) {
		t.Fatalf("floor moved back: %+v", fl)
	}
	// Past keep the generation turns over, and the floor is still found.
	f.set(other, 3, t0.Add(2*time.Minute), time.Minute)
	if fl, ok := f.get("k"); !ok || fl.seq != 2 {
		t.Fatalf("floor lost one generation later: %+v %v", fl, ok)
	}
	f.set(other, 4, t0.Add(4*time.Minute), time.Minute)
	if n := f.n.Load(); n != 2 { // other's, in both generations
		t.Fatalf("%d floors counted, want 2", n)
	}
	if _, ok := f.get("k"); ok {
		t.Fatal("floor kept two generations later")
	}
}

// TestRedisRestart kills the cache's Redis mid-test: reads keep working
// from the database, writes' invalidations queue, and after Redis is back
// values are current and hits return.
func TestRedisRestart(t *testing.T) {
	t.Parallel()
	rs := testenv.NewRedisServer(t)
	opts := Options{BreakerCooldown: 50 * time.Millisecond, RetryInterval: 20 * time.Millisecond}
	a := newTestCache(t, rs.Addr(), "t:", opts)
	b := newTestCache(t, rs.Addr(), "t:", opts)
	s := newSource()
	keys := []string{a.ConfigKey("ns", "x"), a.ConfigKey("ns", "y")}
	for _, k := range keys {
		s.set(k, `"before"`)
		mustGet(t, a, k, s)
		mustGet(t, b, k, s)
	}
	rs.Kill()
	for i := range 50 {
		k := keys[i%2]
		v := s.set(k, fmt.Sprintf(`"during %d"`, i))
		if err := b.Invalidate(context.Background(), k); !errors.Is(err, ErrInvalidationQueued) {
			t.Fatalf("invalidate with Redis down: %v", err)
		}
		for _, c := range []*Cache{a, b} {
			e := mustGet(t, c, k, s)
			if e.Version != v {
				t.Fatalf("Redis down, read %d: version %d, want %d", i, e.Version, v)
			}
		}
	}
	if st := b.Stats(); st.Breaker != BreakerOpen || st.Pending != 2 {
		t.Fatalf("with Redis down: %+v", st)
	}
	rs.Start()
	// Caching resumes by itself: wait for the retry queue to drain and
	// for a local hit on both processes.
	deadline := time.Now().Add(20 * time.Second)
	for _, c := range []*Cache{a, b} {
		before := c.Stats().LocalHits
		for c.Stats().LocalHits == before || c.Stats().Pending > 0 {
			if time.Now().After(deadline) {
				t.Fatalf("caching did not resume: %+v", c.Stats())
			}
			for _, k := range keys {
				if e := mustGet(t, c, k, s); e.Version != s.vals[k].Version {
					t.Fatalf("after restart: version %d, want %d", e.Version, s.vals[k].Version)
				}
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	t.Logf("a: %+v", a.Stats())
	t.Logf("b: %+v", b.Stats())
}

// TestInvalidationDelay measures δ: from the writer's Invalidate returning
// to the other process having dropped its copy. Run with -v to see it.
func TestInvalidationDelay(t *testing.T) {
	addr, prefix := testenv.Redis(t)
	var (
		mu   sync.Mutex
		seen = map[string]time.Time{}
	)
	a := newTestCache(t, addr, prefix, Options{OnInvalidation: func(k string) {
		now := time.Now()
		mu.Lock()
		seen[k] = now
		mu.Unlock()
	}})
	b := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	const n = 2000
	deltas := make([]time.Duration, 0, n)
	for i := range n {
		k := a.ConfigKey("d", fmt.Sprint(i%16))
		s.set(k, fmt.Sprint(i))
		// Read until A answers from memory (the first read loads, the
		// second usually fetches from Redis).
		for j := 0; ; j++ {
			hits := a.Stats().LocalHits
			mustGet(t, a, k, s)
			if a.Stats().LocalHits > hits {
				break
			}
			if j == 100 {
				t.Fatalf("write %d: never in A's memory: %+v", i, a.Stats())
			}
		}
		mu.Lock()
		delete(seen, k)
		mu.Unlock()
		if err := b.Invalidate(context.Background(), k); err != nil {
			t.Fatal(err)
		}
		ack := time.Now()
		for {
			mu.Lock()
			at, ok := seen[k]
			delete(seen, k)
			mu.Unlock()
			if ok {
				deltas = append(deltas, max(0, at.Sub(ack)))
				break
			}
			time.Sleep(20 * time.Microsecond)
		}
	}
	p50, p99, pmax := percentiles(deltas)
	t.Logf("δ (write ack → other process's copy dropped), %d writes: p50 %v, p99 %v, max %v", n, p50, p99, pmax)
}

func percentiles(d []time.Duration) (p50, p99, pmax time.Duration) {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[len(d)/2], d[len(d)*99/100], d[len(d)-1]
}

func TestListConfigTooLarge(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{MaxListEntries: 2})
	list := []Entry{{Key: "a", Value: "1"}, {Key: "b", Value: "2"}}
	e, err := c.ListConfig(context.Background(), "ns", func(context.Context) (Entry, error) { return Entry{List: list}, nil })
	if err != nil || !e.Found || len(e.List) != 2 || e.List[1].Key != "b" {
		t.Fatalf("ListConfig = %+v, %v", e, err)
	}
	list = append(list, Entry{Key: "c", Value: "3"})
	e, err = c.ListConfig(context.Background(), "big", func(context.Context) (Entry, error) { return Entry{List: list}, nil })
	if err != nil || !e.TooLarge {
		t.Fatalf("ListConfig of 3 = %+v, %v", e, err)
	}
}

func TestBreaker(t *testing.T) {
	b := breaker{threshold: 2, cooldown: time.Second}
	t0 := time.Unix(1000, 0)
	ms := time.Millisecond
	steps := []struct {
		do       string
		from, at time.Duration // a failed call's start and end
		allow    bool
		want     BreakerState
	}{
		{"allow", 0, 0, true, BreakerClosed},
		{"fail", 0, 50 * ms, false, BreakerClosed},
		// In flight with the failure before: one stall, counted once.
		{"fail", 10 * ms, 60 * ms, false, BreakerClosed},
		{"fail", 40 * ms, 90 * ms, false, BreakerClosed},
		// Begun after it: Redis still failing.
		{"fail", 60 * ms, 110 * ms, false, BreakerOpen},
		{"allow", 0, 600 * ms, false, BreakerOpen},
		{"allow", 0, 1200 * ms, true, BreakerHalfOpen},
		{"allow", 0, 1200 * ms, false, BreakerHalfOpen}, // one probe at a time
		{"fail", 1200 * ms, 1250 * ms, false, BreakerOpen},
		{"allow", 0, 2300 * ms, true, BreakerHalfOpen},
		{"ok", 0, 2300 * ms, false, BreakerClosed},
		{"allow", 0, 2300 * ms, true, BreakerClosed},
		{"fail", 2300 * ms, 2350 * ms, false, BreakerClosed},
		{"ok", 0, 2360 * ms, false, BreakerClosed}, // a success starts the count over
		{"fail", 2200 * ms, 2400 * ms, false, BreakerClosed},
		{"fail", 2300 * ms, 2450 * ms, false, BreakerClosed},
		{"fail", 2400 * ms, 2500 * ms, false, BreakerOpen},
	}
	for i, s := range steps {
		now := t0.Add(s.at)
		switch s.do {
		case "allow":
			if got := b.allow(now); got != s.allow {
				t.Fatalf("step %d: allow = %v", i, got)
			}
		case "fail":
			b.failure(t0.Add(s.from), now)
		case "ok":
			b.success()
		}
		if got := b.current(); got != s.want {
			t.Fatalf("step %d (%s): state %v, want %v", i, s.do, got, s.want)
		}
	}
}

func TestEncodeRoundTrip(t *testing.T) {
	at := time.Unix(1700000000, 123456789)
	until := time.UnixMilli(1700000600123)
	for _, e := range []Entry{
		{},
		{TooLarge: true},
		{Found: true, Owner: "bob", Value: `{"ip":"10.0.0.1"}`, Version: 7, UpdatedAt: at, ExpiresAt: at.Add(time.Hour)},
		{Found: true, Value: `"x"`, Version: 1 << 40},
		{Found: true, List: []Entry{{Found: true, Key: "a", Value: "1", Version: 1, UpdatedAt: at}, {Found: true, Key: "b", Value: "[]", Version: 2}}},
	} {
		got, gotUntil, err := decode(string(encode(e, until)))
		if err != nil || !entryEqual(got, e) || !gotUntil.Equal(until) {
			t.Fatalf("round trip of %+v = %+v until %v, %v", e, got, gotUntil, err)
		}
	}
	for _, bad := range []string{"", "\x02", "\x02N", "\x02N\x01?", "\x02Z\x01", "\x02V\x01", "\x02V\x01\x02\x00\x00\x05ab", "\x00lease",
		"\x01V\x02\x00\x00\x00\x00\x00"} {
		if _, _, err := decode(bad); err == nil {
			t.Fatalf("decode(%q) accepted", bad)
		}
	}
}

var testMACKey = []byte("0123456789abcdef0123456789abcdef")

// An entry is served only under the MAC key and Redis key it was sealed
// with, and only until the validity it was sealed with.
func TestSealOpen(t *testing.T) {
	m := newMACer(testMACKey)
	now := time.Now()
	e := Entry{Found: true, Owner: "bob", Value: `{"role":"user"}`, Version: 3, ExpiresAt: now.Add(time.Hour)}
	s := m.seal("p:s:aa", e, now.Add(time.Minute))
	if got, err := m.open("p:s:aa", s, now, false); err != nil || !entryEqual(got, e) {
		t.Fatalf("open = %+v, %v", got, err)
	}
	other := newMACer([]byte("another key, just as long as one"))
	forged := Entry{Found: true, Owner: "bob", Value: `{"role":"admin"}`, Version: 3, ExpiresAt: now.Add(time.Hour)}
	flipped := []byte(s)
	flipped[len(flipped)-macSize-3] ^= 1
	for name, c := range map[string]struct{ key, s string }{
		"other Redis key": {"p:s:bb", s},
		"other MAC key":   {"p:s:aa", other.seal("p:s:aa", e, now.Add(time.Minute))},
		"unsigned":        {"p:s:aa", string(encode(forged, now.Add(time.Minute)))},
		"bit flipped":     {"p:s:aa", string(flipped)},
		"old format":      {"p:s:aa", "\x01N"},
		"MAC only":        {"p:s:aa", s[len(s)-macSize:]},
		"empty":           {"p:s:aa", ""},
	} {
		if _, err := m.open(c.key, c.s, now, false); !errors.Is(err, errBadMAC) {
			t.Errorf("%s: open = %v, want errBadMAC", name, err)
		}
	}
	if _, err := m.open("p:s:aa", s, now.Add(time.Minute+time.Millisecond), false); !errors.Is(err, errPastValidity) {
		t.Errorf("past validity: open = %v", err)
	}
}

// A memory copy handed out again (the same string) is not checked again;
// any other string is, even with the same bytes or under the same key.
func TestOpenRemembersVerifiedCopies(t *testing.T) {
	m := newMACer(testMACKey)
	now := time.Now()
	e := Entry{Found: true, Owner: "bob", Value: `{"role":"user"}`, Version: 3}
	s := m.seal("p:s:aa", e, now.Add(time.Minute))
	open := func(key, s string, now time.Time) error {
		_, err := m.open(key, s, now, true)
		return err
	}
	before := m.computed.Load()
	for range 3 {
		if err := open("p:s:aa", s, now); err != nil {
			t.Fatal(err)
		}
	}
	if n := m.computed.Load() - before; n != 1 {
		t.Fatalf("%d MACs computed for one string read three times, want 1", n)
	}
	same := strings.Clone(s) // the same bytes, another string
	before = m.computed.Load()
	if err := open("p:s:aa", same, now); err != nil || m.computed.Load()-before != 1 {
		t.Fatalf("a copy of the bytes: %v, %d computed", err, m.computed.Load()-before)
	}
	forged := []byte(s)
	forged[len(forged)-macSize-3] ^= 1
	if err := open("p:s:aa", string(forged), now); !errors.Is(err, errBadMAC) {
		t.Fatalf("forged bytes under a remembered key: %v", err)
	}
	if err := open("p:s:bb", same, now); !errors.Is(err, errBadMAC) {
		t.Fatalf("a remembered string under another key: %v", err)
	}
	if err := open("p:s:aa", same, now.Add(2*time.Minute)); !errors.Is(err, errPastValidity) {
		t.Fatalf("a remembered string past its validity: %v", err)
	}
}

func entryEqual(a, b Entry) bool {
	if a.Found != b.Found || a.TooLarge != b.TooLarge || a.Key != b.Key || a.Owner != b.Owner || a.Value != b.Value ||
		a.Version != b.Version || !a.UpdatedAt.Equal(b.UpdatedAt) || !a.ExpiresAt.Equal(b.ExpiresAt) || len(a.List) != len(b.List) {
		return false
	}
	for i := range a.List {
		if !entryEqual(a.List[i], b.List[i]) {
			return false
		}
	}
	return true
}

// FuzzDecode: no input panics the decoder or the MAC check; what decode
// accepts re-encodes to an equal entry; what open accepts is good for one
// Redis key and one MAC key only. Seeds are also in testdata/fuzz/FuzzDecode.
func FuzzDecode(f *testing.F) {
	at := time.Unix(1700000000, 5)
	until := time.UnixMilli(1700000600000)
	f.Add(string(encode(Entry{}, until)))
	f.Add(string(encode(Entry{TooLarge: true}, until)))
	f.Add(string(encode(Entry{Found: true, Owner: "u", Value: `{}`, Version: 3, UpdatedAt: at, ExpiresAt: at}, until)))
	f.Add(string(encode(Entry{Found: true, List: []Entry{{Key: "k", Value: "1", Version: 1}}}, until)))
	f.Add(newMACer(testMACKey).seal("k", Entry{Found: true, Owner: "u", Value: `{}`}, until))
	f.Add("\x00lease")
	m := newMACer(testMACKey)
	f.Fuzz(func(t *testing.T, s string) {
		if _, err := m.open("k", s, at, false); err == nil {
			if _, err := m.open("k2", s, at, false); err == nil {
				t.Fatalf("open accepted %q under two keys", s)
			}
			if _, err := newMACer([]byte("another key, just as long as one")).open("k", s, at, false); err == nil {
				t.Fatalf("open accepted %q under two MAC keys", s)
			}
		}
		if _, err := m.open("k", s, at, true); err == nil {
			if _, err := m.open("k2", s, at, true); err == nil {
				t.Fatalf("open accepted %q under two keys", s)
			}
		}
		sealed := m.seal("k", Entry{Found: true, Value: s}, until)
		if e, err := m.open("k", sealed, at, false); err != nil || e.Value != s {
			t.Fatalf("sealed %q opens to %+v, %v", s, e, err)
		}
		e, v, err := decode(s)
		if err != nil {
			return
		}
		if e2, v2, err := decode(string(encode(e, v))); err != nil || !entryEqual(e, e2) || !v.Equal(v2) {
			t.Fatalf("re-encoding %+v decodes to %+v, %v", e, e2, err)
		}
	})
}

// BenchmarkGetSessionHit is the in-process hit path: a session already in
// this process's memory.
func BenchmarkGetSessionHit(b *testing.B) {
	addr, prefix := testenv.Redis(b)
	c := newTestCache(b, addr, prefix, Options{})
	hash := []byte("0123456789abcdef0123456789abcdef")
	sess := Entry{Found: true, Owner: "bench-user", Value: `{"ip":"10.0.0.7","ua":"bench"}`, Version: 3, ExpiresAt: time.Now().Add(time.Hour)}
	load := func(context.Context) (Entry, error) { return sess, nil }
	ctx := context.Background()
	for range 2 {
		if _, err := c.GetSession(ctx, hash, load); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		e, err := c.GetSession(ctx, hash, load)
		if err != nil || !e.Found {
			b.Fatal(e, err)
		}
	}
	b.StopTimer()
	st := c.Stats()
	b.ReportMetric(float64(st.LocalHits)/float64(st.LocalHits+st.RedisHits+st.Misses), "local-hit-ratio")
}

// TestDialWhileRedisDown: a cache made while Redis is down reads the
// database, queues invalidations, and starts caching once Redis answers.
func TestDialWhileRedisDown(t *testing.T) {
	t.Parallel()
	rs := testenv.NewRedisServer(t)
	rs.Kill()
	c := newTestCache(t, rs.Addr(), "t:", Options{RetryInterval: 20 * time.Millisecond})
	s := newSource()
	k := c.ConfigKey("ns", "k")
	s.set(k, "1")
	if e := mustGet(t, c, k, s); e.Value != "1" {
		t.Fatalf("read = %+v", e)
	}
	if err := c.Invalidate(context.Background(), k); !errors.Is(err, ErrInvalidationQueued) {
		t.Fatalf("Invalidate before connecting = %v", err)
	}
	rs.Start()
	deadline := time.Now().Add(20 * time.Second)
	for c.Stats().LocalHits == 0 || c.Stats().Pending > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("never connected: %+v", c.Stats())
		}
		mustGet(t, c, k, s)
		time.Sleep(20 * time.Millisecond)
	}
}

// BenchmarkOpen is the MAC check and decode every hit pays: a session, and
// a namespace list at the 1 MiB cap.
func BenchmarkOpen(b *testing.B) {
	m := newMACer(testMACKey)
	until := time.Now().Add(time.Hour)
	big := Entry{Found: true}
	for i := range 1000 {
		big.List = append(big.List, Entry{Found: true, Key: fmt.Sprintf("key-%04d", i), Value: strings.Repeat("x", 1000), Version: 1})
	}
	for _, c := range []struct {
		name string
		e    Entry
	}{
		{"session", Entry{Found: true, Owner: "bench-user", Value: `{"ip":"10.0.0.7","ua":"bench"}`, Version: 3, ExpiresAt: until}},
		{"list-1MiB", big},
	} {
		s := m.seal("shardgate:s:0123456789abcdef0123456789abcdef", c.e, until)
		body := s[:len(s)-macSize]
		b.Run(c.name+"/decode-only", func(b *testing.B) { // what a hit paid before entries were signed
			b.SetBytes(int64(len(s)))
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := decode(body); err != nil {
					b.Fatal(err)
				}
			}
		})
		for _, again := range []bool{false, true} {
			name := c.name // as read from Redis
			if again {
				name += "/memory-copy" // the same string handed out again
			}
			b.Run(name, func(b *testing.B) {
				b.SetBytes(int64(len(s)))
				b.ReportAllocs()
				now := time.Now()
				for b.Loop() {
					if _, err := m.open("shardgate:s:0123456789abcdef0123456789abcdef", s, now, again); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
