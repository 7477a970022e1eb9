package main

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"google.golang.org/grpc/status"
)

// caller is one concurrent caller's state; only its goroutine touches it.
type caller struct {
	id  int
	rng *rand.Rand
	// ctx carries the run's outgoing metadata (the bearer token).
	ctx context.Context
}

// op is one call of a scenario.
type op func(ctx context.Context, c *caller) error

// measure runs op from c.Concurrency callers: for the warmup without
// counting, then for the duration. A call counts when it started inside the
// measured window, so the window's tail is not cut short.
func measure(ctx context.Context, e *env, fn op) *result {
	cfg := e.cfg
	start := time.Now()
	from, until := start.Add(cfg.Warmup), start.Add(cfg.Warmup+cfg.Duration)
	type tally struct {
		lat   []time.Duration
		codes map[string]int64
	}
	tallies := make([]tally, cfg.Concurrency)
	var wg sync.WaitGroup
	for i := range cfg.Concurrency {
		wg.Go(func() {
			c := &caller{id: i, rng: rand.New(rand.NewPCG(uint64(start.UnixNano()), uint64(i))), ctx: e.callCtx(ctx)}
			t := &tallies[i]
			t.lat = make([]time.Duration, 0, 4096)
			for ctx.Err() == nil {
				t0 := time.Now()
				if !t0.Before(until) {
					return
				}
				cctx, cancel := context.WithTimeout(c.ctx, cfg.Timeout)
				err := fn(cctx, c)
				cancel()
				if t0.Before(from) {
					continue
				}
				t.lat = append(t.lat, time.Since(t0))
				if err != nil {
					if t.codes == nil {
						t.codes = map[string]int64{}
					}
					t.codes[errorCode(err)]++
				}
			}
		})
	}
	wg.Wait()
	// Interrupted runs report over the part of the window that ran.
	elapsed := max(min(time.Since(from), cfg.Duration), 0)
	var all []time.Duration
	codes := map[string]int64{}
	var errs int64
	for _, t := range tallies {
		all = append(all, t.lat...)
		for c, n := range t.codes {
			codes[c] += n
			errs += n
		}
	}
	r := summarize(all, elapsed)
	r.Concurrency = cfg.Concurrency
	r.Errors = errs
	if errs > 0 {
		r.ErrorCodes = codes
	}
	return r
}

// errorCode names err in the errors-by-code tally: its gRPC code, or the
// SQLSTATE of a PostgreSQL error (the pg-* scenarios).
func errorCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return "SQLSTATE " + pgErr.Code
	}
	return status.Code(err).String()
}

// summarize turns latencies over a window into throughput and percentiles.
// It sorts lat.
func summarize(lat []time.Duration, window time.Duration) *result {
	slices.Sort(lat)
	r := &result{Ops: int64(len(lat)), elapsed: window}
	if window > 0 {
		r.RPS = float64(len(lat)) / window.Seconds()
	}
	r.P50ms = ms(percentile(lat, 0.50))
	r.P95ms = ms(percentile(lat, 0.95))
	r.P99ms = ms(percentile(lat, 0.99))
	if len(lat) > 0 {
		r.MaxMs = ms(lat[len(lat)-1])
	}
	return r
}

// percentile returns the nearest-rank percentile of sorted values: the
// smallest value at least q of them do not exceed.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
