package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/server"
)

// tail runs `events tail` until it has count events, writing to alice until
// then (the watch starts from now, so writes before it are not seen).
func tail(t *testing.T, addr string, json bool, cmd eventsTailCmd) string {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	data := pb.NewDataServiceClient(conn)
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- cmd.Run(&globals{Addr: addr, JSON: json, out: &out}) }()
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			return out.String()
		case <-time.After(100 * time.Millisecond):
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := data.PutUser(ctx, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{"a":1}`})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestEventsTail(t *testing.T) {
	t.Parallel()
	redisAddr, prefix := testenv.Redis(t)
	rc, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{redisAddr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rc.Close)
	addr, _ := startClusterWith(t, server.Options{Redis: rc, EventsPrefix: prefix, RunRelays: true})

	human := tail(t, addr, false, eventsTailCmd{User: []string{"alice", "bob"}, Count: 2})
	lines := strings.Split(strings.TrimSpace(human), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 lines, got:\n%s", human)
	}
	for _, l := range lines {
		for _, want := range []string{"alice", "user", "upsert", `{"a": 1}`} {
			if !strings.Contains(l, want) {
				t.Fatalf("line %q lacks %q", l, want)
			}
		}
	}

	js := tail(t, addr, true, eventsTailCmd{User: []string{"alice"}, Count: 1})
	var r struct {
		Event struct {
			UserID  string `json:"userId"`
			Version string `json:"version"`
			Cursor  string `json:"cursor"`
		} `json:"event"`
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(js)), &r); err != nil || r.Event.UserID != "alice" || r.Event.Cursor == "" {
		t.Fatalf("JSON line %q: %+v, %v", js, r, err)
	}
}
