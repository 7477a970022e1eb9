package server

import (
	"context"
	"fmt"
	"io"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// pushes collects the keys Redis invalidates in one server's cache.
type pushes struct {
	mu   sync.Mutex
	keys map[string]int
}

func (p *pushes) note(k string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.keys[k]++
}

func (p *pushes) count(k string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.keys[k]
}

// waitPush waits until k has been pushed more than before times.
func (p *pushes) waitPush(t testing.TB, k string, before int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.count(k) <= before {
		if time.Now().After(deadline) {
			t.Fatalf("no invalidation of %s arrived", k)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// TestCacheAcrossInstances: read on A (now in A's memory), write on B, and
// A reads the new value once the invalidation reached it — for sessions
// (touch, revoke, delete user) and config (set, delete, list).
func TestCacheAcrossInstances(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 2)
	addr, prefix := testenv.Redis(t)
	pa := &pushes{keys: map[string]int{}}
	a := c.start(t, false, withCache(t, addr, prefix, cache.Options{OnInvalidation: pa.note}))
	b := c.start(t, false, withCache(t, addr, prefix, cache.Options{}))
	ctx := ctxT(t)
	ca := a.srv.Cache()

	if _, err := b.data.PutUser(ctx, &pb.PutUserRequest{UserId: "ann"}); err != nil {
		t.Fatal(err)
	}
	s1, err := b.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "ann", DataJson: `{"n":1}`, TtlSeconds: 600})
	if err != nil {
		t.Fatal(err)
	}
	s2, err := b.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "ann", TtlSeconds: 600})
	if err != nil {
		t.Fatal(err)
	}
	key1, key2 := ca.SessionKey(hashToken(s1.Token)), ca.SessionKey(hashToken(s2.Token))

	// readUntilLocal reads on A until A answers from its memory.
	readUntilLocal := func(read func() error) {
		t.Helper()
		for i := 0; ; i++ {
			hits := ca.Stats().LocalHits
			if err := read(); err != nil {
				t.Fatal(err)
			}
			if ca.Stats().LocalHits > hits {
				return
			}
			if i == 100 {
				t.Fatalf("never a local hit: %+v", ca.Stats())
			}
		}
	}
	getSession := func(tok string) (*pb.GetSessionResponse, error) {
		return a.data.GetSession(ctx, &pb.GetSessionRequest{Token: tok})
	}
	readUntilLocal(func() error { _, err := getSession(s1.Token); return err })
	readUntilLocal(func() error { _, err := getSession(s2.Token); return err })

	n := pa.count(key1)
	touched, err := b.data.TouchSession(ctx, &pb.TouchSessionRequest{Token: s1.Token, TtlSeconds: 900})
	if err != nil {
		t.Fatal(err)
	}
	pa.waitPush(t, key1, n)
	if got, err := getSession(s1.Token); err != nil || got.Version != touched.Version || !got.ExpiresAt.AsTime().Equal(touched.ExpiresAt.AsTime()) {
		t.Fatalf("A after B's touch: %v, %v; want version %d", got, err, touched.Version)
	}

	readUntilLocal(func() error { _, err := getSession(s1.Token); return err })
	n = pa.count(key1)
	if _, err := b.data.RevokeSession(ctx, &pb.RevokeSessionRequest{Token: s1.Token}); err != nil {
		t.Fatal(err)
	}
	pa.waitPush(t, key1, n)
	_, err = getSession(s1.Token)
	wantCode(t, err, codes.NotFound)

	n = pa.count(key2)
	if _, err := b.data.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: "ann"}); err != nil {
		t.Fatal(err)
	}
	pa.waitPush(t, key2, n)
	_, err = getSession(s2.Token)
	wantCode(t, err, codes.NotFound)

	// Config: a value and its namespace's list.
	if _, err := b.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "app", Key: "color", ValueJson: `"red"`}); err != nil {
		t.Fatal(err)
	}
	getConfig := func() (*pb.GetConfigResponse, error) {
		return a.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "app", Key: "color"})
	}
	listConfig := func() (*pb.ListConfigResponse, error) {
		return a.data.ListConfig(ctx, &pb.ListConfigRequest{Namespace: "app"})
	}
	readUntilLocal(func() error { _, err := getConfig(); return err })
	readUntilLocal(func() error { _, err := listConfig(); return err })
	ck, lk := ca.ConfigKey("app", "color"), ca.ConfigListKey("app")
	nc, nl := pa.count(ck), pa.count(lk)
	if _, err := b.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "app", Key: "color", ValueJson: `"blue"`}); err != nil {
		t.Fatal(err)
	}
	pa.waitPush(t, ck, nc)
	pa.waitPush(t, lk, nl)
	if got, err := getConfig(); err != nil || got.ValueJson != `"blue"` || got.Version != 2 {
		t.Fatalf("A after B's set: %v, %v", got, err)
	}
	if got, err := listConfig(); err != nil || len(got.Entries) != 1 || got.Entries[0].ValueJson != `"blue"` {
		t.Fatalf("A's list after B's set: %v, %v", got, err)
	}
	readUntilLocal(func() error { _, err := getConfig(); return err })
	nc = pa.count(ck)
	if _, err := b.data.DeleteConfig(ctx, &pb.DeleteConfigRequest{Namespace: "app", Key: "color"}); err != nil {
		t.Fatal(err)
	}
	pa.waitPush(t, ck, nc)
	_, err = getConfig()
	wantCode(t, err, codes.NotFound)
	if got, err := listConfig(); err != nil || len(got.Entries) != 0 {
		t.Fatalf("A's list after B's delete: %v, %v", got, err)
	}
}

