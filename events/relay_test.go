package events

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

const insertEvent = `INSERT INTO outbox (partition, user_id, entity, key, op, version, payload)
VALUES ($1, $2, 'user', $2, 'upsert', 1, '{}')`

// A transaction that took a lower seq (or a lower xid) but commits later is
// neither skipped nor published ahead of what committed before it.
func TestRelayPublishesInCommitOrder(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 1, 2)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	ctx := testCtx(t, 2*time.Minute)
	m := NewManager(RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger()})
	defer m.Close()
	m.Sync(map[string]string{"s": s.dsn})

	// Lower seq, other partition: t1 inserts first and stays open.
	t1, err := s.pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer t1.Rollback(ctx)
	if _, err := t1.Exec(ctx, insertEvent, 2, "first"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.pool().Exec(ctx, insertEvent, 1, "second"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the later seq to be published while the earlier is open", func() bool {
		return len(readStream(t, rc, keys, 1)) == 1
	})
	if n := len(readStream(t, rc, keys, 2)); n != 0 {
		t.Fatalf("%d events of an open transaction published", n)
	}
	if err := t1.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the earlier seq to be published after its commit", func() bool {
		return len(readStream(t, rc, keys, 2)) == 1
	})

	// Lower xid, same partition: t3 gets its xid first, t4 writes and
	// commits, then t3 writes and commits. Commit order is t4, t3; xid
	// order would be t3, t4.
	t3, err := s.pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer t3.Rollback(ctx)
	var x3, x4 uint64
	if err := t3.QueryRow(ctx, `SELECT pg_current_xact_id()::text::bigint`).Scan(&x3); err != nil {
		t.Fatal(err)
	}
	t4, err := s.pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := t4.QueryRow(ctx, `SELECT pg_current_xact_id()::text::bigint`).Scan(&x4); err != nil {
		t.Fatal(err)
	}
	if _, err := t4.Exec(ctx, insertEvent, 1, "t4"); err != nil {
		t.Fatal(err)
	}
	if err := t4.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := t3.Exec(ctx, insertEvent, 1, "t3"); err != nil {
		t.Fatal(err)
	}
	if err := t3.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if x3 >= x4 {
		t.Fatalf("setup: xid of t3 %d not below t4's %d", x3, x4)
	}
	waitFor(t, "both to be published", func() bool { return len(readStream(t, rc, keys, 1)) == 3 })
	var got []string
	for _, e := range readStream(t, rc, keys, 1) {
		got = append(got, e.UserID)
	}
	if want := []string{"second", "t4", "t3"}; !slices.Equal(got, want) {
		t.Fatalf("partition 1 stream: %v, want %v (commit order)", got, want)
	}
	waitFor(t, "the outbox to be trimmed", func() bool { return outboxCount(t, s) == 0 })
}

