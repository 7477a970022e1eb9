package shards

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/versioning"
)

// TestOutbox runs a sequence of writes and checks the outbox rows each adds:
// exactly one per changed entity, with its key, op, new version and payload,
// and none for a refused write.
func TestOutbox(t *testing.T) {
	t.Parallel()
	s := newShard(t, 2)
	ctx := testCtx(t)
	th := tokenHash("2.tok")
	hexKey := fmt.Sprintf("%x", th)

	steps := []struct {
		name string
		call func(ctx context.Context) error
		want []event
	}{
		{"create user", func(ctx context.Context) error {
			_, err := s.PutUser(ctx, 2, "alice", []byte(`{"a": 1}`), ver(0))
			return err
		}, []event{{2, "alice", "user", "alice", "upsert", 1, `{"a": 1}`}}},
		{"upsert user", func(ctx context.Context) error {
			_, err := s.PutUser(ctx, 2, "alice", []byte(`{"a":2}`), nil)
			return err
		}, []event{{2, "alice", "user", "alice", "upsert", 2, `{"a": 2}`}}},
		{"update user", func(ctx context.Context) error {
			_, err := s.PutUser(ctx, 2, "alice", []byte(`{"a":3}`), ver(2))
			return err
		}, []event{{2, "alice", "user", "alice", "upsert", 3, `{"a": 3}`}}},
		{"conflicting user update", func(ctx context.Context) error {
			_, err := s.PutUser(ctx, 2, "alice", []byte(`{"a":4}`), ver(2))
			return wantIs(err, versioning.ErrConflict)
		}, nil},
		{"conflicting user create", func(ctx context.Context) error {
			_, err := s.PutUser(ctx, 2, "alice", []byte(`{"a":4}`), ver(0))
			return wantIs(err, versioning.ErrConflict)
		}, nil},
		{"wrong shard user", func(ctx context.Context) error {
			_, err := s.PutUser(ctx, 3, "carol", []byte(`{}`), nil)
			return wantIs(err, ErrWrongShard)
		}, nil},
		{"create session", func(ctx context.Context) error {
			_, err := s.CreateSession(ctx, 2, "alice", th, []byte(`{"secret":"x"}`), time.Hour)
			return err
		}, []event{{2, "alice", "session", hexKey, "upsert", 1, ""}}},
		{"session for missing user", func(ctx context.Context) error {
			_, err := s.CreateSession(ctx, 2, "nobody", tokenHash("other"), []byte(`{}`), time.Hour)
			return wantIs(err, ErrUserNotFound)
		}, nil},
		{"touch session", func(ctx context.Context) error {
			_, err := s.TouchSession(ctx, 2, th, time.Hour)
			return err
		}, []event{{2, "alice", "session", hexKey, "upsert", 2, ""}}},
		{"revoke session", func(ctx context.Context) error {
			return s.RevokeSession(ctx, 2, th)
		}, []event{{2, "alice", "session", hexKey, "delete", 3, ""}}},
		{"revoke again", func(ctx context.Context) error {
			return wantIs(s.RevokeSession(ctx, 2, th), versioning.ErrNotFound)
		}, nil},
		{"create item", func(ctx context.Context) error {
			_, err := s.PutItem(ctx, 2, "alice", "notes", "a/b", []byte(`[1, 2]`), ver(0))
			return err
		}, []event{{2, "alice", "item", "notes/a/b", "upsert", 1, `[1, 2]`}}},
		{"upsert item", func(ctx context.Context) error {
			_, err := s.PutItem(ctx, 2, "alice", "notes", "a/b", []byte(`"x"`), nil)
			return err
		}, []event{{2, "alice", "item", "notes/a/b", "upsert", 2, `"x"`}}},
		{"update item", func(ctx context.Context) error {
			_, err := s.PutItem(ctx, 2, "alice", "notes", "a/b", []byte(`{"y":true}`), ver(2))
			return err
		}, []event{{2, "alice", "item", "notes/a/b", "upsert", 3, `{"y": true}`}}},
		{"conflicting item update", func(ctx context.Context) error {
			_, err := s.PutItem(ctx, 2, "alice", "notes", "a/b", []byte(`0`), ver(1))
			return wantIs(err, versioning.ErrConflict)
		}, nil},
		{"conflicting item delete", func(ctx context.Context) error {
			return wantIs(s.DeleteItem(ctx, 2, "alice", "notes", "a/b", ver(1)), versioning.ErrConflict)
		}, nil},
		{"delete item", func(ctx context.Context) error {
			return s.DeleteItem(ctx, 2, "alice", "notes", "a/b", ver(3))
		}, []event{{2, "alice", "item", "notes/a/b", "delete", 4, ""}}},
		{"delete missing item", func(ctx context.Context) error {
			return wantIs(s.DeleteItem(ctx, 2, "alice", "notes", "a/b", nil), versioning.ErrNotFound)
		}, nil},
		{"conflicting user delete", func(ctx context.Context) error {
			_, err := s.DeleteUser(ctx, 2, "alice", ver(1))
			return wantIs(err, versioning.ErrConflict)
		}, nil},
		{"delete user", func(ctx context.Context) error {
			_, err := s.DeleteUser(ctx, 2, "alice", ver(3))
			return err
		}, []event{{2, "alice", "user", "alice", "delete", 4, ""}}},
		{"delete missing user", func(ctx context.Context) error {
			_, err := s.DeleteUser(ctx, 2, "alice", nil)
			return wantIs(err, versioning.ErrNotFound)
		}, nil},
		{"failed statement", func(ctx context.Context) error {
			// Invalid JSON fails the statement after the fence passed.
			_, err := s.PutItem(ctx, 2, "alice", "notes", "bad", []byte(`{`), nil)
			if err == nil {
				return fmt.Errorf("invalid JSON was accepted")
			}
			return nil
		}, nil},
	}
	var seq int64
	for _, st := range steps {
		if err := st.call(ctx); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		var got []event
		got, seq = eventsAfter(t, s, seq)
		if len(got) != len(st.want) {
			t.Fatalf("%s: events %+v, want %+v", st.name, got, st.want)
		}
		for i := range got {
			if got[i] != st.want[i] {
				t.Fatalf("%s: event %+v, want %+v", st.name, got[i], st.want[i])
			}
		}
	}
}

func wantIs(err, target error) error {
	if err == nil {
		return fmt.Errorf("no error, want %v", target)
	}
	if !errors.Is(err, target) {
		return fmt.Errorf("err = %w, want %v", err, target)
	}
	return nil
}
