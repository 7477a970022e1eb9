package auth_test

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/auth/authtest"
	"github.com/shardgate/shardgate/auth/keyset"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// BenchmarkUnaryInterceptor is the auth interceptor's cost per call, as a
// server sees it (incoming metadata, a TCP peer): an anonymous call where
// dev mode allows one, and a call with a token verified before (the
// verified-token cache).
func BenchmarkUnaryInterceptor(b *testing.B) {
	keys := authtest.NewKeys(b)
	v, err := auth.NewVerifier(auth.Options{Keys: keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.Ed.Public()}}, AllowAnonymous: true, AnyIssuer: true, AnyAudience: true})
	if err != nil {
		b.Fatal(err)
	}
	intercept := auth.UnaryServerInterceptor(v)
	info := &grpc.UnaryServerInfo{FullMethod: pb.DataService_GetSession_FullMethodName}
	handler := func(ctx context.Context, req any) (any, error) {
		if _, ok := auth.PrincipalFrom(ctx); !ok {
			b.Fatal("no principal")
		}
		return req, nil
	}
	base := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40123}})
	md := metadata.Pairs(":authority", "127.0.0.1:7070", "content-type", "application/grpc", "user-agent", "grpc-go/1.85.0")
	req := &pb.GetSessionRequest{Token: "x"}
	for _, bc := range []struct {
		name string
		md   metadata.MD
	}{
		{"anonymous", md},
		{"token", metadata.Join(md, metadata.Pairs("authorization", "Bearer "+keys.Token(b, "service", "bench")))},
	} {
		ctx := metadata.NewIncomingContext(base, bc.md)
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := intercept(ctx, req, info, handler); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
