package server

import (
	"context"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// grpcMetrics are the standard gRPC server metrics (the names, labels and
// help of go-grpc-middleware's Prometheus provider, which dashboards and
// alerts query): calls started and handled (by code), messages received
// and sent, and handling time. A unary call finds its method's counters in
// a map made once (InitializeMetrics) instead of hashing label values into
// five vectors, which cost about half of a health check's server-side
// chain (BenchmarkUnaryChain).
type grpcMetrics struct {
	started, handled, received, sent *prometheus.CounterVec
	seconds                          *prometheus.HistogramVec

	// methods is read-only once InitializeMetrics has run (before the
	// server serves); a method missing from it is counted the slow way.
	methods map[string]*methodMetrics
}

// methodMetrics are one method's series, resolved.
type methodMetrics struct {
	typ, service, method string
	started, received    prometheus.Counter
	sent                 prometheus.Counter
	seconds              prometheus.Observer
	handled              [numCodes]prometheus.Counter
}

// numCodes is how many gRPC codes there are (OK through Unauthenticated).
const numCodes = int(codes.Unauthenticated) + 1

const (
	grpcUnary        = "unary"
	grpcServerStream = "server_stream"
	grpcClientStream = "client_stream"
	grpcBidiStream   = "bidi_stream"
)

func newGRPCMetrics(buckets []float64) *grpcMetrics {
	labels := []string{"grpc_type", "grpc_service", "grpc_method"}
	return &grpcMetrics{
		started: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_started_total",
			Help: "Total number of RPCs started on the server.",
		}, labels),
		handled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_handled_total",
			Help: "Total number of RPCs completed on the server, regardless of success or failure.",
		}, append(labels[:3:3], "grpc_code")),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_msg_received_total",
			Help: "Total number of RPC stream messages received on the server.",
		}, labels),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_msg_sent_total",
			Help: "Total number of gRPC stream messages sent by the server.",
		}, labels),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "grpc_server_handling_seconds",
			Help:    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
			Buckets: buckets,
		}, labels),
		methods: map[string]*methodMetrics{},
	}
}

// vec returns the counter vector named name (tests).
func (m *grpcMetrics) vec(name string) *prometheus.CounterVec {
	return map[string]*prometheus.CounterVec{
		"grpc_server_started_total":      m.started,
		"grpc_server_handled_total":      m.handled,
		"grpc_server_msg_received_total": m.received,
		"grpc_server_msg_sent_total":     m.sent,
	}[name]
}

// Describe implements prometheus.Collector.
func (m *grpcMetrics) Describe(ch chan<- *prometheus.Desc) {
	m.started.Describe(ch)
	m.handled.Describe(ch)
	m.received.Describe(ch)
	m.sent.Describe(ch)
	m.seconds.Describe(ch)
}

// Collect implements prometheus.Collector.
func (m *grpcMetrics) Collect(ch chan<- prometheus.Metric) {
	m.started.Collect(ch)
	m.handled.Collect(ch)
	m.received.Collect(ch)
	m.sent.Collect(ch)
	m.seconds.Collect(ch)
}

// InitializeMetrics creates every series of g's methods at zero (every
// code of grpc_server_handled_total included), so they show before the
// first call, and remembers them for the interceptors. Call it before g
// serves.
func (m *grpcMetrics) InitializeMetrics(g *grpc.Server) {
	for service, info := range g.GetServiceInfo() {
		for _, mi := range info.Methods {
			typ := grpcType(mi.IsClientStream, mi.IsServerStream)
			mm := m.resolve(typ, service, mi.Name)
			for c := range mm.handled {
				mm.handled[c] = m.handled.WithLabelValues(typ, service, mi.Name, codes.Code(c).String())
			}
			m.methods["/"+service+"/"+mi.Name] = mm
		}
	}
}

// resolve returns a method's series; handled is left to done (nil
// entries), so only the codes a call ends with make series.
func (m *grpcMetrics) resolve(typ, service, method string) *methodMetrics {
	return &methodMetrics{
		typ: typ, service: service, method: method,
		started:  m.started.WithLabelValues(typ, service, method),
		received: m.received.WithLabelValues(typ, service, method),
		sent:     m.sent.WithLabelValues(typ, service, method),
		seconds:  m.seconds.WithLabelValues(typ, service, method),
	}
}

// method returns fullMethod's series: resolved at start-up, or (a method
// registered later, or an unknown one) resolved now.
func (m *grpcMetrics) method(fullMethod, typ string) *methodMetrics {
	if mm, ok := m.methods[fullMethod]; ok && mm.typ == typ {
		return mm
	}
	service, method, ok := strings.Cut(strings.TrimPrefix(fullMethod, "/"), "/")
	if !ok {
		service, method = "unknown", "unknown"
	}
	return m.resolve(typ, service, method)
}

// done counts a finished call with err's code and its handling time.
func (m *grpcMetrics) done(mm *methodMetrics, err error, start time.Time) {
	code := callCode(err)
	if int(code) < numCodes && mm.handled[code] != nil {
		mm.handled[code].Inc()
	} else {
		m.handled.WithLabelValues(mm.typ, mm.service, mm.method, code.String()).Inc()
	}
	mm.seconds.Observe(time.Since(start).Seconds())
}

// callCode is the code a call ends with: err's status, or for a context
// error the code gRPC itself answers with.
func callCode(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	return status.FromContextError(err).Code()
}

// UnaryServerInterceptor counts unary calls: started, one message
// received, one sent when the handler succeeded, handled by code, and
// the handling time.
func (m *grpcMetrics) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		start := time.Now()
		mm := m.method(info.FullMethod, grpcUnary)
		mm.started.Inc()
		mm.received.Inc()
		resp, err := h(ctx, req)
		if err == nil {
			mm.sent.Inc()
		}
		m.done(mm, err, start)
		return resp, err
	}
}

// grpcType is the grpc_type label of a method that streams as said.
func grpcType(clientStream, serverStream bool) string {
	switch {
	case clientStream && serverStream:
		return grpcBidiStream
	case clientStream:
		return grpcClientStream
	case serverStream:
		return grpcServerStream
	}
	return grpcUnary
}

// StreamServerInterceptor counts streams like unary calls, with every
// message received and sent.
func (m *grpcMetrics) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		start := time.Now()
		mm := m.method(info.FullMethod, grpcType(info.IsClientStream, info.IsServerStream))
		mm.started.Inc()
		err := h(srv, &countedStream{ServerStream: ss, mm: mm})
		m.done(mm, err, start)
		return err
	}
}

// countedStream counts a stream's messages.
type countedStream struct {
	grpc.ServerStream
	mm *methodMetrics
}

func (s *countedStream) SendMsg(msg any) error {
	err := s.ServerStream.SendMsg(msg)
	if err == nil {
		s.mm.sent.Inc()
	}
	return err
}

func (s *countedStream) RecvMsg(msg any) error {
	err := s.ServerStream.RecvMsg(msg)
	if err == nil {
		s.mm.received.Inc()
	}
	return err
}
