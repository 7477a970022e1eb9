package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/alecthomas/kong"
	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// serve starts `shardgate serve --no-auth` (loopback, like dev) with args
// on a free loopback port and returns a client of it; the server stops
// when the test ends.
func serve(t *testing.T, args ...string) pb.DataServiceClient {
	t.Helper()
	return startServe(t, nil, nil, append([]string{"--no-auth"}, args...)...)
}

// serveTo is serve logging to w.
func serveTo(t *testing.T, w io.Writer, args ...string) pb.DataServiceClient {
	t.Helper()
	return startServe(t, slog.New(slog.NewTextHandler(w, nil)), nil, append([]string{"--no-auth"}, args...)...)
}

// startServe starts `shardgate serve` with args (and a cache MAC key) on a
// free loopback port, logging to log (nil: nowhere) after setup adjusted
// the parsed command, and returns a client of it; the server stops when
// the test ends.
func startServe(t *testing.T, log *slog.Logger, setup func(*serveCmd), args ...string) pb.DataServiceClient {
	t.Helper()
	args = append([]string{"--cache-mac-key-file", testMACKeyFile(t)}, args...)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	var c cli
	p, err := kong.New(&c, kong.Name("shardgate"), kong.Exit(func(int) { t.Fatal("kong exited") }))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Parse(append([]string{"serve", "--listen", addr, "--metrics-listen", "", "--grace", "1s", "--drain", "0s"}, args...)); err != nil {
		t.Fatal(err)
	}
	if setup != nil {
		setup(&c.Serve)
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Serve.Run(ctx, log) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewDataServiceClient(conn)
}

// With Redis down at start, serve still serves (reads and writes go to
// PostgreSQL; Watch answers Unavailable), and change events start by
// themselves once Redis answers.
func TestServeStartsWhileRedisIsDown(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	catalogDSN := testenv.NewDatabase(t)
	if err := catalog.CreateCluster(ctx, catalogDSN, router.RingConfig{},
		[]catalog.ShardSpec{{Name: "shard-0", DSN: testenv.NewDatabase(t)}}); err != nil {
		t.Fatal(err)
	}
	rs := testenv.NewRedisServer(t)
	rs.Kill()
	client := serve(t, "--catalog", catalogDSN, "--redis", rs.Addr())

	// Serving: wait for the listener, then a write and a read work.
	for {
		_, err := client.PutUser(ctx, &pb.PutUserRequest{UserId: "alice"})
		if err == nil {
			break
		}
		if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
			t.Fatalf("PutUser with Redis down: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := client.GetUser(ctx, &pb.GetUserRequest{UserId: "alice"}); err != nil {
		t.Fatal(err)
	}
	watch := func() error {
		st, err := client.Watch(ctx, &pb.WatchRequest{UserIds: []string{"alice"}})
		if err != nil {
			return err
		}
		_, err = st.Recv() // a heartbeat or an event once events are on
		return err
	}
	if err := watch(); status.Code(err) != codes.Unavailable {
		t.Fatalf("Watch with Redis down: %v, want Unavailable", err)
	}

	rs.Start()
	for {
		err := watch()
		if err == nil {
			break
		}
		if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
			t.Fatalf("Watch after Redis came back: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// serveAndDevFlags parses args after serve and after dev, and returns the
// serve flags each ended up with, by command.
func serveAndDevFlags(t *testing.T, args []string) map[string]serveFlags {
	t.Helper()
	out := map[string]serveFlags{}
	for _, cmd := range [][]string{{"serve", "--catalog", "x"}, {"dev"}} {
		var c cli
		p, err := kong.New(&c, kong.Name("shardgate"), kong.Exit(func(int) { t.Fatal("kong exited") }))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.Parse(append(cmd, args...)); err != nil {
			t.Fatal(err)
		}
		if cmd[0] == "dev" {
			out["dev"] = c.Dev.serveFlags
		} else {
			out["serve"] = c.Serve.serveFlags
		}
	}
	return out
}

// --session-sweep-interval (or its variable) reaches the server; 0 turns
// the sweeper off, which server.Options spells as a negative interval.
func TestSessionSweepIntervalFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  string
		want time.Duration
	}{
		{nil, "", time.Minute},
		{[]string{"--session-sweep-interval", "30s"}, "", 30 * time.Second},
		{[]string{"--session-sweep-interval", "0"}, "", -1},
		{nil, "2m", 2 * time.Minute},
		{nil, "0s", -1},
	} {
		t.Run(fmt.Sprintf("%v env=%q", tc.args, tc.env), func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("SHARDGATE_SESSION_SWEEP_INTERVAL", tc.env)
			}
			for cmd, f := range serveAndDevFlags(t, tc.args) {
				if got := f.sweepInterval(); got != tc.want {
					t.Errorf("%s: sweep interval %v, want %v", cmd, got, tc.want)
				}
			}
		})
	}
}

// --tombstone-retention (or its variable) reaches the server; 0 keeps
// tombstones for good, which server.Options spells as a negative retention.
func TestTombstoneRetentionFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  string
		want time.Duration
	}{
		{nil, "", 7 * 24 * time.Hour},
		{[]string{"--tombstone-retention", "36h"}, "", 36 * time.Hour},
		{[]string{"--tombstone-retention", "0"}, "", -1},
		{nil, "1h", time.Hour},
		{nil, "0s", -1},
	} {
		t.Run(fmt.Sprintf("%v env=%q", tc.args, tc.env), func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("SHARDGATE_TOMBSTONE_RETENTION", tc.env)
			}
			for cmd, f := range serveAndDevFlags(t, tc.args) {
				if got := f.tombstoneRetention(); got != tc.want {
					t.Errorf("%s: tombstone retention %v, want %v", cmd, got, tc.want)
				}
			}
		})
	}
}

