package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/internal/testcluster"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
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
		{[]string{"-scenario", "pg-insert"}, "-scenario pg-insert needs -pg DSN"},
		{[]string{"-scenario", "noop,pg-get"}, "-scenario pg-get needs -pg DSN"},
		{[]string{"-scenario", "pg-get", "-pg", "postgres://h:notaport/db"}, "-pg: "},
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
	pgDSN := testenv.NewDatabase(t)
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			c, err := parseFlags([]string{"-addr", cl.Addr, "-scenario", sc.name, "-c", "4",
				"-duration", "300ms", "-warmup", "50ms", "-users", "20", "-pg", pgDSN}, io.Discard)
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
			runID := runIDOf(t, progress.String())
			assertCleanedUp(t, cl.Addr, runID)
			if tableExists(t, pgDSN, pgTableName(runID)) {
				t.Errorf("table %s left behind", pgTableName(runID))
			}
		})
	}
}

// runIDOf returns the run ID the progress output names.
func runIDOf(t *testing.T, progress string) string {
	t.Helper()
	_, after, ok := strings.Cut(progress, "(run ")
	id, _, ok2 := strings.Cut(after, ")")
	if !ok || !ok2 {
		t.Fatalf("no run ID in %q", progress)
	}
	return id
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

// TestPGBaselines runs pg-insert and pg-get on their own (no Shardgate
// server: -addr is never dialed) against a throwaway database.
func TestPGBaselines(t *testing.T) {
	dsn := testenv.NewDatabase(t)
	ctx := context.Background()
	db, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(ctx)
	runPG := func(t *testing.T, extra ...string) ([]*result, string) {
		t.Helper()
		c, err := parseFlags(append([]string{"-addr", "127.0.0.1:1", "-scenario", "pg-insert,pg-get", "-pg", dsn,
			"-c", "4", "-duration", "300ms", "-warmup", "50ms", "-users", "20"}, extra...), io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		var progress bytes.Buffer
		results, err := run(ctx, c, &progress)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range results {
			if r.Ops == 0 || r.Errors != 0 || r.Baseline != "" {
				t.Fatalf("result %+v", r)
			}
		}
		return results, runIDOf(t, progress.String())
	}

	// -keep leaves the table, to look at what the run wrote.
	results, kept := runPG(t, "-keep")
	table := pgx.Identifier{pgTableName(kept)}.Sanitize()
	var persistence string
	if err := db.QueryRow(ctx, `SELECT relpersistence::text FROM pg_class WHERE oid = $1::regclass`, table).Scan(&persistence); err != nil {
		t.Fatal(err)
	}
	if persistence != "p" {
		t.Errorf("table relpersistence %q, want p (logged: commits write WAL as a shard's do)", persistence)
	}
	var filled, inserted int64
	if err := db.QueryRow(ctx, `SELECT count(*) FILTER (WHERE key = 'k0' AND version = 1),
		count(*) FILTER (WHERE key <> 'k0') FROM `+table).Scan(&filled, &inserted); err != nil {
		t.Fatal(err)
	}
	if filled != 20 || inserted < results[0].Ops {
		t.Errorf("%d rows for pg-get (want 20, one per user) and %d inserted (want at least pg-insert's %d measured ops)", filled, inserted, results[0].Ops)
	}
	rows, err := db.Query(ctx, `SELECT partition, user_id, collection, value::text FROM `+table)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var (
			partition             int32
			user, collection, val string
		)
		if err := rows.Scan(&partition, &user, &collection, &val); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(user, "shardbench-"+kept+"-") || partition != router.Partition(user, router.DefaultPartitions) ||
			collection != itemCollection || !strings.HasPrefix(val, `{"n": `) {
			t.Fatalf("row (%d, %s, %s, %s) is not shaped like a put-item write", partition, user, collection, val)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}

	// Without -keep the run drops its own table, and only that.
	_, dropped := runPG(t)
	if tableExists(t, dsn, pgTableName(dropped)) {
		t.Errorf("table %s left behind", pgTableName(dropped))
	}
	if !tableExists(t, dsn, pgTableName(kept)) {
		t.Errorf("table %s of another run dropped", pgTableName(kept))
	}
}

func tableExists(t *testing.T, dsn, name string) bool {
	t.Helper()
	ctx := context.Background()
	db, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(ctx)
	var exists bool
	if err := db.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, pgx.Identifier{name}.Sanitize()).Scan(&exists); err != nil {
		t.Fatal(err)
	}
	return exists
}

// TestBaselineRatios runs Shardgate scenarios next to their PostgreSQL
// baselines and checks the ratio fields of -json and the table.
func TestBaselineRatios(t *testing.T) {
	cl := testcluster.Start(t, 2, server.Options{}, server.GRPCOptions{})
	c, err := parseFlags([]string{"-addr", cl.Addr, "-scenario", "noop,put-item,pg-insert,get-user,pg-get", "-pg", testenv.NewDatabase(t),
		"-c", "2", "-duration", "200ms", "-warmup", "0s", "-users", "10"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	results, err := run(context.Background(), c, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := printResults(&out, results, true); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 5 {
		t.Fatalf("-json output:\n%s", out.String())
	}
	for i, want := range []string{"", "pg-insert", "", "pg-get", ""} {
		var got map[string]any
		if err := json.Unmarshal([]byte(lines[i]), &got); err != nil {
			t.Fatal(err)
		}
		_, hasRatio := got["vs_baseline"]
		_, hasP99 := got["p99_vs_baseline"]
		if want == "" {
			if _, ok := got["baseline"]; ok || hasRatio || hasP99 {
				t.Errorf("%s has baseline fields: %s", got["scenario"], lines[i])
			}
			continue
		}
		if got["baseline"] != want || !hasRatio || !hasP99 {
			t.Errorf("%s: want baseline %q with vs_baseline and p99_vs_baseline: %s", got["scenario"], want, lines[i])
		}
		if v, _ := got["vs_baseline"].(float64); v != results[i].RPS/results[i+1].RPS {
			t.Errorf("%s vs_baseline %v, want %v", got["scenario"], got["vs_baseline"], results[i].RPS/results[i+1].RPS)
		}
	}
	out.Reset()
	if err := printResults(&out, results, false); err != nil {
		t.Fatal(err)
	}
	if table := strings.Split(out.String(), "\n"); !strings.Contains(table[0], "VS NOOP") ||
		!strings.Contains(table[0], "BASELINE") || !strings.Contains(table[2], "pg-insert") {
		t.Fatalf("table:\n%s", out.String())
	}
}

func TestCompareToBaselines(t *testing.T) {
	results := []*result{
		{Scenario: "put-item", RPS: 100, P99ms: 30},
		{Scenario: "get-user", RPS: 800, P99ms: 4},
		{Scenario: "pg-insert", RPS: 400, P99ms: 10},
		{Scenario: "noop", RPS: 2000, P99ms: 2},
	}
	compareToBaselines(results)
	put, get := results[0], results[1]
	if put.Baseline != "pg-insert" || put.VsBaseline == nil || *put.VsBaseline != 0.25 || put.P99VsBaseline == nil || *put.P99VsBaseline != 3 {
		t.Errorf("put-item: %+v", put)
	}
	if get.Baseline != "" || get.VsBaseline != nil || get.P99VsBaseline != nil {
		t.Errorf("get-user without pg-get: %+v", get)
	}
	for _, r := range results[2:] {
		if r.Baseline != "" || r.VsBaseline != nil {
			t.Errorf("%s: %+v", r.Scenario, r)
		}
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
