package server

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/auth/authtest"
	"github.com/shardgate/shardgate/auth/keyset"
	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/events"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// BenchmarkRPC measures whole calls over loopback gRPC from 16 callers per
// CPU. The
// health check is the transport's ceiling on this machine: compare the
// data calls against it (ratios), not against absolute numbers.
func BenchmarkRPC(b *testing.B) {
	ts := newTestCluster(b, 4).start(b, false)
	ctx := context.Background()
	const users = 256
	for i := range users {
		if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: fmt.Sprintf("bench-%d", i), ProfileJson: `{"plan":"pro"}`}); err != nil {
			b.Fatal(err)
		}
	}
	health := healthpb.NewHealthClient(ts.conn)
	b.Run("health", func(b *testing.B) {
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("GetUser", func(b *testing.B) {
		b.SetParallelism(16)
		b.RunParallel(func(p *testing.PB) {
			i := 0
			for p.Next() {
				i++
				if _, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: fmt.Sprintf("bench-%d", i%users)}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("PutItem", func(b *testing.B) {
		b.SetParallelism(16)
		b.RunParallel(func(p *testing.PB) {
			i := 0
			for p.Next() {
				i++
				if _, err := ts.data.PutItem(ctx, &pb.PutItemRequest{UserId: fmt.Sprintf("bench-%d", i%users), Collection: "c", Key: fmt.Sprint(i % 64), ValueJson: `{"n":1}`}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkGetSessionHit is the in-process hit path of GetSession through
// the validator and the DataService (token check, parse and hash, cache
// lookup in this process's memory, response), without gRPC. Compare
// "nocache" (Postgres).
func BenchmarkGetSessionHit(b *testing.B) {
	c := newTestCluster(b, 1)
	addr, prefix := testenv.Redis(b)
	ts := c.start(b, false, withCache(b, addr, prefix, cache.Options{}))
	ctx := context.Background()
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "bench"}); err != nil {
		b.Fatal(err)
	}
	s, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "bench", DataJson: `{"ip":"10.0.0.7"}`, TtlSeconds: 3600})
	if err != nil {
		b.Fatal(err)
	}
	d := NewDataService(ts.srv)
	validate := validateUnary(&validator{maxJSON: ts.srv.opts.MaxJSONBytes, partitions: ts.srv.partitionCount})
	info := &grpc.UnaryServerInfo{FullMethod: pb.DataService_GetSession_FullMethodName}
	handler := func(ctx context.Context, req any) (any, error) { return d.GetSession(ctx, req.(*pb.GetSessionRequest)) }
	getSession := func(ctx context.Context, req *pb.GetSessionRequest) (any, error) {
		return validate(ctx, req, info, handler)
	}
	req := &pb.GetSessionRequest{Token: s.Token}
	time.Sleep(1100 * time.Millisecond) // past the writer's floor window: local copies count
	for range 3 {
		if _, err := getSession(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("cached", func(b *testing.B) {
		before := ts.srv.Cache().Stats()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := getSession(ctx, req); err != nil {
				b.Fatal(err)
			}
		}
		after := ts.srv.Cache().Stats()
		b.ReportMetric(float64(after.LocalHits-before.LocalHits)/float64(b.N), "local-hits/op")
	})
	b.Run("nocache", func(b *testing.B) {
		nctx := metadata.NewIncomingContext(ctx, metadata.Pairs(CacheMetadataKey, "no-cache"))
		b.ReportAllocs()
		for b.Loop() {
			if _, err := getSession(nctx, req); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkWatchLatency measures commit → Watch delivery under a steady
// write load: b.N PutUser calls paced at 500/s over 64 users on 4 shards,
// one watcher following all 64 users over gRPC. It reports percentiles of
// the time from the write's acknowledgement to the event's arrival
// ("ack→watch", what a client that wrote sees) and from committed_at, the
// database clock at the write's start on the same host ("commit→watch",
// which also holds the write's own statement time), and the relay's share,
// from the acknowledgement to the end of the batch's XADD ("ack→xadd").
func BenchmarkWatchLatency(b *testing.B) {
	const (
		users = 64
		rate  = 500 // writes/s
	)
	type key struct {
		user    string
		version int64
	}
	var (
		mu        sync.Mutex
		acked     = map[key]time.Time{}
		published = map[key]time.Time{}
	)
	// The invalidation hook runs right after a batch's XADD: it timestamps
	// the relay's part of the way.
	hook := func(_ context.Context, evs []events.Event) error {
		now := time.Now()
		mu.Lock()
		defer mu.Unlock()
		for _, e := range evs {
			published[key{e.UserID, e.Version}] = now
		}
		return nil
	}
	ts := newTestCluster(b, 4).start(b, true, withEvents(b, 0), func(o *Options) { o.Invalidate = hook })
	ctx := context.Background()
	var ids []string
	for i := range users {
		ids = append(ids, fmt.Sprintf("lat-%d", i))
	}
	w := openWatch(b, ts, &pb.WatchRequest{UserIds: ids})
	w.live(b)

	arrived := make(chan []time.Duration, 1)
	go func() {
		var fromAck, fromCommit, toPublish []time.Duration
		pending := map[key]time.Time{}
		for range b.N {
			r, err := w.stream.Recv()
			for err == nil && r.GetEvent() == nil {
				r, err = w.stream.Recv()
			}
			if err != nil {
				b.Error(err)
				break
			}
			now := time.Now()
			e := r.GetEvent()
			fromCommit = append(fromCommit, now.Sub(e.GetCommittedAt().AsTime()))
			pending[key{e.GetUserId(), e.GetVersion()}] = now
		}
		mu.Lock()
		for k, at := range pending {
			if t0, ok := acked[k]; ok {
				fromAck = append(fromAck, max(0, at.Sub(t0)))
				if p, ok := published[k]; ok {
					toPublish = append(toPublish, max(0, p.Sub(t0)))
				}
			}
		}
		mu.Unlock()
		arrived <- fromAck
		arrived <- fromCommit
		arrived <- toPublish
	}()
	b.ResetTimer()
	tick := time.NewTicker(time.Second / rate)
	defer tick.Stop()
	var wg sync.WaitGroup
	for i := range b.N {
		<-tick.C
		wg.Go(func() {
			u := ids[i%users]
			r, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: u, ProfileJson: `{"n":1}`})
			if err != nil {
				b.Error(err)
				return
			}
			mu.Lock()
			acked[key{u, r.GetVersion()}] = time.Now()
			mu.Unlock()
		})
	}
	wg.Wait()
	fromAck, fromCommit, toPublish := <-arrived, <-arrived, <-arrived
	b.StopTimer()
	for _, m := range []struct {
		name string
		d    []time.Duration
	}{{"ack→watch", fromAck}, {"commit→watch", fromCommit}, {"ack→xadd", toPublish}} {
		slices.Sort(m.d)
		if len(m.d) == 0 {
			continue
		}
		pct := func(p float64) float64 { return float64(m.d[int(p*float64(len(m.d)-1))].Microseconds()) / 1000 }
		b.ReportMetric(pct(0.50), m.name+"-p50-ms")
		b.ReportMetric(pct(0.99), m.name+"-p99-ms")
	}
}

// BenchmarkStreamLatencyBaseline is the floor under BenchmarkWatchLatency
// on the same machine and load: b.N XADDs paced at 500/s, each carrying its
// send time, read back by one blocking XREAD loop; no Postgres, relay or
// gRPC in between.
func BenchmarkStreamLatencyBaseline(b *testing.B) {
	const rate = 500
	var o Options
	withEvents(b, 0)(&o)
	rc, key := o.Redis, o.EventsPrefix+"baseline"
	ctx := context.Background()
	lat := make(chan []time.Duration, 1)
	go func() {
		var d []time.Duration
		last := "0-0"
		for len(d) < b.N {
			res, err := rc.Do(ctx, rc.B().Xread().Count(100).Block(1000).Streams().Key(key).Id(last).Build()).AsXRead()
			if err != nil && !rueidis.IsRedisNil(err) {
				b.Error(err)
				break
			}
			now := time.Now()
			for _, e := range res[key] {
				sent, _ := time.Parse(time.RFC3339Nano, e.FieldValues["t"])
				d = append(d, now.Sub(sent))
				last = e.ID
			}
		}
		lat <- d
	}()
	b.ResetTimer()
	tick := time.NewTicker(time.Second / rate)
	defer tick.Stop()
	for range b.N {
		<-tick.C
		if err := rc.Do(ctx, rc.B().Xadd().Key(key).Id("*").FieldValue().FieldValue("t", time.Now().Format(time.RFC3339Nano)).Build()).Error(); err != nil {
			b.Fatal(err)
		}
	}
	d := <-lat
	b.StopTimer()
	slices.Sort(d)
	if len(d) > 0 {
		pct := func(p float64) float64 { return float64(d[int(p*float64(len(d)-1))].Microseconds()) / 1000 }
		b.ReportMetric(pct(0.50), "xadd→xread-p50-ms")
		b.ReportMetric(pct(0.99), "xadd→xread-p99-ms")
	}
}

// BenchmarkWideWatch: one watcher of every partition while 16 callers write
// users as fast as they can; it reports the watcher's events/s and the
// cursor bytes it received per event (a full cursor here is ~22 KB).
func BenchmarkWideWatch(b *testing.B) {
	ts := newTestCluster(b, 4).start(b, true, withEvents(b, 0))
	n := ts.srv.Router().Table().PartitionCount()
	all := make([]uint32, n)
	for i := range all {
		all[i] = uint32(i)
	}
	w := openWatch(b, ts, &pb.WatchRequest{Partitions: all})
	w.live(b)
	ctx := context.Background()
	type result struct {
		events, cursorBytes int
		took                time.Duration
	}
	done := make(chan result, 1)
	b.ResetTimer()
	start := time.Now()
	go func() {
		var r result
		for r.events < b.N {
			resp, err := w.stream.Recv()
			if err != nil {
				b.Error(err)
				break
			}
			if e := resp.GetEvent(); e != nil {
				r.events++
				r.cursorBytes += len(e.GetCursor())
			}
		}
		r.took = time.Since(start)
		done <- r
	}()
	var next sync.Mutex
	i := 0
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for {
				next.Lock()
				j := i
				i++
				next.Unlock()
				if j >= b.N {
					return
				}
				if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: fmt.Sprintf("wide-%d", j), ProfileJson: `{"n":1}`}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	r := <-done
	b.StopTimer()
	b.ReportMetric(float64(r.events)/r.took.Seconds(), "events/s")
	b.ReportMetric(float64(r.cursorBytes)/float64(max(1, r.events)), "cursor-bytes/event")
}

// BenchmarkUnaryChain is a call's whole server side past the transport:
// the interceptor chain as NewGRPCServer builds it (auth as in dev mode:
// anonymous calls allowed), then the handler, for the health check (the
// noop baseline), GetSession served from this process's cache, and
// GetUser (a shard query). allocs/op is the figure to compare; the chain
// is composed the way grpc.ChainUnaryInterceptor composes it.
func BenchmarkUnaryChain(b *testing.B) {
	c := newTestCluster(b, 1)
	addr, prefix := testenv.Redis(b)
	ts := c.start(b, false, withCache(b, addr, prefix, cache.Options{}))
	ctx := context.Background()
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "bench", ProfileJson: `{"name":"bench user","plan":"free"}`}); err != nil {
		b.Fatal(err)
	}
	s, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "bench", DataJson: `{"device":"bench","scopes":["read","write"]}`, TtlSeconds: 3600})
	if err != nil {
		b.Fatal(err)
	}
	keys := authtest.NewKeys(b)
	v, err := auth.NewVerifier(auth.Options{Keys: keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.Ed.Public()}}, AllowAnonymous: true, AnyIssuer: true, AnyAudience: true})
	if err != nil {
		b.Fatal(err)
	}
	unary, _ := ts.srv.interceptors(GRPCOptions{Auth: v, DefaultTimeout: 10 * time.Second, MaxTimeout: time.Minute})
	d := NewDataService(ts.srv)
	hs := health.NewServer()
	// What a call's context holds when the chain starts: its peer,
	// deadline and headers.
	cctx := peer.NewContext(ctx, &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40123}})
	cctx = metadata.NewIncomingContext(cctx, metadata.Pairs(":authority", "127.0.0.1:7070", "content-type", "application/grpc", "user-agent", "grpc-go/1.85.0"))
	cctx, cancel := context.WithTimeout(cctx, 50*time.Second) // under MaxTimeout: kept as is
	defer cancel()
	cases := []struct {
		name, method string
		req          any
		h            grpc.UnaryHandler
	}{
		{"health", healthpb.Health_Check_FullMethodName, &healthpb.HealthCheckRequest{},
			func(ctx context.Context, req any) (any, error) {
				return hs.Check(ctx, req.(*healthpb.HealthCheckRequest))
			}},
		{"GetSession", pb.DataService_GetSession_FullMethodName, &pb.GetSessionRequest{Token: s.Token},
			func(ctx context.Context, req any) (any, error) { return d.GetSession(ctx, req.(*pb.GetSessionRequest)) }},
		{"GetUser", pb.DataService_GetUser_FullMethodName, &pb.GetUserRequest{UserId: "bench"},
			func(ctx context.Context, req any) (any, error) { return d.GetUser(ctx, req.(*pb.GetUserRequest)) }},
	}
	time.Sleep(1100 * time.Millisecond) // past the writer's floor window: local copies count
	for _, bc := range cases {
		info := &grpc.UnaryServerInfo{FullMethod: bc.method}
		call := func() {
			if _, err := chainUnary(unary)(cctx, bc.req, info, bc.h); err != nil {
				b.Fatal(err)
			}
		}
		for range 3 {
			call()
		}
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				call()
			}
		})
	}
}

