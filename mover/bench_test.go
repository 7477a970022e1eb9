package mover_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// The moving partition of BenchmarkMovePartition: users, each with items,
// about 100k rows in all.
const (
	benchHotUsers     = 300
	benchItemsPerUser = 333
	benchItemPad      = 120 // bytes of padding in each item's value
	// Baseline is measured for this long before each move.
	benchBaseline = 3 * time.Second
)

// The client load: writers to the moving partition ("hot", each with
// users of its own) and to partitions that stay put ("other"), each
// issuing a write every interval, or at once when the last one took
// longer. A paced load keeps the baseline below saturation on a small
// machine, so the extra latency a move adds is not lost in queueing.
const (
	hotWriters      = 4
	hotInterval     = 8 * time.Millisecond
	otherWriters    = 2
	otherInterval   = 20 * time.Millisecond
	benchOtherUsers = 40
)

// BenchmarkMovePartition moves one partition holding about 100k rows
// between two shards (each its own PostgreSQL server) while writers hammer
// it through the gRPC API, and reports:
//
//   - copy-rows/s: rows the bulk copy moved per second (rows copied, from
//     the move record, over the Copy action's duration); bare-copy-rows/s:
//     the partition's users and items piped by COPY from source to target
//     with nothing else (no slot, no pacing; rolled back) just before, the
//     speed this machine allows at the moment; and their ratio;
//   - hot-{base,move}-{p50,p99,max}-ms: latency of writes to the moving
//     partition with no move (the baseline window just before) and while
//     the move runs (from its start to its end, cleanup included), and
//     hot-{p50,p99,max}-extra-ms and -ratio: move minus, and over,
//     baseline;
//   - cutover-write-max-ms: the slowest write that overlapped the cutover
//     (freeze to flip): the pause a client saw; freeze-ms: the freeze the
//     move recorded (LastFreezeMs, from the freeze to the catalog flip);
//     switch-after-freeze-ms: how long after the freeze began the writers'
//     router switched to the new map (the least a write that met the
//     freeze waited);
//     verify-write-max-ms: the slowest write that overlapped the
//     verification's short freeze;
//   - other-{base,move}-p99-ms and other-p99-ratio: writes to partitions
//     that do not move.
//
// It also logs both writers' latencies by phase of the move (copy,
// catch-up and verification, cutover, cleanup).
//
// The goal (issue 10): client-seen pause p99 ≤ 50 ms, copy ≥ 100k rows/s.
// The machine is shared: compare the ratios, measured in the same run.
// Run it alone: go test -run '^$' -bench BenchmarkMovePartition -benchtime 1x ./mover
func BenchmarkMovePartition(b *testing.B) {
	clock := &actionClock{}
	h := newHarness(b, harnessOptions{Shards: 2, Mover: mover.ExecutorOptions{BeforeAction: clock.hook}})
	in := h.instances[0]
	ctx, stop := context.WithCancel(context.Background())
	defer stop()

	hot := router.Partition("bench-hot", router.DefaultPartitions)
	hotUsers := usersIn(hot, "bench-", benchHotUsers)
	start := time.Now()
	rows := h.loadPartition(h.ownerOf(hot), hot, hotUsers, benchItemsPerUser)
	b.Logf("partition %d on %s: %d rows loaded in %s", hot, h.ownerOf(hot), rows, time.Since(start).Round(time.Millisecond))

	var otherUsers []string
	for i := 0; len(otherUsers) < benchOtherUsers; i++ {
		id := fmt.Sprintf("other-%d", i)
		if router.Partition(id, router.DefaultPartitions) == hot {
			continue
		}
		if _, err := in.data.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: `{}`}); err != nil {
			b.Fatal(err)
		}
		otherUsers = append(otherUsers, id)
	}

	var hotLat, otherLat latencies
	var wg sync.WaitGroup
	for i := range hotWriters {
		mine := hotUsers[i*len(hotUsers)/hotWriters : (i+1)*len(hotUsers)/hotWriters]
		wg.Go(func() { paceWrites(ctx, in.data, mine, benchItemsPerUser, hotInterval, &hotLat) })
	}
	for i := range otherWriters {
		mine := otherUsers[i*len(otherUsers)/otherWriters : (i+1)*len(otherUsers)/otherWriters]
		wg.Go(func() { paceWrites(ctx, in.data, mine, 1, otherInterval, &otherLat) })
	}
	defer func() {
		stop()
		wg.Wait()
	}()

	var (
		hotBase, hotMove, otherBase, otherMove, cutover, verify []sample
		copied, bareCopied                                      int64
		copyTime, bareTime                                      time.Duration
		freezes, switches                                       []float64
	)
	b.ResetTimer()
	for range b.N {
		source := h.ownerOf(hot)
		target := h.other(source)
		n, d := h.bareCopy(source, target, hot)
		bareCopied += n
		bareTime += d
		time.Sleep(time.Second) // let the servers settle after it

		time.Sleep(benchBaseline)
		base := window{time.Now().Add(-benchBaseline), time.Now()}
		from := time.Now()
		switched := watchSwitch(ctx, in)
		h.startMove(hot, target, mover.DefaultFreezeBudget)
		m := h.waitDone(5 * time.Minute)
		during := window{from, time.Now()}

		hotBase = append(hotBase, hotLat.in(base)...)
		hotMove = append(hotMove, hotLat.in(during)...)
		otherBase = append(otherBase, otherLat.in(base)...)
		otherMove = append(otherMove, otherLat.in(during)...)
		cws := clock.windows(m.GetId(), mover.Frozen, mover.Freeze, mover.CutOver, mover.DropSubscription)
		if len(cws) == 0 {
			b.Fatalf("move %d: no cutover seen", m.GetId())
		}
		for _, w := range cws {
			cutover = append(cutover, hotLat.overlapping(w)...)
		}
		// The last freeze is the one that flipped the map.
		switches = append(switches, float64((<-switched).Sub(cws[len(cws)-1].from))/float64(time.Millisecond))
		for _, w := range clock.windows(m.GetId(), mover.CatchingUp, mover.Freeze, mover.CatchingUp, mover.Compare) {
			verify = append(verify, hotLat.overlapping(w)...)
		}
		cw := clock.windows(m.GetId(), mover.Copying, mover.Copy, mover.Copying, mover.Subscribe)
		if len(cw) != 1 {
			b.Fatalf("move %d copied %d times", m.GetId(), len(cw))
		}
		copied += m.GetRowsCopied()
		copyTime += cw[0].to.Sub(cw[0].from)
		freezes = append(freezes, m.GetLastFreezeMs())
		b.Logf("moved partition %d %s to %s: %d rows copied in %s (bare copy of its users and items: %d rows in %s); "+
			"freeze %.1f ms; the writers' router switched %.1f ms after the freeze began; whole move %s",
			hot, source, target, m.GetRowsCopied(), cw[0], n, d.Round(time.Millisecond),
			m.GetLastFreezeMs(), switches[len(switches)-1], during.to.Sub(during.from).Round(time.Millisecond))
		// Where in the move the writes slowed down.
		at := func(s mover.State, a mover.Action) time.Time { return clock.first(m.GetId(), s, a) }
		var phases strings.Builder
		for _, ph := range []struct {
			name     string
			from, to time.Time
		}{
			{"copy", at(mover.Copying, mover.Copy), at(mover.Copying, mover.Subscribe)},
			{"catch-up and verification", at(mover.Copying, mover.Subscribe), cws[len(cws)-1].from},
			{"cutover", cws[len(cws)-1].from, cws[len(cws)-1].to},
			{"cleanup", cws[len(cws)-1].to, during.to},
		} {
			w := window{ph.from, ph.to}
			fmt.Fprintf(&phases, "; %s (%s): hot %s, other %s", ph.name, w, summarize(hotLat.in(w)), summarize(otherLat.in(w)))
		}
		b.Logf("writes by phase of the move%s", phases.String())
	}
	b.StopTimer()

	if n := hotLat.failed() + otherLat.failed(); n > 0 {
		b.Errorf("%d client writes failed; first: %v", n, firstErr(&hotLat, &otherLat))
	}
	hb, hm := summarize(hotBase), summarize(hotMove)
	ob, om := summarize(otherBase), summarize(otherMove)
	cs, vs := summarize(cutover), summarize(verify)
	copyRate, bareRate := float64(copied)/copyTime.Seconds(), float64(bareCopied)/bareTime.Seconds()
	b.ReportMetric(copyRate, "copy-rows/s")
	b.ReportMetric(bareRate, "bare-copy-rows/s")
	b.ReportMetric(copyRate/bareRate, "copy-vs-bare-ratio")
	b.ReportMetric(slices.Max(freezes), "freeze-ms")
	b.ReportMetric(slices.Max(switches), "switch-after-freeze-ms")
	b.ReportMetric(cs.max, "cutover-write-max-ms")
	b.ReportMetric(vs.max, "verify-write-max-ms")
	for _, q := range []struct {
		name       string
		base, move float64
	}{{"p50", hb.p50, hm.p50}, {"p99", hb.p99, hm.p99}, {"max", hb.max, hm.max}} {
		b.ReportMetric(q.base, "hot-base-"+q.name+"-ms")
		b.ReportMetric(q.move, "hot-move-"+q.name+"-ms")
		b.ReportMetric(q.move-q.base, "hot-"+q.name+"-extra-ms")
		b.ReportMetric(q.move/q.base, "hot-"+q.name+"-ratio")
	}
	b.ReportMetric(ob.p99, "other-base-p99-ms")
	b.ReportMetric(om.p99, "other-move-p99-ms")
	b.ReportMetric(om.p99/ob.p99, "other-p99-ratio")
	b.Logf("writes to the moving partition: baseline %s; during the move %s; overlapping the cutover %s; overlapping the verification freeze %s",
		hb, hm, cs, vs)
	b.Logf("writes to other partitions: baseline %s; during the move %s", ob, om)
}