// The relay is killed again and again (its connection, and a whole
// instance) during 10,000 writes over 4 shards, with a second instance
// ready to take over: every committed write yields an event, no rolled-back
// one does, and per key, versions only rise in each stream.
func TestRelaySurvivesKillsWithoutLossOrDisorder(t *testing.T) {
	t.Parallel()
	const (
		nShards   = 4
		perShard  = 8 // partitions
		writes    = 10000
		workers   = 8
		usersEach = 50
	)
	var ts []testShard
	dsns := map[string]string{}
	for i := range nShards {
		var owned []int32
		for p := range perShard {
			owned = append(owned, int32(i*perShard+p))
		}
		name := fmt.Sprintf("s%d", i)
		ts = append(ts, newTestShard(t, name, owned...))
		dsns[name] = ts[i].dsn
	}
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	ctx := testCtx(t, 5*time.Minute)
	opts := RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger(), ElectInterval: 100 * time.Millisecond, BatchSize: 100}
	a, b := NewManager(opts), NewManager(opts)
	defer b.Close()
	a.Sync(dsns)
	b.Sync(dsns)

	// Acknowledged writes: key → versions; and rolled-back user IDs.
	var (
		mu       sync.Mutex
		acked    = map[string][]int64{}
		deletes  = map[string]int{} // acknowledged deletes per key
		done     atomic.Int64
		rollback atomic.Int64
	)
	work := make(chan int, writes)
	for i := range writes {
		work <- i
	}
	close(work)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range work {
				si := rand.IntN(nShards)
				s := ts[si]
				p := int32(si*perShard + rand.IntN(perShard))
				user := fmt.Sprintf("u%d-%d", p, rand.IntN(usersEach))
				var (
					v   int64
					err error
					key string
				)
				switch r := rand.IntN(20); {
				case r == 0: // a write that rolls back
					err = rolledBack(ctx, s, p, i)
					rollback.Add(1)
					if err != nil {
						t.Error(err)
					}
					continue
				case r < 8:
					key = user + "/user/" + user
					v, err = s.sh.PutUser(ctx, p, user, []byte(`{"i":1}`), nil)
				case r < 17:
					var uv int64
					if uv, err = s.sh.PutUser(ctx, p, user, []byte(`{}`), ptr(0)); err != nil && !isConflict(err) {
						break
					} else if err == nil {
						mu.Lock()
						acked[user+"/user/"+user] = append(acked[user+"/user/"+user], uv)
						mu.Unlock()
					}
					key = user + "/item/c/" + fmt.Sprint(i%7)
					v, err = s.sh.PutItem(ctx, p, user, "c", fmt.Sprint(i%7), []byte(`1`), nil)
				default:
					key = user + "/item/c/" + fmt.Sprint(i%7)
					err = s.sh.DeleteItem(ctx, p, user, "c", fmt.Sprint(i%7), nil)
					if isNotFound(err) {
						continue
					}
					v = -1 // a delete's version is not returned; checked by order only
				}
				if err != nil {
					if !isConflict(err) {
						t.Error(err)
					}
					continue
				}
				done.Add(1)
				mu.Lock()
				if v > 0 {
					acked[key] = append(acked[key], v)
				} else {
					deletes[key]++
				}
				mu.Unlock()
			}
		})
	}
	// Chaos while the writes run: kill relay connections, then a whole
	// instance, then connections again.
	kills := 0
	for round := 0; done.Load()+rollback.Load() < writes*9/10 && round < 200; round++ {
		time.Sleep(50 * time.Millisecond)
		if round == 20 {
			a.Close()
			kills++
			continue
		}
		if round%5 == 0 {
			for _, s := range ts {
				kills += terminateRelays(t, s)
			}
		}
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	for _, s := range ts {
		waitFor(t, "every outbox to drain", func() bool { return outboxCount(t, s) == 0 })
	}
	t.Logf("%d writes acknowledged, %d rolled back, %d relay kills", done.Load(), rollback.Load(), kills)

	seen := map[string]bool{}
	published := map[string]map[int64]bool{}
	deleted := map[string]int{}
	upserts := 0
	for p := range int32(nShards * perShard) {
		last := map[string]int64{}
		var prevTick int64
		for _, e := range readStream(t, rc, keys, p) {
			if e.Tick != prevTick+1 {
				t.Fatalf("partition %d: tick %d after %d", p, e.Tick, prevTick)
			}
			prevTick = e.Tick
			if seen[e.ID] {
				continue // a redelivery: dedupe by event_id
			}
			seen[e.ID] = true
			if e.Entity == "user" && len(e.UserID) > 2 && e.UserID[:2] == "rb" {
				t.Fatalf("event of a rolled-back write: %+v", e)
			}
			k := eventKey(e)
			if e.Version <= last[k] {
				t.Fatalf("partition %d, %s: version %d after %d", p, k, e.Version, last[k])
			}
			last[k] = e.Version
			if e.Op == OpDelete {
				deleted[k]++
				continue
			}
			upserts++
			if published[k] == nil {
				published[k] = map[int64]bool{}
			}
			published[k][e.Version] = true
		}
	}
	nAcked := 0
	for k, vs := range acked {
		nAcked += len(vs)
		for _, v := range vs {
			if !published[k][v] {
				t.Fatalf("acknowledged write %s v%d has no event", k, v)
			}
		}
	}
	if upserts != nAcked {
		t.Fatalf("%d upsert events for %d acknowledged upserts", upserts, nAcked)
	}
	for k, n := range deletes {
		if deleted[k] != n {
			t.Fatalf("%s: %d delete events for %d acknowledged deletes", k, deleted[k], n)
		}
	}
}

// rolledBack writes a user in a transaction and rolls it back.
func rolledBack(ctx context.Context, s testShard, p int32, i int) error {
	if err := pgx.BeginFunc(ctx, s.pool(), func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, insertEvent, p, fmt.Sprintf("rb%d", i)); err != nil {
			return err
		}
		return errRollback
	}); !errors.Is(err, errRollback) {
		return err
	}
	return nil
}

var errRollback = errors.New("roll back")

func ptr(v int64) *int64 { return &v }
