package events

import (
	"context"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/internal/testenv"
)

// benchPartitions spreads benchmark events over this many partitions.
const benchPartitions = 64

// BenchmarkRelay measures how fast one relay drains a shard's outbox into
// Redis (b.N events already committed, ~100-byte payloads, default batch
// of 500), next to the raw rate of the same XADDs pipelined in the same
// batches from the same client ("xadd-baseline"): the relay adds the
// outbox read, marking what it delivered and the commit order on top.
func BenchmarkRelay(b *testing.B) {
	rc, prefix := newRedis(b)
	b.Run("relay", func(b *testing.B) {
		s := newTestShard(b, "bench", partitionsUpTo(benchPartitions)...)
		ctx := context.Background()
		if _, err := s.pool().Exec(ctx, `
INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
SELECT i % $2, 'user-' || (i % 1000), 'item', 'c/' || i, 'upsert', 1,
       jsonb_build_object('n', i, 'pad', repeat('x', 80))
FROM generate_series(1, $1) AS i`, b.N, benchPartitions); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		m := NewManager(RelayOptions{Redis: rc, Prefix: prefix + testenv.RandomHex(4) + ":", Logger: quietLogger()})
		start := time.Now()
		m.Sync(map[string]string{"bench": s.dsn})
		for pending(b, s) > 0 {
			time.Sleep(2 * time.Millisecond)
		}
		elapsed := time.Since(start)
		b.StopTimer()
		m.Close()
		b.ReportMetric(float64(b.N)/elapsed.Seconds(), "events/s")
	})
	b.Run("xadd-baseline", func(b *testing.B) {
		keys := Keys{prefix + testenv.RandomHex(4) + ":"}
		e := Event{ID: "6b8f4a52-0cfa-4a0e-9a43-3d2b8d0f3c11", UserID: "user-1", Entity: "item", Key: "c/1", Op: "upsert",
			Version: 1, Payload: []byte(`{"n": 1, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}`),
			CommittedAt: time.Now()}
		ctx := context.Background()
		start := time.Now()
		for i := 0; i < b.N; i += 500 {
			n := min(500, b.N-i)
			cmds := make(rueidis.Commands, n)
			for j := range n {
				e.Partition, e.Tick = int32((i+j)%benchPartitions), int64(i+j+1)
				fv := rc.B().Xadd().Key(keys.Stream(e.Partition)).Maxlen().Almost().Threshold("100000").Id(entryID(e.Tick)).FieldValue()
				f := e.fields()
				for k := 0; k < len(f); k += 2 {
					fv = fv.FieldValue(f[k], f[k+1])
				}
				cmds[j] = fv.Build()
			}
			for _, r := range rc.DoMulti(ctx, cmds...) {
				if err := r.Error(); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
	})
}

func partitionsUpTo(n int) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(i)
	}
	return out
}

// pending counts the events not yet delivered, from the clocks and the
// delivered ticks alone: counting outbox rows would scan the retained ones.
func pending(t testing.TB, s testShard) int64 {
	t.Helper()
	var n int64
	if err := s.pool().QueryRow(context.Background(), `SELECT coalesce(sum(c.tick - coalesce(d.tick, 0)), 0)
		FROM outbox_clock AS c LEFT JOIN outbox_delivered AS d ON d.partition = c.partition`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
