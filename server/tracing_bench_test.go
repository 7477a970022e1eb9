package server

import (
	"context"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// BenchmarkTracingOverhead is GetSession (a cache hit) over gRPC on two
// servers of one cluster, tracing off and tracing on with a 1% sampler
// (spans batched to an exporter that drops them), beside the health check
// (noop) as the transport's ceiling. Run with -count to alternate them on
// a noisy machine and compare ns/op.
func BenchmarkTracingOverhead(b *testing.B) {
	c := newTestCluster(b, 1)
	addr, prefix := testenv.Redis(b)
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(0.01))),
		sdktrace.WithBatcher(tracetest.NewNoopExporter()))
	b.Cleanup(func() { tp.Shutdown(context.Background()) })
	off := c.start(b, false, withCache(b, addr, prefix, cache.Options{}))
	on := c.start(b, false, withCache(b, addr, prefix, cache.Options{}), func(o *Options) { o.TracerProvider = tp })
	ctx := context.Background()
	if _, err := off.data.PutUser(ctx, &pb.PutUserRequest{UserId: "bench"}); err != nil {
		b.Fatal(err)
	}
	s, err := off.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "bench", DataJson: `{"ip":"10.0.0.7"}`, TtlSeconds: 3600})
	if err != nil {
		b.Fatal(err)
	}
	req := &pb.GetSessionRequest{Token: s.Token}
	for _, ts := range []*testServer{off, on} {
		if _, err := ts.data.GetSession(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("noop", func(b *testing.B) {
		h := healthpb.NewHealthClient(off.conn)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := h.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	for _, v := range []struct {
		name string
		ts   *testServer
	}{{"off", off}, {"on-1pct", on}} {
		b.Run(v.name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(p *testing.PB) {
				for p.Next() {
					if _, err := v.ts.data.GetSession(ctx, req); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
