package server

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"runtime"
	"time"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc/filters"
	"go.opentelemetry.io/otel/propagation"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/shardgate/shardgate/auth"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/ratelimit"
)

// GRPCOptions shape the gRPC server. The zero value of a field means its default.
type GRPCOptions struct {
	// MaxRecvMsgBytes caps a request message (default 1 MiB); larger ones
	// are refused with ResourceExhausted before any handler runs.
	MaxRecvMsgBytes int
	// DefaultTimeout is the deadline given to calls that arrive without one
	// (default 10s).
	DefaultTimeout time.Duration
	// MaxTimeout caps the deadline of unary calls (default 60s): a longer
	// one is shortened to it.
	MaxTimeout time.Duration
	// MaxConcurrentStreams per connection (default 1024).
	MaxConcurrentStreams uint32
	// StreamWorkers is how many goroutines are kept to run calls (default
	// 64 per CPU; negative: a new goroutine per call, gRPC's default). A
	// kept goroutine keeps its grown stack, so a call through the whole
	// interceptor chain does not pay for growing a fresh 8 KiB stack, which
	// costs 20-30% of a GetSession call. A call that finds every worker
	// busy gets a goroutine of its own, so there must be more workers than
	// calls in flight: with 8 per CPU, 32 callers on 2 CPUs still grew a
	// stack in most calls (runtime.newstack 4.8 of 38 us of server CPU per
	// GetSession, 0.5 of 26 with 64 per CPU). An idle worker costs its
	// parked stack, a few KiB.
	StreamWorkers int
	// TLS, when set, serves TLS (see tlsconfig.New); nil serves plaintext.
	TLS *tls.Config
	// Auth verifies bearer tokens; nil lets every call through as an
	// anonymous admin (loopback and dev without auth).
	Auth *auth.Verifier
	// Limiter rate-limits calls per principal and method class; nil: no
	// limits.
	Limiter *ratelimit.Limiter
	Extra   []grpc.ServerOption

	// bare leaves out auth, limits and validation (the overhead benchmark's
	// baseline).
	bare bool
}

// NewGRPCServer returns a gRPC server with DataService, AdminService, the
// standard health service and reflection registered. The returned health
// server starts SERVING; Serve flips it on shutdown.
func NewGRPCServer(s *Server, o GRPCOptions) (*grpc.Server, *health.Server) {
	if o.MaxRecvMsgBytes <= 0 {
		o.MaxRecvMsgBytes = 1 << 20
	}
	if o.DefaultTimeout <= 0 {
		o.DefaultTimeout = 10 * time.Second
	}
	if o.MaxConcurrentStreams == 0 {
		o.MaxConcurrentStreams = 1024
	}
	if o.MaxTimeout <= 0 {
		o.MaxTimeout = 60 * time.Second
	}
	if o.StreamWorkers == 0 {
		o.StreamWorkers = 64 * runtime.GOMAXPROCS(0)
	}
	unary, stream := s.interceptors(o)
	for _, c := range o.Auth.Collectors() {
		s.metrics.MustRegister(c)
	}
	if o.Limiter != nil {
		for _, c := range o.Limiter.Collectors() {
			s.metrics.MustRegister(c)
		}
	}
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(o.MaxRecvMsgBytes),
		grpc.MaxConcurrentStreams(o.MaxConcurrentStreams),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
	}
	if o.TLS != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(o.TLS)))
	}
	if o.StreamWorkers > 0 {
		opts = append(opts, grpc.NumStreamWorkers(uint32(o.StreamWorkers)))
	}
	if tp := s.opts.TracerProvider; tp != nil {
		// Propagators given here, not taken from otel's globals: incoming
		// W3C trace context continues the caller's trace.
		// Health checks (load balancers' probes) make no spans.
		opts = append(opts, grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithTracerProvider(tp),
			otelgrpc.WithPropagators(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})),
			otelgrpc.WithFilter(filters.Not(filters.HealthCheck())))))
	}
	opts = append(opts, o.Extra...)
	g := grpc.NewServer(opts...)
	pb.RegisterDataServiceServer(g, NewDataService(s))
	pb.RegisterAdminServiceServer(g, NewAdminService(s))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(g, hs)
	for _, name := range []string{"", pb.DataService_ServiceDesc.ServiceName, pb.AdminService_ServiceDesc.ServiceName} {
		hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	reflection.Register(g)
	s.grpcMetrics.InitializeMetrics(g)
	return g, hs
}

