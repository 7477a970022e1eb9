package server

import (
	"context"
	"errors"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/shardgate/shardgate/shards"
)

// Tracing: with Options.TracerProvider set, each call's trace holds the
// gRPC span (otelgrpc), a span per cache lookup and load, and a span per
// attempt on a shard, carrying the partition and the shard. Without it
// none of this runs: the request path checks one nil pointer.

// tracerName names the server's spans' instrumentation scope.
const tracerName = "github.com/shardgate/shardgate/server"

// Span attribute keys.
const (
	attrShard     = attribute.Key("shardgate.shard")
	attrPartition = attribute.Key("shardgate.partition")
	attrAttempt   = attribute.Key("shardgate.attempt")
)

// startSpan starts a span under ctx's, unless tracing is off or ctx's
// span was not sampled (its children would not be either: skipping them
// spares the allocations). ok says whether a span was started.
func (s *Server) startSpan(ctx context.Context, name string) (context.Context, trace.Span, bool) {
	if s.tracer == nil {
		return ctx, nil, false
	}
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() && !sc.IsSampled() {
		return ctx, nil, false
	}
	ctx, span := s.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindInternal))
	return ctx, span, true
}

// endSpan records err (unless it is an answer, not a fault) and ends span.
func endSpan(span trace.Span, err error) {
	if err != nil && !errors.Is(err, shards.ErrWrongShard) {
		span.RecordError(err)
		span.SetStatus(codes.Error, "")
	}
	span.End()
}

// relayTracer is the tracer of the relays' publish spans; nil when off.
func (s *Server) relayTracer() trace.Tracer {
	if s.opts.TracerProvider == nil {
		return nil
	}
	return s.opts.TracerProvider.Tracer("github.com/shardgate/shardgate/events")
}