// --event-retention (or its variable) reaches the server; 0 keeps
// delivered events for good, a negative retention in server.Options.
func TestEventRetentionFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  string
		want time.Duration
	}{
		{nil, "", 24 * time.Hour},
		{[]string{"--event-retention", "2h"}, "", 2 * time.Hour},
		{[]string{"--event-retention", "0"}, "", -1},
		{nil, "90m", 90 * time.Minute},
	} {
		t.Run(fmt.Sprintf("%v env=%q", tc.args, tc.env), func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("SHARDGATE_EVENT_RETENTION", tc.env)
			}
			for cmd, f := range serveAndDevFlags(t, tc.args) {
				if got := f.eventRetention(); got != tc.want {
					t.Errorf("%s: event retention %v, want %v", cmd, got, tc.want)
				}
			}
		})
	}
}

// serve sweeps expired sessions every --session-sweep-interval.
func TestServeSweepsExpiredSessions(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	catalogDSN, shardDSN := testenv.NewDatabase(t), testenv.NewDatabase(t)
	if err := catalog.CreateCluster(ctx, catalogDSN, router.RingConfig{},
		[]catalog.ShardSpec{{Name: "shard-0", DSN: shardDSN}}); err != nil {
		t.Fatal(err)
	}
	client := serve(t, "--catalog", catalogDSN, "--redis", "", "--session-sweep-interval", "50ms")
	for {
		_, err := client.PutUser(ctx, &pb.PutUserRequest{UserId: "alice"})
		if err == nil {
			break
		}
		if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
			t.Fatalf("PutUser: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := client.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "alice", TtlSeconds: 3600}); err != nil {
		t.Fatal(err)
	}
	shard, err := pgx.Connect(ctx, shardDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer shard.Close(context.Background())
	if _, err := shard.Exec(ctx, `UPDATE sessions SET expires_at = now() - interval '1 second'`); err != nil {
		t.Fatal(err)
	}
	for {
		var n int
		if err := shard.QueryRow(ctx, `SELECT count(*) FROM sessions`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the expired session was not swept")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCachePrefixMustEndWithColon(t *testing.T) {
	for p, ok := range map[string]bool{"shardgate:": true, "a:b:": true, "sg": false, "": false, "x:y": false} {
		if err := checkCachePrefix(p); (err == nil) != ok {
			t.Errorf("checkCachePrefix(%q) = %v", p, err)
		}
	}
}

// The metrics address beyond loopback takes TLS and an admin token, like
// the gRPC one: --allow-plaintext waives TLS, nothing waives the token.
func TestMetricsExposure(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	a := adminSurface{metrics: http.NotFoundHandler(), status: nil}
	if _, err := serveMetrics("0.0.0.0:0", a, security{}, log); err == nil || !strings.Contains(err.Error(), "--metrics-listen") {
		t.Fatalf("exposed without TLS and auth: err %v", err)
	}
	if _, err := serveMetrics("0.0.0.0:0", a, security{auth: &auth.Verifier{}}, log); err == nil {
		t.Fatal("exposed with auth but no TLS: no error")
	}
	if _, err := serveMetrics("0.0.0.0:0", a, security{allowPlaintext: true}, log); err == nil {
		t.Fatal("exposed without auth under --allow-plaintext: no error")
	}
	stop, err := serveMetrics("0.0.0.0:0", a, security{auth: &auth.Verifier{}, allowPlaintext: true}, log)
	if err != nil {
		t.Fatalf("--allow-plaintext with auth: %v", err)
	}
	stop()
	stop, err = serveMetrics("127.0.0.1:0", a, security{}, log)
	if err != nil {
		t.Fatalf("loopback: %v", err)
	}
	stop()
}