// watchSwitch reports when in's router next switches to a newer map.
func watchSwitch(ctx context.Context, in *instance) <-chan time.Time {
	v := in.srv.Router().Table().Version()
	ch := make(chan time.Time, 1)
	go func() {
		for in.srv.Router().Table().Version() == v && ctx.Err() == nil {
			time.Sleep(500 * time.Microsecond)
		}
		ch <- time.Now()
	}()
	return ch
}

// bareCopy pipes partition p's users and items from shard src into scratch
// tables on shard tgt the way the mover's copy does (text COPY out, COPY
// in, one transaction on the target, indexes in place) with nothing around
// it, and rolls the target back. It returns the rows and how long they
// took: the copy speed this machine allows at the moment.
func (h *harness) bareCopy(src, tgt string, p int32) (int64, time.Duration) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	from, to := h.connect(ctx, src), h.connect(ctx, tgt)
	defer from.Close(ctx)
	defer to.Close(ctx)
	tx, err := to.Begin(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	var rows int64
	start := time.Now()
	for _, table := range []string{"users", "items"} {
		if _, err := tx.Exec(ctx, `CREATE TABLE bench_`+table+` (LIKE `+table+` INCLUDING ALL)`); err != nil {
			h.t.Fatal(err)
		}
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() {
			_, err := from.PgConn().CopyTo(ctx, pw, fmt.Sprintf(`COPY (SELECT * FROM %s WHERE partition = %d) TO STDOUT`, table, p))
			pw.CloseWithError(err)
			done <- err
		}()
		tag, err := to.PgConn().CopyFrom(ctx, pr, `COPY bench_`+table+` FROM STDIN`)
		pr.Close()
		if err := errors.Join(err, <-done); err != nil {
			h.t.Fatalf("bare copy of %s: %v", table, err)
		}
		rows += tag.RowsAffected()
	}
	return rows, time.Since(start)
}