// TestCachedListConfigPages: ListConfig from the cache pages exactly like
// the database.
func TestCachedListConfigPages(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	addr, prefix := testenv.Redis(t)
	ts := c.start(t, false, withCache(t, addr, prefix, cache.Options{MaxListEntries: 5}))
	ctx := ctxT(t)
	noCache := metadata.AppendToOutgoingContext(ctx, CacheMetadataKey, "no-cache")
	for _, ns := range []struct {
		name string
		n    int
	}{{"small", 4}, {"large", 9}} {
		for i := range ns.n {
			if _, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: ns.name, Key: fmt.Sprintf("k%02d", i), ValueJson: fmt.Sprint(i)}); err != nil {
				t.Fatal(err)
			}
		}
		for _, size := range []int32{1, 2, 3, 100} {
			var pages [2][]string
			for j, ctx := range []context.Context{ctx, noCache} {
				tok := ""
				for {
					resp, err := ts.data.ListConfig(ctx, &pb.ListConfigRequest{Namespace: ns.name, PageSize: size, PageToken: tok})
					if err != nil {
						t.Fatal(err)
					}
					var keys []string
					for _, e := range resp.Entries {
						keys = append(keys, e.Key+"="+e.ValueJson)
					}
					pages[j] = append(pages[j], strings.Join(keys, ","))
					if tok = resp.NextPageToken; tok == "" {
						break
					}
				}
			}
			if !slices.Equal(pages[0], pages[1]) {
				t.Fatalf("%s, page size %d: cached pages %q, database pages %q", ns.name, size, pages[0], pages[1])
			}
		}
	}
}

// TestNoCacheMetadata: "shardgate-cache: no-cache" reads the database and
// leaves the cache alone.
func TestNoCacheMetadata(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	addr, prefix := testenv.Redis(t)
	ts := c.start(t, false, withCache(t, addr, prefix, cache.Options{}))
	ctx := ctxT(t)
	if _, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "n", Key: "k", ValueJson: `1`}); err != nil {
		t.Fatal(err)
	}
	get := func(ctx context.Context) string {
		t.Helper()
		r, err := ts.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "n", Key: "k"})
		if err != nil {
			t.Fatal(err)
		}
		return r.ValueJson
	}
	get(ctx) // cached now
	// A change the cache is not told about (as if its invalidation were
	// lost) shows only with no-cache.
	c.exec(t, "catalog", `UPDATE config SET value = '2', version = version + 1 WHERE namespace = 'n' AND key = 'k'`)
	noCache := metadata.AppendToOutgoingContext(ctx, CacheMetadataKey, "no-cache")
	before := ts.srv.Cache().Stats()
	if got := get(noCache); got != `2` {
		t.Fatalf("no-cache read %s, want 2", got)
	}
	if after := ts.srv.Cache().Stats(); after != before {
		t.Fatalf("a no-cache read touched the cache: %+v → %+v", before, after)
	}
	if got := get(ctx); got != `1` {
		t.Fatalf("cached read %s; want the cached 1", got)
	}
}

