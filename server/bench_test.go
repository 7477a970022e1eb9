package server

import (
	"context"
	"fmt"
	"testing"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

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
