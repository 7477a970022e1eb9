package shards

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/internal/versioning"
)

// heldPool opens a shard with a one-connection pool and one read flusher
// per kind, and takes the connection: the first read's flusher waits for it
// while later reads queue. release hands the connection back, after which
// the first read runs alone and the queued ones as one batch.
func heldPool(t *testing.T, dsn string, owned ...int32) (s *Shard, release func()) {
	t.Helper()
	s = newShardAt(t, dsn, PoolOptions{MaxConns: 1, ReadFlushers: 1}, owned...)
	c, err := s.pool.Acquire(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	var released bool
	release = func() {
		if !released {
			released = true
			c.Release()
		}
	}
	t.Cleanup(release)
	return s, release
}

// A batch answers every key as a lone read would: found, not found, frozen
// (still readable), moved and unknown partitions (wrong shard), and the same
// key twice. The lone answers come from a shard with read batching off.
func TestReadBatchAnswersLikeLoneReads(t *testing.T) {
	t.Parallel()
	dsn := testenv.NewDatabase(t)
	ctx := testCtx(t)
	s, release := heldPool(t, dsn, 1, 2, 3)
	lone := newShardAt(t, dsn, PoolOptions{MaxReadBatch: 1}, 1, 2, 3)
	if lone.users != nil {
		t.Fatal("MaxReadBatch 1 must turn read batching off")
	}
	for p, ids := range map[int32][]string{1: {"a", "b"}, 2: {"c"}, 3: {"d"}} {
		for _, id := range ids {
			if _, err := lone.PutUser(ctx, p, id, fmt.Appendf(nil, `{"id": %q, "p": %d}`, id, p), nil); err != nil {
				t.Fatal(err)
			}
			if _, err := lone.PutItem(ctx, p, id, "c", "k", fmt.Appendf(nil, `%q`, id), nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := lone.SetOwnership(ctx, []int32{2}, Frozen); err != nil {
		t.Fatal(err)
	}
	if err := lone.SetOwnership(ctx, []int32{3}, Moved); err != nil {
		t.Fatal(err)
	}

	keys := []userKey{{1, "a"}, {1, "b"}, {1, "nobody"}, {2, "c"}, {3, "d"}, {9, "a"}, {1, "a"}}
	type answer struct {
		u   User
		it  Item
		err error
	}
	first := make(chan answer, 2)
	go func() { u, err := s.GetUser(ctx, 1, "b"); first <- answer{u: u, err: err} }()
	go func() { it, err := s.GetItem(ctx, 1, "b", "c", "k"); first <- answer{it: it, err: err} }()
	waitTaken(t, s.users)
	waitTaken(t, s.items)

	users := make([]chan answer, len(keys))
	items := make([]chan answer, len(keys))
	for i, k := range keys {
		users[i], items[i] = make(chan answer, 1), make(chan answer, 1)
		go func() { u, err := s.GetUser(ctx, k.partition, k.userID); users[i] <- answer{u: u, err: err} }()
		go func() {
			it, err := s.GetItem(ctx, k.partition, k.userID, "c", "k")
			items[i] <- answer{it: it, err: err}
		}()
	}
	waitQueued(t, &s.users.flushQueue, len(keys))
	waitQueued(t, &s.items.flushQueue, len(keys))
	before := s.ReadBatchStats()
	release()
	for range 2 {
		if a := <-first; a.err != nil {
			t.Fatalf("first read: %v", a.err)
		}
	}

	for i, k := range keys {
		gotU, gotI := <-users[i], <-items[i]
		wantU, wantUErr := lone.GetUser(ctx, k.partition, k.userID)
		wantI, wantIErr := lone.GetItem(ctx, k.partition, k.userID, "c", "k")
		sameErr := func(what string, got, want error) {
			t.Helper()
			switch {
			case want == nil && got != nil, want != nil && got == nil:
				t.Errorf("%s %v: batched err %v, lone err %v", what, k, got, want)
			case want != nil && (errors.Is(want, ErrWrongShard) != errors.Is(got, ErrWrongShard) ||
				errors.Is(want, versioning.ErrNotFound) != errors.Is(got, versioning.ErrNotFound) ||
				got.Error() != want.Error()):
				t.Errorf("%s %v: batched err %q, lone err %q", what, k, got, want)
			}
		}
		sameErr("user", gotU.err, wantUErr)
		sameErr("item", gotI.err, wantIErr)
		if gotU.u.UserID != wantU.UserID || gotU.u.Partition != wantU.Partition || !bytes.Equal(gotU.u.Profile, wantU.Profile) ||
			gotU.u.Version != wantU.Version || !gotU.u.CreatedAt.Equal(wantU.CreatedAt) || !gotU.u.UpdatedAt.Equal(wantU.UpdatedAt) {
			t.Errorf("user %v: batched %+v, lone %+v", k, gotU.u, wantU)
		}
		if gotI.it.UserID != wantI.UserID || gotI.it.Key != wantI.Key || !bytes.Equal(gotI.it.Value, wantI.Value) ||
			gotI.it.Version != wantI.Version || !gotI.it.UpdatedAt.Equal(wantI.UpdatedAt) {
			t.Errorf("item %v: batched %+v, lone %+v", k, gotI.it, wantI)
		}
	}
	// The answers above must have come from batches, not lone reads.
	if got := s.ReadBatchStats(); got.Batches-before.Batches != 2 || got.Reads-before.Reads != int64(2*len(keys)) {
		t.Errorf("read batching stats went from %+v to %+v; want 2 batches of %d reads", before, got, len(keys))
	}
}

// waitTaken waits until g's only flusher has taken everything queued (and,
// the pool being held, waits for a connection).
func waitTaken[K, R any](t *testing.T, g *readGroup[K, R]) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		g.mu.Lock()
		flushers, queued := g.flushers, len(g.queue)
		g.mu.Unlock()
		if flushers == 1 && queued == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d flushers, %d reads queued; want the one flusher to have taken them", flushers, queued)
		}
		time.Sleep(time.Millisecond)
	}
}

// A caller that gives up while its read is queued gets its context's error
// at once, and the read queued with it is still answered.
func TestReadBatchCallerGivesUp(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	dsn := testenv.NewDatabase(t)
	s, release := heldPool(t, dsn, 1)
	lone := newShardAt(t, dsn, PoolOptions{MaxReadBatch: 1}, 1)
	putUsers(t, lone, 1, "a")

	errs := make(chan error, 2)
	go func() { _, err := s.GetUser(ctx, 1, "a"); errs <- err }()
	waitTaken(t, s.users)
	gaveUp, giveUp := context.WithCancel(ctx)
	quitter := make(chan error, 1)
	go func() { _, err := s.GetUser(gaveUp, 1, "a"); quitter <- err }()
	go func() { _, err := s.GetUser(ctx, 1, "a"); errs <- err }()
	waitQueued(t, &s.users.flushQueue, 2)
	giveUp()
	if err := <-quitter; !errors.Is(err, context.Canceled) {
		t.Fatalf("queued read whose caller gave up: %v, want context.Canceled", err)
	}
	waitQueued(t, &s.users.flushQueue, 1)
	release()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("read: %v", err)
		}
	}
}

// One flusher runs while it keeps up; when its statement is held up (here
// by a lock on the table) and reads wait, another starts after readStall.
func TestReadBatchStalledFlusherGetsHelp(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	dsn := testenv.NewDatabase(t)
	s := newShardAt(t, dsn, PoolOptions{MaxConns: 4, ReadFlushers: 2}, 1)
	putUsers(t, s, 1, "a")
	hold, err := newShardAt(t, dsn, PoolOptions{}, 1).pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(context.Background())
	if _, err := hold.Exec(ctx, `LOCK TABLE users IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 2)
	go func() { _, err := s.GetUser(ctx, 1, "a"); errs <- err }()
	waitTaken(t, s.users)
	go func() { _, err := s.GetUser(ctx, 1, "a"); errs <- err }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.users.mu.Lock()
		flushers := s.users.flushers
		s.users.mu.Unlock()
		if flushers == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d flushers while the first is held up and a read waits, want 2", flushers)
		}
		time.Sleep(time.Millisecond)
	}
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}
