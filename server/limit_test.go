package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// startRedis runs a redis-server of the test's own on a free port, so the
// test can kill it. It returns the address and a kill function.
func startRedis(t testing.TB) (string, func()) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, port, _ := strings.Cut(addr, ":")
	cmd := exec.Command("redis-server", "--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	kill := func() {
		cmd.Process.Kill()
		<-done
	}
	t.Cleanup(kill)
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if i == 100 {
			t.Fatalf("redis-server on %s did not come up: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return addr, kill
}

func newRedisClient(t testing.TB, addr string) rueidis.Client {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// burst makes n GetUser calls as tok and returns how many were allowed,
// how long they took, and the retry-after-ms of a refused one.
func burst(t *testing.T, data pb.DataServiceClient, tok string, n int) (allowed int, took time.Duration, retryAfter string) {
	t.Helper()
	ctx := bearer(ctxT(t), tok)
	start := time.Now()
	for range n {
		var hdr metadata.MD
		_, err := data.GetUser(ctx, &pb.GetUserRequest{UserId: "alice"}, grpc.Header(&hdr))
		switch status.Code(err) {
		case codes.OK, codes.NotFound:
			allowed++
		case codes.ResourceExhausted:
			if v := hdr.Get(retryAfterKey); len(v) == 1 {
				retryAfter = v[0]
			}
		default:
			t.Fatalf("GetUser: %v", err)
		}
	}
	return allowed, time.Since(start), retryAfter
}

// maxAllowed is what a bucket of rate r and burst b may allow in d.
func maxAllowed(r Rate, d time.Duration) int {
	return r.Burst + int(r.PerSecond*d.Seconds()) + 1
}

func TestRateLimitBurstAndFallback(t *testing.T) {
	addr, kill := startRedis(t)
	keys := newTestKeys(t)
	rate := Rate{PerSecond: 2, Burst: 5}
	var logs strings.Builder
	lim := NewLimiter(LimiterOptions{
		Redis:  newRedisClient(t, addr),
		Prefix: "sgtest:" + testenv.RandomHex(6) + ":",
		Rates:  map[MethodClass]Rate{ClassRead: rate},
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{Auth: keys.verifier(t), Limiter: lim}, nil)

	// 10× the bucket from one principal.
	n := 10 * rate.Burst
	got, took, retry := burst(t, ts.data, keys.token(t, "service", "noisy"), n)
	if got > maxAllowed(rate, took) || got < rate.Burst {
		t.Fatalf("noisy principal: %d of %d calls allowed in %v; want %d..%d", got, n, took, rate.Burst, maxAllowed(rate, took))
	}
	if ms, err := strconv.Atoi(retry); err != nil || ms <= 0 {
		t.Fatalf("refused call carried retry-after-ms %q", retry)
	}
	// Another principal is not affected, nor are writes of the same one.
	if got, _, _ := burst(t, ts.data, keys.token(t, "service", "quiet"), rate.Burst); got != rate.Burst {
		t.Fatalf("quiet principal: %d of %d allowed", got, rate.Burst)
	}
	if _, err := ts.data.PutUser(bearer(ctxT(t), keys.token(t, "service", "noisy")), &pb.PutUserRequest{UserId: "alice"}); err != nil {
		t.Fatalf("write of the noisy principal (no write limit): %v", err)
	}

	// Redis dies: the limiter keeps limiting, in memory, and says so.
	kill()
	got, took, _ = burst(t, ts.data, keys.token(t, "service", "after-redis"), n)
	if got > maxAllowed(rate, took) || got < 1 {
		t.Fatalf("without Redis: %d of %d calls allowed in %v; want 1..%d", got, n, took, maxAllowed(rate, took))
	}
	if !lim.degraded.Load() {
		t.Fatal("limiter does not report itself degraded")
	}
	if c := strings.Count(logs.String(), "Redis unavailable"); c != 1 {
		t.Fatalf("logged the switch to memory %d times, want once:\n%s", c, logs.String())
	}
	metrics := scrape(t, ts.srv)
	if !strings.Contains(metrics, "shardgate_ratelimit_degraded 1") {
		t.Fatal("shardgate_ratelimit_degraded is not 1")
	}
}

func scrape(t testing.TB, s *Server) string {
	t.Helper()
	mfs, err := s.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+"="+l.GetValue())
			}
			v := m.GetGauge().GetValue() + m.GetCounter().GetValue()
			fmt.Fprintf(&b, "%s%v %v\n", mf.GetName(), labels, v)
		}
	}
	return strings.ReplaceAll(b.String(), "[]", "")
}

func TestLimiterFallsBackPerCheck(t *testing.T) {
	addr, kill := startRedis(t)
	client := newRedisClient(t, addr)
	lim := NewLimiter(LimiterOptions{Redis: client, Prefix: "sgtest:" + testenv.RandomHex(6) + ":",
		Rates: map[MethodClass]Rate{ClassWrite: {PerSecond: 10, Burst: 10}}, Retry: time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	ctx := context.Background()
	if ok, _ := lim.Allow(ctx, ClassWrite, "p"); !ok || lim.degraded.Load() {
		t.Fatal("first call with Redis up")
	}
	kill()
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
