package server

import (
	"context"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/auth/authtest"
	"github.com/shardgate/shardgate/auth/keyset"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/ratelimit"
)

// BenchmarkSecurityOverhead measures GetSession through gRPC on one
// cluster, with and without the security layer, in the same run. The
// variants run in alternating rounds (so load from elsewhere on the
// machine hits them alike), each round 32 concurrent callers making
// roundCalls calls, b.N calls per variant in all. Reported per variant:
// ns/call (wall time per call at that concurrency) and, for each secured
// variant, its overhead over "bare" in percent (median of the per-round
// ratios). SG_BENCH_VARIANTS=secured,bare-again runs only those (and bare).
//
//   - bare: no auth, limits or validation (the chain before this layer)
//   - secured: JWT auth (cached), Redis rate limits, validation
//   - secured-nocache: the same, verifying every token's signature
//   - secured-memlimit: rate limits in memory only (no Redis)
//   - bare-again: a second bare server, to show the noise floor
//   - bare-noworkers: bare without stream workers (the server before)
func BenchmarkSecurityOverhead(b *testing.B) {
	c := newTestCluster(b, 4)
	keys := authtest.NewKeys(b)
	addr, prefix := testenv.Redis(b)
	rc, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		b.Fatal(err)
	}
	defer rc.Close()
	rates := map[ratelimit.Class]ratelimit.Rate{ratelimit.ClassRead: {PerSecond: 1e6, Burst: 1e6}}
	noCache, err := auth.NewVerifier(auth.Options{Keys: keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.Ed.Public()}},
		Issuer: authtest.Issuer, Audience: authtest.Audience, CacheSize: -1})
	if err != nil {
		b.Fatal(err)
	}
	type variant struct {
		name string
		o    GRPCOptions
		ts   *testServer
		took time.Duration
	}
	variants := []variant{
		{name: "bare", o: GRPCOptions{bare: true}},
		{name: "secured", o: GRPCOptions{Auth: keys.Verifier(b), Limiter: ratelimit.New(ratelimit.Options{Redis: rc, Prefix: prefix, Rates: rates})}},
		{name: "secured-nocache", o: GRPCOptions{Auth: noCache, Limiter: ratelimit.New(ratelimit.Options{Redis: rc, Prefix: prefix, Rates: rates})}},
		{name: "secured-memlimit", o: GRPCOptions{Auth: keys.Verifier(b), Limiter: ratelimit.New(ratelimit.Options{Rates: rates})}},
		{name: "bare-again", o: GRPCOptions{bare: true}}, // the noise floor
		// The server without this layer and without stream workers.
		{name: "bare-noworkers", o: GRPCOptions{bare: true, StreamWorkers: -1}},
	}
	ctx := authtest.Bearer(context.Background(), keys.Token(b, "service", "bench"))
	setup := c.start(b, false)
	const users = 256
	tokens := make([]string, users)
	for i := range users {
		id := fmt.Sprintf("bench-%d", i)
		if _, err := setup.data.PutUser(ctx, &pb.PutUserRequest{UserId: id}); err != nil {
			b.Fatal(err)
		}
		s, err := setup.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: id, TtlSeconds: 3600})
		if err != nil {
			b.Fatal(err)
		}
		tokens[i] = s.GetToken()
	}
	if only := os.Getenv("SG_BENCH_VARIANTS"); only != "" {
		variants = slices.DeleteFunc(variants, func(v variant) bool { return v.name != "bare" && !strings.Contains(","+only+",", ","+v.name+",") })
	}
	for i := range variants {
		variants[i].ts = c.startWith(b, false, variants[i].o, nil)
	}
	const workers, roundCalls = 32, 400
	round := func(ts *testServer, calls int) time.Duration {
		var next atomic.Int64
		var wg sync.WaitGroup
		start := time.Now()
		for range workers {
			wg.Go(func() {
				for {
					i := next.Add(1)
					if i > int64(calls) {
						return
					}
					if _, err := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: tokens[i%users]}); err != nil {
						b.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		return time.Since(start)
	}
	for _, v := range variants {
		round(v.ts, roundCalls) // warm up connections, caches and the script
	}
	ratios := make([][]float64, len(variants))
	b.ResetTimer()
	for done := 0; done < b.N; done += roundCalls {
		n := min(roundCalls, b.N-done)
		// Rotate the order, so no variant always follows an expensive one.
		took := make([]time.Duration, len(variants))
		for j := range variants {
			i := (j + done/roundCalls) % len(variants)
			took[i] = round(variants[i].ts, n)
			variants[i].took += took[i]
		}
		for i := 1; i < len(variants); i++ {
			ratios[i] = append(ratios[i], float64(took[i])/float64(took[0]))
		}
	}
	b.StopTimer()
	for i, v := range variants {
		b.ReportMetric(float64(v.took.Nanoseconds())/float64(b.N), v.name+"-ns/call")
		if i > 0 && len(ratios[i]) > 0 {
			r := ratios[i]
			sort.Float64s(r)
			b.ReportMetric(100*(r[len(r)/2]-1), v.name+"-overhead-%")
		}
	}
	b.ReportMetric(0, "ns/op") // the per-variant numbers above are the result
}
