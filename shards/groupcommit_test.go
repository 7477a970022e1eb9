package shards

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/internal/versioning"
)

// stuckFlusher makes s group writes with one flusher and stops that flusher
// on its first batch: a write to partition p waits for p's clock, which a
// transaction holds until the returned release is called. Writes queued
// meanwhile go out together once it is released.
func stuckFlusher(t *testing.T, s *Shard, p int32) (release func(), first <-chan error) {
	t.Helper()
	ctx := testCtx(t)
	s.group.maxFlushers = 1
	putUsers(t, s, p, "holder")
	hold, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hold.Rollback(context.Background()) })
	if _, err := hold.Exec(ctx, `SELECT tick FROM outbox_clock WHERE partition = $1 FOR UPDATE`, p); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := s.PutItem(ctx, p, "holder", "c", "first", []byte(`1`), nil)
		done <- err
	}()
	testenv.WaitForLockWaiters(t, ctx, s.pool, 1)
	return func() {
		if err := hold.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
	}, done
}

// waitQueued waits until n requests are queued behind q's flushers.
func waitQueued[T queued](t *testing.T, q *flushQueue[T], n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		q.mu.Lock()
		got := len(q.queue)
		q.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d requests queued, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestGroupCommitSharesOneTransaction(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2, 3, 4, 5)
	for p := int32(2); p <= 5; p++ {
		putUsers(t, s, p, fmt.Sprintf("u%d", p))
	}
	_, seq := eventsAfter(t, s, 0)
	before := s.WriteGroupStats()
	release, first := stuckFlusher(t, s, 1)

	// Two writes to partition 2 cannot share a batch; the other partitions'
	// writes go in the first batch with one of them.
	type put struct {
		p   int32
		v   int64
		err error
	}
	puts := make(chan put, 5)
	for _, p := range []int32{5, 2, 3, 2, 4} {
		go func() {
			v, err := s.PutItem(testCtx(t), p, fmt.Sprintf("u%d", p), "c", "k", []byte(`{"n":1}`), nil)
			puts <- put{p, v, err}
		}()
	}
	waitQueued(t, &s.group.flushQueue, 5)
	release()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	versions := map[int32][]int64{}
	for range 5 {
		r := <-puts
		if r.err != nil {
			t.Fatalf("put to partition %d: %v", r.p, r.err)
		}
		versions[r.p] = append(versions[r.p], r.v)
	}
	if v := versions[2]; len(v) != 2 || v[0]+v[1] != 3 {
		t.Fatalf("partition 2's versions %v, want 1 and 2", v)
	}
	st := s.WriteGroupStats()
	// Counted from before the holder's user was written: its own batch, the
	// stuck one, then one of 4 and one of 1.
	if b, w := st.Batches-before.Batches, st.Writes-before.Writes; b != 4 || w != 7 {
		t.Fatalf("%d batches carried %d writes, want 4 batches (1, 1, 4, 1) and 7 writes", b, w)
	}
	evs, _ := eventsAfter(t, s, seq)
	if len(evs) != 7 { // with the holder's user
		t.Fatalf("%d events, want 7: %+v", len(evs), evs)
	}
	// The shared transaction committed the batch as one: same commit time.
	var commits int
	if err := s.pool.QueryRow(testCtx(t), `SELECT count(DISTINCT committed_at) FROM outbox WHERE seq > $1 AND partition IN (3, 4, 5)`, seq).Scan(&commits); err != nil {
		t.Fatal(err)
	}
	if commits != 1 {
		t.Fatalf("partitions 3, 4 and 5 were written by %d transactions, want 1", commits)
	}
}

func TestGroupCommitFailedWriteRunsItsNeighboursAlone(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2, 3, 4)
	putUsers(t, s, 2, "a")
	putUsers(t, s, 4, "d")
	if _, err := s.PutItem(testCtx(t), 4, "d", "c", "k", []byte(`1`), nil); err != nil {
		t.Fatal(err)
	}
	release, first := stuckFlusher(t, s, 1)

	ok := make(chan error, 1)
	bad := make(chan error, 1)
	conflict := make(chan error, 1)
	go func() { _, err := s.PutItem(testCtx(t), 2, "a", "c", "k", []byte(`{"ok":true}`), nil); ok <- err }()
	// Not JSON: PostgreSQL refuses the statement, which rolls the batch back.
	go func() { _, err := s.PutUser(testCtx(t), 3, "b", []byte(`{"broken"`), nil); bad <- err }()
	go func() { _, err := s.PutItem(testCtx(t), 4, "d", "c", "k", []byte(`2`), ver(7)); conflict <- err }()
	waitQueued(t, &s.group.flushQueue, 3)
	before := s.WriteGroupStats()
	release()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := <-ok; err != nil {
		t.Fatalf("the good write: %v", err)
	}
	if err := <-bad; err == nil {
		t.Fatal("the write of broken JSON succeeded")
	}
	var ce *versioning.ConflictError
	if err := <-conflict; !errors.As(err, &ce) || ce.Current != 1 {
		t.Fatalf("the conditional write: %v, want a conflict at current version 1", err)
	}
	if r := s.WriteGroupStats().Reruns - before.Reruns; r != 3 {
		t.Fatalf("%d writes ran again alone, want 3", r)
	}
	it, err := s.GetItem(testCtx(t), 2, "a", "c", "k")
	if err != nil || it.Version != 1 {
		t.Fatalf("the good write's item: %+v, %v", it, err)
	}
	if _, err := s.GetUser(testCtx(t), 3, "b"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("the broken user: %v, want not found", err)
	}
}

func TestGroupCommitCallerGivingUpLeavesTheQueue(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2)
	putUsers(t, s, 2, "a")
	release, first := stuckFlusher(t, s, 1)

	ctx, cancel := context.WithTimeout(testCtx(t), 50*time.Millisecond)
	defer cancel()
	if _, err := s.PutItem(ctx, 2, "a", "c", "k", []byte(`1`), nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a put whose caller gave up while queued: %v", err)
	}
	waitQueued(t, &s.group.flushQueue, 0)
	release()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetItem(testCtx(t), 2, "a", "c", "k"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("the abandoned put was written: %v", err)
	}
}

// A batch waiting for a lock must not stop the shard's other writes: after
// flushStall another flusher takes them.
func TestGroupCommitStuckBatchDoesNotBlockTheShard(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2)
	putUsers(t, s, 2, "a")
	release, first := stuckFlusher(t, s, 1)
	defer release()
	s.group.mu.Lock()
	s.group.maxFlushers = 2
	s.group.mu.Unlock()
	if _, err := s.PutItem(testCtx(t), 2, "a", "c", "k", []byte(`1`), nil); err != nil {
		t.Fatalf("a write behind a stuck batch: %v", err)
	}
	select {
	case err := <-first:
		t.Fatalf("the stuck write finished early: %v", err)
	default:
	}
}

// Without group commit every write is its own transaction.
func TestGroupCommitOff(t *testing.T) {
	t.Parallel()
	s := newShardAt(t, testenv.NewDatabase(t), PoolOptions{MaxWriteBatch: 1}, 1)
	putUsers(t, s, 1, "a")
	if _, err := s.PutItem(testCtx(t), 1, "a", "c", "k", []byte(`1`), nil); err != nil {
		t.Fatal(err)
	}
	if st := s.WriteGroupStats(); st != (WriteGroupStats{}) {
		t.Fatalf("stats with group commit off: %+v", st)
	}
	var n int
	if err := s.pool.QueryRow(testCtx(t), `SELECT count(*) FROM items`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("items: %d, %v", n, err)
	}
}
