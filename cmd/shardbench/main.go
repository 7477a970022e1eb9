// Command shardbench drives a Shardgate server with one named scenario at a
// fixed concurrency for a fixed time, then prints throughput, latency
// percentiles and errors.
//
//	shardbench -addr 127.0.0.1:7070 -scenario get-session -c 32 -duration 10s [-json]
//	shardbench -scenario noop,get-session,get-user      several in turn, with ratios to noop
//	shardbench -scenario put-item,pg-insert,get-user,pg-get -pg DSN
//	                                                    with ratios to PostgreSQL alone
//
// It creates its own users, sessions and config keys before measuring and
// deletes them afterwards (-keep leaves them). Compare scenarios run on the
// same machine in the same session: `noop` (the gRPC health check) is the
// ceiling of the transport there, and pg-insert and pg-get (a scratch table
// in the -pg database, created and dropped by the run) are what put-item and
// get-user would cost in PostgreSQL alone.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// config is what the flags set.
type config struct {
	Addr        string
	Scenario    string
	Concurrency int
	Duration    time.Duration
	Warmup      time.Duration
	JSON        bool
	Users       int
	Conns       int
	Timeout     time.Duration
	Token       string
	Keep        bool
	PG          string
	CPUProfile  string
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("shardbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.Addr, "addr", "127.0.0.1:7070", "Shardgate gRPC address")
	fs.StringVar(&c.Scenario, "scenario", "", "scenario to run, or several separated by commas (run in turn on the same data): "+strings.Join(scenarioNames(), ", "))
	fs.IntVar(&c.Concurrency, "c", 32, "concurrent callers")
	fs.DurationVar(&c.Duration, "duration", 10*time.Second, "how long to measure")
	fs.DurationVar(&c.Warmup, "warmup", time.Second, "load before measuring starts (not counted)")
	fs.BoolVar(&c.JSON, "json", false, "print one JSON object instead of a table")
	fs.IntVar(&c.Users, "users", 1000, "users (each with one session and one item) created for the run")
	fs.IntVar(&c.Conns, "conns", 1, "gRPC connections the callers share, round robin")
	fs.DurationVar(&c.Timeout, "timeout", 5*time.Second, "deadline of each call")
	fs.StringVar(&c.Token, "token", os.Getenv("SHARDGATE_TOKEN"), "bearer token sent with every call (default $SHARDGATE_TOKEN)")
	fs.BoolVar(&c.Keep, "keep", false, "keep the data the run created")
	fs.StringVar(&c.CPUProfile, "cpuprofile", "", "write the load tool's own CPU profile to this file (is the client the bottleneck?)")
	fs.StringVar(&c.PG, "pg", "", "PostgreSQL DSN (a shard database, or any other) for pg-insert and pg-get's scratch table")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: shardbench -scenario NAME [flags]\n\nscenarios:\n")
		w := tabwriter.NewWriter(stderr, 0, 4, 2, ' ', 0)
		for _, s := range scenarios {
			fmt.Fprintf(w, "  %s\t%s\n", s.name, s.help)
		}
		w.Flush()
		fmt.Fprintf(stderr, "\nflags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	switch {
	case fs.NArg() > 0:
		return c, fmt.Errorf("unexpected argument %q (flags only)", fs.Arg(0))
	case c.Scenario == "":
		return c, fmt.Errorf("-scenario is required: one of %s", strings.Join(scenarioNames(), ", "))
	}
	if name, ok := c.unknownScenario(); ok {
		return c, fmt.Errorf("-scenario %q is unknown: one of %s", name, strings.Join(scenarioNames(), ", "))
	}
	for _, name := range c.scenarios() {
		if usesPG(name) && c.PG == "" {
			return c, fmt.Errorf("-scenario %s needs -pg DSN: the PostgreSQL database to create its scratch table in", name)
		}
	}
	if c.PG != "" {
		if _, err := pgxpool.ParseConfig(c.PG); err != nil {
			return c, fmt.Errorf("-pg: %w", err)
		}
	}
	switch {
	case c.Concurrency < 1 || c.Concurrency > 10000:
		return c, fmt.Errorf("-c %d is out of range 1-10000", c.Concurrency)
	case c.Duration <= 0:
		return c, fmt.Errorf("-duration %s must be positive", c.Duration)
	case c.Warmup < 0:
		return c, fmt.Errorf("-warmup %s must not be negative", c.Warmup)
	case c.Users < 1 || c.Users > 1_000_000:
		return c, fmt.Errorf("-users %d is out of range 1-1000000", c.Users)
	case c.Conns < 1 || c.Conns > 256:
		return c, fmt.Errorf("-conns %d is out of range 1-256", c.Conns)
	case c.Timeout <= 0:
		return c, fmt.Errorf("-timeout %s must be positive", c.Timeout)
	}
	return c, nil
}

// scenarios lists the scenario names -scenario gave.
func (c config) scenarios() []string { return strings.Split(c.Scenario, ",") }

// unknownScenario returns the first name in -scenario that is no scenario.
func (c config) unknownScenario() (string, bool) {
	for _, name := range c.scenarios() {
		if findScenario(name) == nil {
			return name, true
		}
	}
	return "", false
}

func main() {
	c, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "shardbench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if c.CPUProfile != "" {
		f, err := os.Create(c.CPUProfile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "shardbench:", err)
			os.Exit(2)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "shardbench: -cpuprofile:", err)
			os.Exit(2)
		}
		defer f.Close()
	}
	results, err := run(ctx, c, os.Stderr)
	pprof.StopCPUProfile() // before any os.Exit below
	if err != nil {
		fmt.Fprintln(os.Stderr, "shardbench:", err)
		os.Exit(1)
	}
	if err := printResults(os.Stdout, results, c.JSON); err != nil {
		fmt.Fprintln(os.Stderr, "shardbench:", err)
		os.Exit(1)
	}
	for _, r := range results {
		if r.Ops == 0 || r.Errors == r.Ops {
			os.Exit(1)
		}
	}
}