// TestWriterNeverReadsOlder: through one instance, a read after a write's
// reply never returns an older version, even before the instance's own
// invalidation arrives; a revoked session is gone at once.
func TestWriterNeverReadsOlder(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	addr, prefix := testenv.Redis(t)
	ts := c.start(t, false, withCache(t, addr, prefix, cache.Options{}))
	ctx := ctxT(t)
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "wes"}); err != nil {
		t.Fatal(err)
	}
	s, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "wes", TtlSeconds: 600})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: s.Token})
		ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: s.Token})
		tr, err := ts.data.TouchSession(ctx, &pb.TouchSessionRequest{Token: s.Token, TtlSeconds: 600})
		if err != nil {
			t.Fatal(err)
		}
		if got, err := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: s.Token}); err != nil || got.Version < tr.Version {
			t.Fatalf("touch %d: read %v, %v after acknowledging version %d", i, got, err, tr.Version)
		}
		ts.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "w", Key: "k"})
		cr, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "w", Key: "k", ValueJson: fmt.Sprint(i)})
		if err != nil {
			t.Fatal(err)
		}
		if got, err := ts.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "w", Key: "k"}); err != nil || got.Version < cr.Version {
			t.Fatalf("set %d: read %v, %v after acknowledging version %d", i, got, err, cr.Version)
		}
	}
	if _, err := ts.data.RevokeSession(ctx, &pb.RevokeSessionRequest{Token: s.Token}); err != nil {
		t.Fatal(err)
	}
	_, err = ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: s.Token})
	wantCode(t, err, codes.NotFound)
	t.Logf("cache: %+v", ts.srv.Cache().Stats())
}

// TestRedisKilledMidTest: with the cache's Redis killed, every read still
// succeeds from Postgres and writes succeed; once Redis is back, values are
// current on both instances and local hits return.
func TestRedisKilledMidTest(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	rs := testenv.NewRedisServer(t)
	o := cache.Options{BreakerCooldown: 50 * time.Millisecond, RetryInterval: 20 * time.Millisecond}
	a := c.start(t, false, withCache(t, rs.Addr(), "sg:", o))
	b := c.start(t, false, withCache(t, rs.Addr(), "sg:", o))
	ctx := ctxT(t)
	if _, err := a.data.PutUser(ctx, &pb.PutUserRequest{UserId: "kim"}); err != nil {
		t.Fatal(err)
	}
	sess, err := a.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "kim", TtlSeconds: 600})
	if err != nil {
		t.Fatal(err)
	}
	var version int64 = 1
	check := func(what string) {
		t.Helper()
		for _, ts := range []*testServer{a, b} {
			got, err := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: sess.Token})
			if err != nil || got.Version != version {
				t.Fatalf("%s: GetSession = %v, %v; want version %d", what, got, err, version)
			}
			cfg, err := ts.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "r", Key: "k"})
			if want := fmt.Sprint(version); err != nil || cfg.ValueJson != want {
				t.Fatalf("%s: GetConfig = %v, %v; want %s", what, cfg, err, want)
			}
		}
	}
	write := func(on *testServer) {
		t.Helper()
		tr, err := on.data.TouchSession(ctx, &pb.TouchSessionRequest{Token: sess.Token, TtlSeconds: 600})
		if err != nil {
			t.Fatal(err)
		}
		version = tr.Version
		if _, err := on.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "r", Key: "k", ValueJson: fmt.Sprint(version)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "r", Key: "k", ValueJson: "1"}); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		check("before the kill")
	}
	rs.Kill()
	for i := range 20 {
		write([]*testServer{a, b}[i%2])
		check("Redis down")
	}
	rs.Start()
	deadline := time.Now().Add(20 * time.Second)
	for _, ts := range []*testServer{a, b} {
		cc := ts.srv.Cache()
		hits := cc.Stats().LocalHits
		for cc.Stats().LocalHits == hits || cc.Stats().Pending > 0 {
			if time.Now().After(deadline) {
				t.Fatalf("caching did not resume: %+v", cc.Stats())
			}
			check("Redis back")
			time.Sleep(10 * time.Millisecond)
		}
	}
	write(b)
	check("after one more write")
	t.Logf("a: %+v", a.srv.Cache().Stats())
	t.Logf("b: %+v", b.srv.Cache().Stats())
}

