package shards

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/versioning"
)

// fencedOp is one call against partition 7, where "alice" exists at version
// 1 with session "t1" and item c/k1.
type fencedOp struct {
	name  string
	write bool
	call  func(ctx context.Context, s *Shard) error
}

var fencedOps = []fencedOp{
	{"GetUser", false, func(ctx context.Context, s *Shard) error {
		_, err := s.GetUser(ctx, 7, "alice")
		return err
	}},
	{"GetSession", false, func(ctx context.Context, s *Shard) error {
		_, err := s.GetSession(ctx, 7, tokenHash("t1"))
		return err
	}},
	{"ListSessions", false, func(ctx context.Context, s *Shard) error {
		_, err := s.ListSessions(ctx, 7, "alice", SessionKey{}, MaxListSessions)
		return err
	}},
	{"GetItem", false, func(ctx context.Context, s *Shard) error {
		_, err := s.GetItem(ctx, 7, "alice", "c", "k1")
		return err
	}},
	{"ListItems", false, func(ctx context.Context, s *Shard) error {
		_, err := s.ListItems(ctx, 7, "alice", "c", "", "", 10)
		return err
	}},
	{"ListItems with prefix", false, func(ctx context.Context, s *Shard) error {
		_, err := s.ListItems(ctx, 7, "alice", "c", "k", "", 10)
		return err
	}},
	{"PutUser", true, func(ctx context.Context, s *Shard) error {
		_, err := s.PutUser(ctx, 7, "alice", []byte(`{}`), nil)
		return err
	}},
	{"PutUser create", true, func(ctx context.Context, s *Shard) error {
		_, err := s.PutUser(ctx, 7, "bob", []byte(`{}`), ver(0))
		return err
	}},
	{"PutUser create existing", true, func(ctx context.Context, s *Shard) error {
		_, err := s.PutUser(ctx, 7, "alice", []byte(`{}`), ver(0)) // would conflict
		return err
	}},
	{"PutUser update", true, func(ctx context.Context, s *Shard) error {
		_, err := s.PutUser(ctx, 7, "alice", []byte(`{}`), ver(1))
		return err
	}},
	{"PutUser update stale", true, func(ctx context.Context, s *Shard) error {
		_, err := s.PutUser(ctx, 7, "alice", []byte(`{}`), ver(5)) // would conflict
		return err
	}},
	{"DeleteUser", true, func(ctx context.Context, s *Shard) error {
		_, err := s.DeleteUser(ctx, 7, "alice", nil)
		return err
	}},
	{"DeleteUser missing", true, func(ctx context.Context, s *Shard) error {
		_, err := s.DeleteUser(ctx, 7, "nobody", nil) // would be not found
		return err
	}},
	{"CreateSession", true, func(ctx context.Context, s *Shard) error {
		_, err := s.CreateSession(ctx, 7, "alice", tokenHash("t2"), []byte(`{}`), time.Hour)
		return err
	}},
	{"CreateSession missing user", true, func(ctx context.Context, s *Shard) error {
		_, err := s.CreateSession(ctx, 7, "nobody", tokenHash("t3"), []byte(`{}`), time.Hour)
		return err
	}},
	{"TouchSession", true, func(ctx context.Context, s *Shard) error {
		_, err := s.TouchSession(ctx, 7, tokenHash("t1"), time.Hour)
		return err
	}},
	{"RevokeSession", true, func(ctx context.Context, s *Shard) error {
		return s.RevokeSession(ctx, 7, tokenHash("t1"))
	}},
	{"PutItem", true, func(ctx context.Context, s *Shard) error {
		_, err := s.PutItem(ctx, 7, "alice", "c", "k1", []byte(`2`), nil)
		return err
	}},
	{"PutItem create", true, func(ctx context.Context, s *Shard) error {
		_, err := s.PutItem(ctx, 7, "alice", "c", "k2", []byte(`2`), ver(0))
		return err
	}},
	{"PutItem update", true, func(ctx context.Context, s *Shard) error {
		_, err := s.PutItem(ctx, 7, "alice", "c", "k1", []byte(`2`), ver(1))
		return err
	}},
	{"PutItem update missing", true, func(ctx context.Context, s *Shard) error {
		_, err := s.PutItem(ctx, 7, "alice", "c", "k9", []byte(`2`), ver(1)) // would conflict
		return err
	}},
	{"DeleteItem", true, func(ctx context.Context, s *Shard) error {
		return s.DeleteItem(ctx, 7, "alice", "c", "k1", nil)
	}},
	{"DeleteItem at version", true, func(ctx context.Context, s *Shard) error {
		return s.DeleteItem(ctx, 7, "alice", "c", "k1", ver(1))
	}},
}