// loadPartition writes users (with item count items each) into partition
// p on shard name directly, as the API would have: each user's row at
// version 1, their items at version 1, and the partition's outbox clock
// counting one event per row, as if every event had been relayed; then it
// vacuums them, as autovacuum would have by the time a partition moves
// (else the first scan pays for setting every row's hint bits). It returns
// the rows written.
func (h *harness) loadPartition(name string, p int32, users []string, items int) int64 {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	conn := h.connect(ctx, name)
	defer conn.Close(ctx)
	pad := strings.Repeat("x", benchItemPad)
	var rows int64
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		userRows := make([][]any, len(users))
		for i, u := range users {
			userRows[i] = []any{p, u, []byte(`{"name": "` + u + `"}`), int64(1)}
		}
		n, err := tx.CopyFrom(ctx, pgx.Identifier{"users"}, []string{"partition", "user_id", "profile", "version"}, pgx.CopyFromRows(userRows))
		if err != nil {
			return err
		}
		rows += n
		i := 0
		n, err = tx.CopyFrom(ctx, pgx.Identifier{"items"}, []string{"partition", "user_id", "collection", "key", "value", "version"},
			pgx.CopyFromFunc(func() ([]any, error) {
				if i == len(users)*items {
					return nil, nil
				}
				u, k := users[i/items], i%items
				i++
				return []any{p, u, "c", itemKey(k), []byte(fmt.Sprintf(`{"n": %d, "pad": "%s"}`, k, pad)), int64(1)}, nil
			}))
		if err != nil {
			return err
		}
		rows += n
		_, err = tx.Exec(ctx, `INSERT INTO outbox_clock AS c (partition, tick) VALUES ($1, $2)
			ON CONFLICT (partition) DO UPDATE SET tick = c.tick + EXCLUDED.tick`, p, rows)
		return err
	})
	if err != nil {
		h.t.Fatalf("load partition %d on %s: %v", p, name, err)
	}
	if _, err := conn.Exec(ctx, `VACUUM ANALYZE users, items`); err != nil {
		h.t.Fatal(err)
	}
	return rows
}