// run prepares the data of the scenarios, measures each in turn, cleans up
// and returns one result per scenario. Progress goes to logw.
func run(ctx context.Context, c config, logw io.Writer) ([]*result, error) {
	conns := make([]*grpc.ClientConn, c.Conns)
	for i := range conns {
		conn, err := grpc.NewClient(c.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", c.Addr, err)
		}
		defer conn.Close()
		conns[i] = conn
	}
	e := newEnv(c, conns, logw)
	defer e.close()
	// Clean up whatever setup created, even when it failed half way.
	if !c.Keep {
		defer func() {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			if err := e.cleanup(cctx); err != nil {
				fmt.Fprintln(logw, "shardbench: cleanup:", err)
			}
		}()
	}
	var results []*result
	for _, name := range c.scenarios() {
		sc := findScenario(name)
		fmt.Fprintf(logw, "shardbench: preparing %s (run %s)\n", sc.name, e.runID)
		op, err := sc.setup(ctx, e)
		if err != nil {
			return nil, fmt.Errorf("prepare %s: %w", sc.name, err)
		}
		fmt.Fprintf(logw, "shardbench: %s, %d callers, %s warmup, %s measured\n", sc.name, c.Concurrency, c.Warmup, c.Duration)
		r := measure(ctx, e, op)
		r.Scenario = sc.name
		results = append(results, r)
		if ctx.Err() != nil {
			break
		}
	}
	compareToBaselines(results)
	return results, nil
}

// baselines maps a scenario to the one doing its bare database work.
var baselines = map[string]string{"put-item": "pg-insert", "get-user": "pg-get"}

// compareToBaselines sets the baseline ratios of each result whose baseline
// also ran (the last of them, when a scenario ran twice).
func compareToBaselines(results []*result) {
	last := map[string]*result{}
	for _, r := range results {
		last[r.Scenario] = r
	}
	for _, r := range results {
		b := last[baselines[r.Scenario]]
		if b == nil {
			continue
		}
		r.Baseline = b.Scenario
		if b.RPS > 0 {
			v := r.RPS / b.RPS
			r.VsBaseline = &v
		}
		if b.P99ms > 0 {
			v := r.P99ms / b.P99ms
			r.P99VsBaseline = &v
		}
	}
}

// result is one run's outcome; its JSON form is the -json output.
type result struct {
	Scenario    string           `json:"scenario"`
	Concurrency int              `json:"concurrency"`
	Ops         int64            `json:"ops"`
	Errors      int64            `json:"errors"`
	RPS         float64          `json:"rps"`
	P50ms       float64          `json:"p50_ms"`
	P95ms       float64          `json:"p95_ms"`
	P99ms       float64          `json:"p99_ms"`
	MaxMs       float64          `json:"max_ms"`
	ErrorCodes  map[string]int64 `json:"errors_by_code,omitempty"`
	// Baseline is the scenario of the same work in PostgreSQL alone, when it
	// ran too; VsBaseline is RPS over its RPS, P99VsBaseline P99ms over its.
	Baseline      string   `json:"baseline,omitempty"`
	VsBaseline    *float64 `json:"vs_baseline,omitempty"`
	P99VsBaseline *float64 `json:"p99_vs_baseline,omitempty"`
	elapsed       time.Duration
}

// printResults writes one JSON object per line, or a table. When noop ran,
// a column gives each scenario's throughput relative to it: the figure that
// stays comparable on a shared, noisy machine. When a baseline ran, three
// more give it and the throughput and p99 relative to it.
func printResults(w io.Writer, results []*result, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		for _, r := range results {
			if err := enc.Encode(r); err != nil {
				return err
			}
		}
		return nil
	}
	var base *result
	withBaseline := false
	for _, r := range results {
		if r.Scenario == "noop" && r.RPS > 0 {
			base = r
		}
		withBaseline = withBaseline || r.Baseline != ""
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	header := "SCENARIO\tCALLERS\tOPS\tERRORS\tOPS/S\tP50 ms\tP95 ms\tP99 ms\tMAX ms\t"
	if base != nil {
		header += "VS NOOP\t"
	}
	if withBaseline {
		header += "BASELINE\tVS BASELINE\tP99 VS BASELINE\t"
	}
	fmt.Fprintln(tw, header)
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.0f\t%.3f\t%.3f\t%.3f\t%.3f\t",
			r.Scenario, r.Concurrency, r.Ops, r.Errors, r.RPS, r.P50ms, r.P95ms, r.P99ms, r.MaxMs)
		if base != nil {
			fmt.Fprintf(tw, "%.2fx\t", r.RPS/base.RPS)
		}
		if withBaseline {
			fmt.Fprintf(tw, "%s\t%s\t%s\t", r.Baseline, ratio(r.VsBaseline), ratio(r.P99VsBaseline))
		}
		fmt.Fprintln(tw)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, r := range results {
		codes := make([]string, 0, len(r.ErrorCodes))
		for c := range r.ErrorCodes {
			codes = append(codes, c)
		}
		sort.Strings(codes)
		for _, c := range codes {
			fmt.Fprintf(w, "%s errors %s: %d\n", r.Scenario, c, r.ErrorCodes[c])
		}
	}
	return nil
}

// ratio formats an optional ratio; blank when absent.
func ratio(v *float64) string {
	if v == nil {
		return ""
	}
	return fmt.Sprintf("%.2fx", *v)
}
