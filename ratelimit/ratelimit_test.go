package ratelimit

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/internal/testenv"
)

func TestLimiterFallsBackPerCheck(t *testing.T) {
	redis := testenv.NewRedisServer(t)
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{redis.Addr()}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	lim := New(Options{Redis: client, Prefix: "sgtest:" + testenv.RandomHex(6) + ":",
		Rates: map[Class]Rate{ClassWrite: {PerSecond: 10, Burst: 10}}, Retry: time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	ctx := context.Background()
	if ok, _ := lim.Allow(ctx, ClassWrite, "p"); !ok || lim.degraded.Load() {
		t.Fatal("first call with Redis up")
	}
	redis.Kill()
	if ok, _ := lim.Allow(ctx, ClassWrite, "p"); !ok || !lim.degraded.Load() {
		t.Fatal("call with Redis down: want allowed from memory, degraded")
	}
	// A class without a rate is never limited and never touches Redis.
	if ok, _ := lim.Allow(ctx, ClassAdmin, "p"); !ok {
		t.Fatal("unlimited class refused")
	}
}

func TestParseRates(t *testing.T) {
	r, err := ParseRates("read=1000/2000, write=200,admin=0.5")
	if err != nil {
		t.Fatal(err)
	}
	if r[ClassRead] != (Rate{1000, 2000}) || r[ClassWrite] != (Rate{200, 200}) || r[ClassAdmin] != (Rate{0.5, 1}) {
		t.Fatalf("got %+v", r)
	}
	for _, bad := range []string{"reads=1", "read", "read=0", "read=-1", "read=1/0", "read=x", "read=1/y"} {
		if _, err := ParseRates(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func FuzzParseRates(f *testing.F) {
	for _, s := range []string{"read=1000/2000,write=200/400,admin=20/40,watch=10/20", "read=0.5", "read=1/0", "x=1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		rates, err := ParseRates(s)
		if err != nil {
			return
		}
		for c, r := range rates {
			if r.PerSecond <= 0 || r.Burst < 1 {
				t.Fatalf("%q: class %s got %+v", s, c, r)
			}
			if interval, tol := gcraParams(r); interval < 1 || tol < interval {
				t.Fatalf("%q: GCRA params %d %d", s, interval, tol)
			}
		}
	})
}

// A Redis that is down when the limiter starts is used once it answers:
// limits are shared again, not per instance for good.
func TestLimiterConnectsWhenRedisComesUp(t *testing.T) {
	redis := testenv.NewRedisServer(t)
	redis.Kill()
	opt := rueidis.ClientOption{InitAddress: []string{redis.Addr()}, DisableCache: true}
	prefix := "sgtest:" + testenv.RandomHex(6) + ":"
	lim := New(Options{Connect: func() (rueidis.Client, error) { return rueidis.NewClient(opt) },
		Prefix: prefix, Rates: map[Class]Rate{ClassWrite: {PerSecond: 1, Burst: 1}}, Retry: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	t.Cleanup(lim.Close)
	ctx := context.Background()
	if ok, _ := lim.Allow(ctx, ClassWrite, "p"); !ok || !lim.degraded.Load() {
		t.Fatal("first call with Redis down: want allowed from memory, degraded")
	}

	redis.Start()
	client, err := rueidis.NewClient(opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	key := prefix + string(ClassWrite) + ":q"
	deadline := time.Now().Add(10 * time.Second)
	for {
		lim.Allow(ctx, ClassWrite, "q")
		if n, err := client.Do(ctx, client.B().Exists().Key(key).Build()).AsInt64(); err == nil && n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the limiter never used Redis after it came up")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if lim.degraded.Load() {
		t.Fatal("still degraded with Redis answering")
	}
	// The bucket is Redis's now: another limiter sharing it is refused.
	other := New(Options{Redis: client, Prefix: prefix, Rates: map[Class]Rate{ClassWrite: {PerSecond: 1, Burst: 1}}})
	if ok, _ := other.Allow(ctx, ClassWrite, "q"); ok {
		t.Fatal("a second instance got a token the first had taken: buckets not shared")
	}
}