func itemKey(k int) string { return fmt.Sprintf("k%04d", k) }

// paceWrites updates a random item of one of users (of items items each)
// every interval until ctx ends, recording each call.
func paceWrites(ctx context.Context, data pb.DataServiceClient, users []string, items int, interval time.Duration, lat *latencies) {
	next := time.Now()
	for n := 0; ; n++ {
		if d := time.Until(next); d > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(d):
			}
		} else if ctx.Err() != nil {
			return
		}
		next = next.Add(interval)
		if behind := time.Since(next); behind > interval {
			next = time.Now() // never burst to catch up
		}
		u := users[n%len(users)]
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		start := time.Now()
		_, err := data.PutItem(cctx, &pb.PutItemRequest{UserId: u, Collection: "c", Key: itemKey(n * 7 % items), ValueJson: fmt.Sprintf(`{"w": %d}`, n)})
		d := time.Since(start)
		cancel()
		if ctx.Err() != nil {
			return // the run ended mid-call: not a sample
		}
		lat.add(start, d, err)
	}
}

// latencies records client calls.
type latencies struct {
	mu      sync.Mutex
	samples []sample
	errs    []error
}

type sample struct {
	start time.Time
	d     time.Duration
}

func (l *latencies) add(start time.Time, d time.Duration, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.errs = append(l.errs, err)
		return
	}
	l.samples = append(l.samples, sample{start, d})
}

// in returns the calls that started within w.
func (l *latencies) in(w window) []sample {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []sample
	for _, s := range l.samples {
		if !s.start.Before(w.from) && s.start.Before(w.to) {
			out = append(out, s)
		}
	}
	return out
}

// overlapping returns the calls that were in flight at some point of w.
func (l *latencies) overlapping(w window) []sample {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []sample
	for _, s := range l.samples {
		if w.overlaps(s.start, s.d) {
			out = append(out, s)
		}
	}
	return out
}

func (l *latencies) failed() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.errs)
}

func firstErr(ls ...*latencies) error {
	for _, l := range ls {
		l.mu.Lock()
		defer l.mu.Unlock()
		if len(l.errs) > 0 {
			return l.errs[0]
		}
	}
	return nil
}

// summary is a latency distribution, in milliseconds.
type summary struct {
	n             int
	p50, p99, max float64
}

func summarize(ss []sample) summary {
	if len(ss) == 0 {
		return summary{}
	}
	ds := make([]time.Duration, len(ss))
	for i, s := range ss {
		ds[i] = s.d
	}
	slices.Sort(ds)
	q := func(f float64) float64 {
		i := min(int(f*float64(len(ds))), len(ds)-1)
		return float64(ds[i]) / float64(time.Millisecond)
	}
	return summary{n: len(ds), p50: q(0.50), p99: q(0.99), max: float64(ds[len(ds)-1]) / float64(time.Millisecond)}
}

func (s summary) String() string {
	return fmt.Sprintf("%d calls, p50 %.2f ms, p99 %.2f ms, max %.2f ms", s.n, s.p50, s.p99, s.max)
}