func TestCacheMetrics(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	addr, prefix := testenv.Redis(t)
	ts := c.start(t, false, withCache(t, addr, prefix, cache.Options{}))
	ctx := ctxT(t)
	for range 3 {
		ts.data.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "m", Key: "k"})
	}
	rec := httptest.NewRecorder()
	ts.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		`shardgate_cache_reads_total{outcome="local"}`,
		`shardgate_cache_reads_total{outcome="miss"}`,
		`shardgate_cache_loads_total 1`,
		`shardgate_cache_invalidations_total{direction="received"}`,
		`shardgate_cache_redis_errors_total 0`,
		`shardgate_cache_breaker_state 0`,
		`shardgate_cache_overflow 0`,
		`shardgate_cache_prefix_flushes_total 0`,
		`shardgate_cache_predated_total`,
		`shardgate_cache_dropped_invalidations_total 0`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// TestInvalidationDelay measures δ end to end: from B's TouchSession reply
// (the write's ack, as its caller sees it) to A having dropped its copy.
// Logged with -v; not asserted.
func TestInvalidationDelay(t *testing.T) {
	c := newTestCluster(t, 1)
	addr, prefix := testenv.Redis(t)
	var (
		mu   sync.Mutex
		seen = map[string]time.Time{}
	)
	a := c.start(t, false, withCache(t, addr, prefix, cache.Options{OnInvalidation: func(k string) {
		now := time.Now()
		mu.Lock()
		seen[k] = now
		mu.Unlock()
	}}))
	b := c.start(t, false, withCache(t, addr, prefix, cache.Options{}))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := b.data.PutUser(ctx, &pb.PutUserRequest{UserId: "d"}); err != nil {
		t.Fatal(err)
	}
	s, err := b.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "d", TtlSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	key := a.srv.Cache().SessionKey(hashToken(s.Token))
	const n = 500
	var deltas []time.Duration
	before := 0
	for i := range n {
		// Until A answers from memory. On a loaded machine a Redis call can
		// time out and open the breaker for a second, with every read going
		// to PostgreSQL meanwhile: give it time, not a number of tries.
		for giveUp := time.Now().Add(10 * time.Second); ; {
			hits := a.srv.Cache().Stats().LocalHits
			if _, err := a.data.GetSession(ctx, &pb.GetSessionRequest{Token: s.Token}); err != nil {
				t.Fatal(err)
			}
			if a.srv.Cache().Stats().LocalHits > hits {
				break
			}
			if time.Now().After(giveUp) {
				t.Fatalf("write %d: never a local hit in 10 s", i)
			}
		}
		mu.Lock()
		delete(seen, key)
		mu.Unlock()
		if _, err := b.data.TouchSession(ctx, &pb.TouchSessionRequest{Token: s.Token, TtlSeconds: 3600}); err != nil {
			t.Fatal(err)
		}
		ack := time.Now()
		for {
			mu.Lock()
			at, ok := seen[key]
			mu.Unlock()
			if ok {
				if at.Before(ack) {
					before++
				}
				deltas = append(deltas, max(0, at.Sub(ack)))
				break
			}
			time.Sleep(20 * time.Microsecond)
		}
	}
	slices.Sort(deltas)
	t.Logf("δ (B's TouchSession reply → A's copy dropped), %d writes: p50 %v, p99 %v, max %v; %d of them dropped before the reply reached the caller",
		n, deltas[n/2], deltas[n*99/100], deltas[n-1], before)
}

// TestExpiredSessionNeverServed: a session cached on two instances reads
// as NotFound on both from the moment it expires, memory copies included.
func TestExpiredSessionNeverServed(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	addr, prefix := testenv.Redis(t)
	a := c.start(t, false, withCache(t, addr, prefix, cache.Options{}))
	b := c.start(t, false, withCache(t, addr, prefix, cache.Options{}))
	ctx := ctxT(t)
	if _, err := a.data.PutUser(ctx, &pb.PutUserRequest{UserId: "eve"}); err != nil {
		t.Fatal(err)
	}
	s, err := a.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "eve", TtlSeconds: 1})
	if err != nil {
		t.Fatal(err)
	}
	for _, ts := range []*testServer{a, b} {
		for range 3 {
			if _, err := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: s.Token}); err != nil {
				t.Fatal(err)
			}
		}
	}
	time.Sleep(time.Until(s.ExpiresAt.AsTime()))
	for _, ts := range []*testServer{a, b} {
		_, err := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: s.Token})
		wantCode(t, err, codes.NotFound)
	}
}