// TestFencing runs every operation against a partition in each state that
// is not "owned": reads work only when frozen, writes never, and nothing is
// written.
func TestFencing(t *testing.T) {
	t.Parallel()
	states := []struct {
		name      string
		set       func(t *testing.T, s *Shard)
		readsWork bool
	}{
		{"no ownership row", func(t *testing.T, s *Shard) { exec(t, s, `DELETE FROM ownership WHERE partition = 7`) }, false},
		{"frozen", func(t *testing.T, s *Shard) { setState(t, s, Frozen) }, true},
		{"moved", func(t *testing.T, s *Shard) { setState(t, s, Moved) }, false},
	}
	for _, st := range states {
		t.Run(st.name, func(t *testing.T) {
			t.Parallel()
			s := newShard(t, 7, 8)
			ctx := testCtx(t)
			seedPartition7(t, s)
			st.set(t, s)
			before := countRows(t, s)

			for _, op := range fencedOps {
				err := op.call(ctx, s)
				if !op.write && st.readsWork {
					if err != nil {
						t.Errorf("%s: %v, want success", op.name, err)
					}
					continue
				}
				if !errors.Is(err, ErrWrongShard) {
					t.Errorf("%s: err = %v, want ErrWrongShard", op.name, err)
				}
				if errors.Is(err, versioning.ErrConflict) || errors.Is(err, versioning.ErrNotFound) || errors.Is(err, ErrUserNotFound) {
					t.Errorf("%s: err = %v, want only ErrWrongShard", op.name, err)
				}
			}
			if after := countRows(t, s); after != before {
				t.Errorf("rows changed: %+v → %+v", before, after)
			}
			var changed bool
			if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM users WHERE version <> 1 UNION ALL SELECT 1 FROM sessions WHERE version <> 1 UNION ALL SELECT 1 FROM items WHERE version <> 1)`).Scan(&changed); err != nil || changed {
				t.Errorf("a version changed (err %v)", err)
			}

			// The neighbouring partition is unaffected.
			if _, err := s.PutUser(ctx, 8, "alice", []byte(`{}`), nil); err != nil {
				t.Errorf("PutUser on owned partition 8: %v", err)
			}
		})
	}

	// Control: on an owned partition every operation gets past the fence.
	t.Run("owned", func(t *testing.T) {
		t.Parallel()
		s := newShard(t, 7)
		ctx := testCtx(t)
		for _, op := range fencedOps {
			// Tombstones go too: each case starts from keys that never existed.
			exec(t, s, `TRUNCATE users, sessions, items, outbox, user_tombstones, item_tombstones`)
			seedPartition7(t, s)
			if err := op.call(ctx, s); errors.Is(err, ErrWrongShard) {
				t.Errorf("%s: %v", op.name, err)
			}
		}
	})
}

// seedPartition7 writes what fencedOps expect.
func seedPartition7(t *testing.T, s *Shard) {
	t.Helper()
	ctx := testCtx(t)
	if _, err := s.PutUser(ctx, 7, "alice", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSession(ctx, 7, "alice", tokenHash("t1"), []byte(`{}`), time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutItem(ctx, 7, "alice", "c", "k1", []byte(`1`), nil); err != nil {
		t.Fatal(err)
	}
}

func setState(t *testing.T, s *Shard, st OwnershipState) {
	t.Helper()
	if err := s.SetOwnership(testCtx(t), []int32{7}, st); err != nil {
		t.Fatal(err)
	}
}

// TestWriteWaitsForFreeze checks the lock protocol the mover relies on: a
// write blocked behind the mover's FOR UPDATE on the ownership row sees the
// partition frozen once the mover commits, and writes nothing.
func TestWriteWaitsForFreeze(t *testing.T) {
	t.Parallel()
	s := newShard(t, 7)
	ctx := testCtx(t)
	if _, err := s.PutUser(ctx, 7, "alice", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	before := countRows(t, s)

	mover, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer mover.Rollback(ctx)
	if _, err := mover.Exec(ctx, `SELECT 1 FROM ownership WHERE partition = 7 FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := s.PutUser(ctx, 7, "alice", []byte(`{"late":true}`), nil)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("write finished while the partition was locked for freezing: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	// Reads do not wait.
	if _, err := s.GetUser(ctx, 7, "alice"); err != nil {
		t.Fatalf("read during freeze: %v", err)
	}
	if _, err := mover.Exec(ctx, `UPDATE ownership SET state = 'frozen' WHERE partition = 7`); err != nil {
		t.Fatal(err)
	}
	if err := mover.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	wantErr(t, <-done, ErrWrongShard)
	if after := countRows(t, s); after != before {
		t.Fatalf("rows changed: %+v → %+v", before, after)
	}
}
