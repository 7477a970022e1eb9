package server

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// The gRPC metrics count what go-grpc-middleware's provider counted:
// every series of a registered method at zero from the start, one message
// each way for a successful unary call, none sent for a failed one,
// context errors under gRPC's codes, and a stream's messages.
func TestGRPCMetrics(t *testing.T) {
	m := newGRPCMetrics([]float64{.001, 1})
	g := grpc.NewServer()
	healthpb.RegisterHealthServer(g, health.NewServer())
	m.InitializeMetrics(g)
	const svc, check, watch = "grpc.health.v1.Health", "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"
	if n := countSeries(m, "grpc_server_handled_total"); n != 3*numCodes { // Check, List, Watch
		t.Errorf("%d handled series at start, want %d", n, 3*numCodes)
	}
	unary := m.UnaryServerInterceptor()
	info := &grpc.UnaryServerInfo{FullMethod: check}
	for _, err := range []error{nil, nil, status.Error(codes.NotFound, "x"), context.DeadlineExceeded, errors.New("plain")} {
		unary(context.Background(), nil, info, func(context.Context, any) (any, error) { return nil, err })
	}
	want := map[string]float64{
		"grpc_server_started_total":      5,
		"grpc_server_msg_received_total": 5,
		"grpc_server_msg_sent_total":     2,
	}
	for name, n := range want {
		if got := counterValue(m.vec(name).WithLabelValues("unary", svc, "Check")); got != n {
			t.Errorf("%s = %v, want %v", name, got, n)
		}
	}
	for code, n := range map[codes.Code]float64{codes.OK: 2, codes.NotFound: 1, codes.DeadlineExceeded: 1, codes.Unknown: 1, codes.Internal: 0} {
		if got := counterValue(m.handled.WithLabelValues("unary", svc, "Check", code.String())); got != n {
			t.Errorf("handled %s = %v, want %v", code, got, n)
		}
	}
	if n := countSeries(m, "grpc_server_handling_seconds"); n != 3 {
		t.Errorf("%d histogram series, want 3", n)
	}

	stream := m.StreamServerInterceptor()
	sinfo := &grpc.StreamServerInfo{FullMethod: watch, IsServerStream: true}
	stream(nil, &fakeServerStream{}, sinfo, func(_ any, ss grpc.ServerStream) error {
		ss.RecvMsg(nil)
		for range 3 {
			ss.SendMsg(nil)
		}
		return status.Error(codes.Canceled, "bye")
	})
	for name, n := range map[string]float64{"grpc_server_started_total": 1, "grpc_server_msg_received_total": 1, "grpc_server_msg_sent_total": 3} {
		if got := counterValue(m.vec(name).WithLabelValues("server_stream", svc, "Watch")); got != n {
			t.Errorf("stream %s = %v, want %v", name, got, n)
		}
	}
	if got := counterValue(m.handled.WithLabelValues("server_stream", svc, "Watch", "Canceled")); got != 1 {
		t.Errorf("stream handled Canceled = %v, want 1", got)
	}
}

type fakeServerStream struct{ grpc.ServerStream }

func (fakeServerStream) Context() context.Context { return context.Background() }
func (fakeServerStream) SendMsg(any) error        { return nil }
func (fakeServerStream) RecvMsg(any) error        { return nil }

// countSeries counts c's series of the metric name.
func countSeries(c prometheus.Collector, name string) int {
	ch := make(chan prometheus.Metric, 1024)
	go func() { c.Collect(ch); close(ch) }()
	n := 0
	for m := range ch {
		if d := m.Desc().String(); strings.Contains(d, `"`+name+`"`) {
			n++
		}
	}
	return n
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	c.Write(&m)
	return m.GetCounter().GetValue()
}
