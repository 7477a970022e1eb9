package server

import (
	"context"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

func attrOf(s sdktrace.ReadOnlySpan, key attribute.Key) (attribute.Value, bool) {
	for _, kv := range s.Attributes() {
		if kv.Key == key {
			return kv.Value, true
		}
	}
	return attribute.Value{}, false
}

// A GetSession that misses the cache is traced router → cache → shard:
// the gRPC span, the cache lookup, its load and the shard query, each the
// parent of the next, the shard's span naming the shard and the partition.
// The trace continues the caller's (W3C traceparent), and relays trace
// their publishes.
func TestTraceRouterCacheShard(t *testing.T) {
	t.Parallel()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	c := newTestCluster(t, 2)
	addr, prefix := testenv.Redis(t)
	ts := c.start(t, false, withCache(t, addr, prefix, cache.Options{}), withEvents(t, 0),
		func(o *Options) { o.TracerProvider = tp })
	ctx := ctxT(t)
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "tia"}); err != nil {
		t.Fatal(err)
	}
	sess, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "tia", TtlSeconds: 600})
	if err != nil {
		t.Fatal(err)
	}
	loc, err := ts.admin.LocateUser(ctx, &pb.LocateUserRequest{UserId: "tia"})
	if err != nil {
		t.Fatal(err)
	}

	// The caller's trace, sent as traceparent.
	callerTrace, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	callerSpan, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	caller := trace.NewSpanContext(trace.SpanContextConfig{TraceID: callerTrace, SpanID: callerSpan, TraceFlags: trace.FlagsSampled, Remote: true})
	carrier := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(trace.ContextWithSpanContext(context.Background(), caller), carrier)
	octx := metadata.AppendToOutgoingContext(ctx, "traceparent", carrier.Get("traceparent"))
	if _, err := ts.data.GetSession(octx, &pb.GetSessionRequest{Token: sess.GetToken()}); err != nil {
		t.Fatal(err)
	}

	var byName = map[string]sdktrace.ReadOnlySpan{}
	waitUntil(t, "the spans of the GetSession and a relay publish", func() bool {
		for _, s := range rec.Ended() {
			if s.SpanContext().TraceID() == callerTrace || s.Name() == "relay.publish" {
				byName[s.Name()] = s
			}
		}
		return len(byName) >= 5
	})
	rpc, get, load, query := byName["shardgate.v1.DataService/GetSession"], byName["cache.get_session"], byName["cache.load_session"], byName["shard.query"]
	for name, s := range map[string]sdktrace.ReadOnlySpan{"rpc": rpc, "cache.get_session": get, "cache.load_session": load, "shard.query": query} {
		if s == nil {
			t.Fatalf("no %s span in the caller's trace; have %v", name, byName)
		}
	}
	if rpc.Parent().SpanID() != callerSpan {
		t.Errorf("the RPC span's parent is %v, want the caller's span", rpc.Parent().SpanID())
	}
	for _, link := range []struct {
		child, parent sdktrace.ReadOnlySpan
	}{{get, rpc}, {load, get}, {query, load}} {
		if link.child.Parent().SpanID() != link.parent.SpanContext().SpanID() {
			t.Errorf("%s's parent is not %s", link.child.Name(), link.parent.Name())
		}
	}
	if v, _ := attrOf(query, attrShard); v.AsString() != loc.Shard {
		t.Errorf("shard.query shard = %q, want %q", v.AsString(), loc.Shard)
	}
	if v, _ := attrOf(query, attrPartition); v.AsInt64() != int64(loc.Partition) {
		t.Errorf("shard.query partition = %d, want %d", v.AsInt64(), loc.Partition)
	}
	pub := byName["relay.publish"]
	if n, ok := attrOf(pub, "shardgate.events"); !ok || n.AsInt64() < 1 {
		t.Errorf("relay.publish events = %v", n)
	}
}

// A caller's trace that is not sampled gets no spans of the server's own:
// the sampler's 1% costs the other 99% next to nothing.
func TestTraceNotSampledMakesNoSpans(t *testing.T) {
	t.Parallel()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec), sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.AlwaysSample())))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	c := newTestCluster(t, 1)
	ts := c.start(t, false, func(o *Options) { o.TracerProvider = tp })
	ctx := ctxT(t)
	octx := metadata.AppendToOutgoingContext(ctx, "traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
	if _, err := ts.data.PutUser(octx, &pb.PutUserRequest{UserId: "una"}); err != nil {
		t.Fatal(err)
	}
	// Load balancers' health probes make none either, sampled or not.
	if _, err := healthpb.NewHealthClient(ts.conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	// A sampled call does, so the recorder is working.
	if _, err := ts.data.GetUser(ctx, &pb.GetUserRequest{UserId: "una"}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the sampled GetUser's span", func() bool {
		for _, s := range rec.Ended() {
			if s.Name() == "shardgate.v1.DataService/GetUser" {
				return true
			}
		}
		return false
	})
	for _, s := range rec.Ended() {
		if s.SpanContext().TraceID().String() == "4bf92f3577b34da6a3ce929d0e0e4736" {
			t.Errorf("span %s recorded in an unsampled trace", s.Name())
		}
		if strings.Contains(s.Name(), "grpc.health") {
			t.Errorf("health check traced: %s", s.Name())
		}
	}
}
