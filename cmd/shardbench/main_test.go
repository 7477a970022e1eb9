package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/internal/testcluster"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/server"
)

func TestParseFlags(t *testing.T) {
	c, err := parseFlags([]string{"-addr", "h:1", "-scenario", "get-user", "-c", "8", "-duration", "2s", "-json"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr != "h:1" || c.Scenario != "get-user" || c.Concurrency != 8 || c.Duration != 2*time.Second || !c.JSON {
		t.Fatalf("parsed %+v", c)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "-scenario is required"},
		{[]string{"-scenario", "nope"}, `-scenario "nope" is unknown`},
		{[]string{"-scenario", "noop,,get-user"}, `-scenario "" is unknown`},
		{[]string{"-scenario", "noop", "-c", "0"}, "-c 0 is out of range"},
		{[]string{"-scenario", "noop", "-duration", "0s"}, "-duration 0s must be positive"},
		{[]string{"-scenario", "noop", "-users", "0"}, "-users 0 is out of range"},
		{[]string{"-scenario", "noop", "-conns", "0"}, "-conns 0 is out of range"},
		{[]string{"-scenario", "noop", "extra"}, `unexpected argument "extra"`},
		{[]string{"-c", "x"}, "invalid value"},
	} {
		_, err := parseFlags(tc.args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.args, err, tc.want)
		}
	}
}

func TestSummarize(t *testing.T) {
	var lat []time.Duration
	for i := 100; i >= 1; i-- {
		lat = append(lat, time.Duration(i)*time.Millisecond)
	}
	r := summarize(lat, 2*time.Second)
	if r.Ops != 100 || r.RPS != 50 || r.P50ms != 50 || r.P95ms != 95 || r.P99ms != 99 || r.MaxMs != 100 {
		t.Fatalf("got %+v", r)
	}
	if r := summarize(nil, time.Second); r.Ops != 0 || r.P99ms != 0 || r.MaxMs != 0 {
		t.Fatalf("empty: %+v", r)
	}
	if p := percentile([]time.Duration{7}, 0.99); p != 7 {
		t.Fatalf("one sample: %v", p)
	}
}

// TestScenarios runs every scenario briefly against a real cluster and
// checks the JSON report and that the run's data is gone afterwards.
func TestScenarios(t *testing.T) {
	cl := testcluster.Start(t, 2, server.Options{}, server.GRPCOptions{})
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			c, err := parseFlags([]string{"-addr", cl.Addr, "-scenario", sc.name, "-c", "4",
				"-duration", "300ms", "-warmup", "50ms", "-users", "20"}, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			var progress bytes.Buffer
			results, err := run(context.Background(), c, &progress)
			if err != nil {
				t.Fatal(err)
			}
			r := results[0]
			var out bytes.Buffer
			if err := printResults(&out, results, true); err != nil {
				t.Fatal(err)
			}
			var got map[string]any
			if err := json.Unmarshal(out.Bytes(), &got); err != nil {
				t.Fatalf("-json output %q: %v", out.String(), err)
			}
			for _, k := range []string{"scenario", "concurrency", "ops", "errors", "rps", "p50_ms", "p95_ms", "p99_ms", "max_ms"} {
				if _, ok := got[k]; !ok {
					t.Errorf("-json output lacks %q: %s", k, out.String())
				}
			}
			if r.Scenario != sc.name || r.Concurrency != 4 || r.Ops == 0 || r.Errors != 0 || r.RPS <= 0 || r.MaxMs < r.P50ms {
				t.Fatalf("result %+v", r)
			}
			runID := strings.Fields(strings.SplitN(progress.String(), "(run ", 2)[1])[0]
			assertCleanedUp(t, cl.Addr, strings.TrimSuffix(runID, ")"))
		})
	}
}

func assertCleanedUp(t *testing.T, addr, runID string) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	client := pb.NewDataServiceClient(conn)
	_, err = client.GetUser(ctx, &pb.GetUserRequest{UserId: "shardbench-" + runID + "-0"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("user 0 of run %s after cleanup: %v, want NotFound", runID, err)
	}
	resp, err := client.ListConfig(ctx, &pb.ListConfigRequest{Namespace: configNamespace})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range resp.GetEntries() {
		if strings.HasPrefix(e.GetKey(), runID) {
			t.Errorf("config key %s left behind", e.GetKey())
		}
	}
}

// TestScenarioList runs several scenarios on the same data and prints the
// table with each one's throughput relative to noop.
func TestScenarioList(t *testing.T) {
	cl := testcluster.Start(t, 2, server.Options{}, server.GRPCOptions{})
	c, err := parseFlags([]string{"-addr", cl.Addr, "-scenario", "noop,get-user,mixed", "-c", "2",
		"-duration", "200ms", "-warmup", "0s", "-users", "10"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	results, err := run(context.Background(), c, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != 3 || results[2].Scenario != "mixed" || results[2].Errors != 0 {
		t.Fatalf("results %+v", results)
	}
	var out bytes.Buffer
	if err := printResults(&out, results, false); err != nil {
		t.Fatal(err)
	}
	if lines := strings.Split(strings.TrimSpace(out.String()), "\n"); len(lines) != 4 ||
		!strings.Contains(lines[0], "VS NOOP") || !strings.HasSuffix(strings.TrimSpace(lines[1]), "1.00x") {
		t.Fatalf("table:\n%s", out.String())
	}
}

func TestUnreachableServerFailsClearly(t *testing.T) {
	c, err := parseFlags([]string{"-addr", "127.0.0.1:1", "-scenario", "noop", "-timeout", "1s"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = run(ctx, c, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "prepare noop: health check") {
		t.Fatalf("got %v", err)
	}
}
