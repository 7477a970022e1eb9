package server

import (
	"context"
	"fmt"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/shardgate/shardgate/cache"
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
// the DataService (token parse and hash, cache lookup in this process's
// memory, response), without gRPC. Compare "nocache" (Postgres).
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
	req := &pb.GetSessionRequest{Token: s.Token}
	time.Sleep(1100 * time.Millisecond) // past the writer's floor window: local copies count
	for range 3 {
		if _, err := d.GetSession(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("cached", func(b *testing.B) {
		before := ts.srv.Cache().Stats()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := d.GetSession(ctx, req); err != nil {
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
			if _, err := d.GetSession(nctx, req); err != nil {
				b.Fatal(err)
			}
		}
	})
}