// interceptors returns the unary and stream interceptor chains, in order,
// for o with its defaults filled in.
func (s *Server) interceptors(o GRPCOptions) ([]grpc.UnaryServerInterceptor, []grpc.StreamServerInterceptor) {
	log := s.opts.Logger
	handlePanic := func(ctx context.Context, p any) error {
		log.Error("panic in handler", "panic", p)
		return status.Error(codes.Internal, "internal error")
	}
	onPanic := recovery.WithRecoveryHandlerContext(handlePanic)
	// Security runs before any handler: who is calling (auth), how often
	// (limits), then what they sent (validation, inside errorCodes so a
	// bad field becomes InvalidArgument).
	// The unary chain is the stream chain's stages with neighbours merged
	// into one interceptor each (guardUnary, checkUnary): every level of a
	// grpc chain costs each call a closure and a call.
	v := &validator{maxJSON: s.opts.MaxJSONBytes, partitions: s.partitionCount}
	unary := []grpc.UnaryServerInterceptor{
		s.grpcMetrics.UnaryServerInterceptor(),
		guardUnary(log, handlePanic, o.DefaultTimeout, o.MaxTimeout),
		auth.UnaryServerInterceptor(o.Auth),
	}
	stream := []grpc.StreamServerInterceptor{
		s.grpcMetrics.StreamServerInterceptor(),
		logStream(log),
		recovery.StreamServerInterceptor(onPanic),
		auth.StreamServerInterceptor(o.Auth),
	}
	if o.bare {
		unary, stream = unary[:len(unary)-1], stream[:len(stream)-1]
	}
	if o.Limiter != nil {
		unary = append(unary, ratelimit.UnaryServerInterceptor(o.Limiter, auth.LimitKey))
		stream = append(stream, ratelimit.StreamServerInterceptor(o.Limiter, auth.LimitKey))
	}
	if o.bare {
		unary = append(unary, errorCodes(log))
	} else {
		unary = append(unary, checkUnary(log, v))
		stream = append(stream, validateStream(v))
	}
	return unary, stream
}

// guardUnary logs the call (logCall), turns a panic into an error
// (onPanic) and bounds its deadline (callDeadline), in one interceptor.
func guardUnary(log *slog.Logger, onPanic func(ctx context.Context, p any) error, d, maxTimeout time.Duration) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
		start := time.Now()
		// Deferred calls run last first: a panic becomes err before the
		// call is logged.
		defer func() { logCall(ctx, log, info.FullMethod, "unary", start, err) }()
		defer func() {
			if p := recover(); p != nil {
				resp, err = nil, onPanic(ctx, p)
			}
		}()
		hctx, cancel := callDeadline(ctx, d, maxTimeout)
		defer cancel()
		return h(hctx, req)
	}
}

// checkUnary is errorCodes and validateUnary in one interceptor: a request
// that fails its rules, or a handler's error, becomes a gRPC status.
func checkUnary(log *slog.Logger, v *validator) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if m, ok := req.(proto.Message); ok {
			if err := v.check(m); err != nil {
				return nil, toStatus(ctx, log, info.FullMethod, err)
			}
		}
		resp, err := h(ctx, req)
		if err != nil {
			return nil, toStatus(ctx, log, info.FullMethod, err)
		}
		return resp, nil
	}
}

// callDeadline gives a call without a deadline one (d), and shortens one
// past maxTimeout, so no request can hold a connection (or a database
// connection) for long.
func callDeadline(ctx context.Context, d, maxTimeout time.Duration) (context.Context, context.CancelFunc) {
	dl, ok := ctx.Deadline()
	switch {
	case !ok:
		return context.WithTimeout(ctx, min(d, maxTimeout))
	case time.Until(dl) > maxTimeout:
		return context.WithTimeout(ctx, maxTimeout)
	}
	return ctx, func() {}
}

// errorCodes turns handler errors into gRPC statuses (see toStatus).
func errorCodes(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		resp, err := h(ctx, req)
		if err != nil {
			return nil, toStatus(ctx, log, info.FullMethod, err)
		}
		return resp, nil
	}
}

// Serve serves g on lis until ctx ends, then stops gracefully: health turns
// NOT_SERVING and calls are still taken for drain (so load balancers that
// poll health move away first), then new calls are refused, in-flight calls
// get up to grace to finish, and whatever is left is cut off.
func Serve(ctx context.Context, g *grpc.Server, hs *health.Server, lis net.Listener, grace, drain time.Duration) error {
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(lis) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	hs.Shutdown()
	if drain > 0 {
		time.Sleep(drain)
	}
	done := make(chan struct{})
	go func() { g.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		g.Stop()
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}