// chainUnary composes interceptors as grpc.ChainUnaryInterceptor does.
func chainUnary(interceptors []grpc.UnaryServerInterceptor) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		var next func(i int) grpc.UnaryHandler
		next = func(i int) grpc.UnaryHandler {
			if i == len(interceptors)-1 {
				return h
			}
			return func(ctx context.Context, req any) (any, error) {
				return interceptors[i+1](ctx, req, info, next(i+1))
			}
		}
		return interceptors[0](ctx, req, info, next(0))
	}
}

// BenchmarkGetSessionRPC is shardbench's get-session against noop in one
// process: 32 callers over loopback gRPC, GetSession of 1000 sessions
// served from this process's cache, against the health check. Both ends
// run here, so cpu-ns/op (getrusage: user+system CPU of the process per
// call) is a call's whole CPU cost, which is what decides throughput when
// the load tool and the server share the CPUs; it holds still on a busy
// machine where ns/op swings. Compare GetSession's cpu-ns/op to health's.
// Auth is set up as in dev mode: calls without a token are anonymous.
func BenchmarkGetSessionRPC(b *testing.B) {
	c := newTestCluster(b, 1)
	addr, prefix := testenv.Redis(b)
	keys := authtest.NewKeys(b)
	v, err := auth.NewVerifier(auth.Options{Keys: keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.Ed.Public()}}, AllowAnonymous: true, AnyIssuer: true, AnyAudience: true})
	if err != nil {
		b.Fatal(err)
	}
	ts := c.startWith(b, false, GRPCOptions{Auth: v}, nil, withCache(b, addr, prefix, cache.Options{}))
	ctx := context.Background()
	const sessions = 1000
	toks := make([]string, sessions)
	for i := range toks {
		u := fmt.Sprintf("bench-%d", i)
		if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: u}); err != nil {
			b.Fatal(err)
		}
		s, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: u, DataJson: `{"device":"bench","ip":"10.0.0.7"}`, TtlSeconds: 3600})
		if err != nil {
			b.Fatal(err)
		}
		toks[i] = s.Token
	}
	health := healthpb.NewHealthClient(ts.conn)
	cases := []struct {
		name string
		call func(i int) error
	}{
		{"health", func(int) error { _, err := health.Check(ctx, &healthpb.HealthCheckRequest{}); return err }},
		{"GetSession", func(i int) error {
			_, err := ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: toks[i%sessions]})
			return err
		}},
	}
	for _, bc := range cases {
		for i := range 2 * sessions { // the sessions into memory
			if err := bc.call(i); err != nil {
				b.Fatal(err)
			}
		}
		b.Run(bc.name, func(b *testing.B) {
			before := ts.srv.Cache().Stats()
			cpu0 := cpuTime(b)
			var next atomic.Int64
			b.SetParallelism(16) // 32 callers on 2 CPUs
			b.RunParallel(func(p *testing.PB) {
				for p.Next() {
					if err := bc.call(int(next.Add(1))); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
			after := ts.srv.Cache().Stats()
			b.ReportMetric(float64(after.LocalHits-before.LocalHits)/float64(b.N), "local-hits/op")
		})
	}
}

// cpuTime is the CPU time (user+system) this process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
