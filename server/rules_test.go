package server

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// Every request of both services has rules, and every rule names a field
// of its message.
func TestRequestRulesCoverEveryRPC(t *testing.T) {
	v := &validator{maxJSON: 1 << 16, partitions: func() int { return 4096 }}
	for _, fd := range []protoreflect.FileDescriptor{pb.File_shardgate_v1_data_proto, pb.File_shardgate_v1_admin_proto} {
		for i := range fd.Services().Len() {
			svc := fd.Services().Get(i)
			for j := range svc.Methods().Len() {
				in := svc.Methods().Get(j).Input()
				if _, ok := v.rules(in); !ok {
					t.Errorf("%s has no entry in requestRules", in.FullName())
				}
			}
		}
	}
	for name := range requestRules {
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(name)
		if err != nil {
			continue // an RPC the protos do not have yet (rebalancing)
		}
		v.rules(d.(protoreflect.MessageDescriptor)) // panics on a bad field name
	}
}

func TestValidationRunsBeforeHandler(t *testing.T) {
	v := &validator{maxJSON: 100, partitions: func() int { return 16 }}
	intercept := validateUnary(v)
	never := func(ctx context.Context, req any) (any, error) {
		t.Fatalf("handler ran for %v", req)
		return nil, nil
	}
	info := &grpc.UnaryServerInfo{FullMethod: "/x/y"}
	for name, req := range map[string]any{
		"user id":        &pb.GetUserRequest{UserId: "a b"},
		"JSON too big":   &pb.PutUserRequest{UserId: "a", ProfileJson: `{"x":"` + string(make([]byte, 200)) + `"}`},
		"token":          &pb.GetSessionRequest{Token: "99.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
		"negative ver":   &pb.DeleteItemRequest{UserId: "a", Collection: "c", Key: "k", ExpectedVersion: new(int64(-1))},
		"page size":      &pb.ListConfigRequest{Namespace: "n", PageSize: 5000},
		"schema JSON":    &pb.SetConfigSchemaRequest{Namespace: "n", SchemaJson: "{"},
		"namespace":      &pb.GetConfigSchemaRequest{Namespace: ""},
		"TTL":            &pb.CreateSessionRequest{UserId: "a", TtlSeconds: 0},
		"key with ctrl":  &pb.GetConfigRequest{Namespace: "n", Key: "a\x01"},
		"collection":     &pb.ListItemsRequest{UserId: "a", Collection: "c/d"},
		"locate user id": &pb.LocateUserRequest{UserId: ""},
	} {
		_, err := intercept(context.Background(), req, info, never)
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if _, ok := err.(*fieldError); !ok {
			t.Errorf("%s: %T %v, want a field error", name, err, err)
		}
	}
	// Messages without rules (health) pass.
	ran := false
	if _, err := intercept(context.Background(), &healthpb.HealthCheckRequest{}, info, func(ctx context.Context, req any) (any, error) {
		ran = true
		return nil, nil
	}); err != nil || !ran {
		t.Fatal("health request did not reach its handler")
	}
}

func TestDeadlineCap(t *testing.T) {
	intercept := guardUnary(slog.New(slog.DiscardHandler), nil, 10*time.Second, time.Second)
	info := &grpc.UnaryServerInfo{FullMethod: "/x/y"}
	check := func(ctx context.Context, max time.Duration) {
		t.Helper()
		_, _ = intercept(ctx, nil, info, func(ctx context.Context, _ any) (any, error) {
			dl, ok := ctx.Deadline()
			if !ok || time.Until(dl) > max {
				t.Errorf("handler deadline in %v, want at most %v", time.Until(dl), max)
			}
			return nil, nil
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	check(ctx, time.Second)                  // capped
	check(context.Background(), time.Second) // the default is capped too
}

// MaxConcurrentStreams holds: with one stream open, a second call on the
// same connection waits for it.
func TestMaxConcurrentStreams(t *testing.T) {
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{MaxConcurrentStreams: 1}, nil)
	health := healthpb.NewHealthClient(ts.conn)
	ctx, cancel := context.WithCancel(ctxT(t))
	w, err := health.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatal(err)
	}
	short, cancelShort := context.WithTimeout(ctxT(t), 300*time.Millisecond)
	_, err = ts.admin.GetTopology(short, &pb.GetTopologyRequest{})
	cancelShort()
	wantCode(t, err, codes.DeadlineExceeded)
	cancel()
	if _, err := ts.admin.GetTopology(ctxT(t), &pb.GetTopologyRequest{}); err != nil {
		t.Fatalf("after the stream ended: %v", err)
	}
}
