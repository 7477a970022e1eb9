package shards

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

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

// ReadOutbox reads the undelivered rows of a (partition, tick) range in
// order, up to a limit, leaving out payloads over the cap; MarkDelivered
// moves a partition's delivered tick, and the rows stay for ReadRetained.
func TestReadAndMarkOutbox(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2, 3)
	ctx := testCtx(t)
	big := `{"pad": "` + strings.Repeat("x", 200) + `"}`
	for _, u := range []struct {
		p       int32
		id, doc string
	}{{1, "a", `{"n": 1}`}, {2, "b", `{"n": 2}`}, {2, "c", big}, {3, "d", `{"n": 4}`}} {
		if _, err := s.PutUser(ctx, u.p, u.id, []byte(u.doc), nil); err != nil {
			t.Fatal(err)
		}
	}
	conn := relayConn(t, s)
	all := func(t *testing.T, maxPayload int) []OutboxRow {
		t.Helper()
		rows, err := ReadOutbox(ctx, conn, OutboxPos{-1, 0}, OutboxPos{math.MaxInt32, math.MaxInt64}, 10, maxPayload, nil)
		if err != nil {
			t.Fatal(err)
		}
		return rows
	}

	rows := all(t, 100)
	var got []string
	for _, r := range rows {
		got = append(got, r.UserID)
		if r.EventID == "" || r.Tick < 1 || r.Entity != "user" || r.Op != "upsert" || r.Version != 1 || r.CommittedAt.IsZero() {
			t.Errorf("row %+v: fields missing", r)
		}
		if omitted := r.UserID == "c"; r.Omitted != omitted || (r.Payload == nil) != omitted {
			t.Errorf("row of %s: payload %q, omitted %v", r.UserID, r.Payload, r.Omitted)
		}
	}
	if strings.Join(got, ",") != "a,b,c,d" {
		t.Fatalf("rows of %v, want a,b,c,d in (partition, tick) order", got)
	}
	if string(rows[0].Payload) != `{"n": 1}` {
		t.Errorf("payload %q, want jsonb's text {\"n\": 1}", rows[0].Payload)
	}
	for _, r := range all(t, -1) {
		if r.Payload != nil || !r.Omitted {
			t.Errorf("with no payloads: row of %s has payload %q, omitted %v", r.UserID, r.Payload, r.Omitted)
		}
	}

	// After b and before d: only c, appended to what dst held.
	b, d := rows[1], rows[3]
	mid, err := ReadOutbox(ctx, conn, OutboxPos{b.Partition, b.Tick}, OutboxPos{d.Partition, d.Tick}, 10, 100, rows[:1])
	if err != nil {
		t.Fatal(err)
	}
	if len(mid) != 2 || mid[0].UserID != "a" || mid[1].UserID != "c" {
		t.Fatalf("range read: %+v", mid)
	}
	if one, err := ReadOutbox(ctx, conn, OutboxPos{-1, 0}, OutboxPos{math.MaxInt32, math.MaxInt64}, 1, 100, nil); err != nil || len(one) != 1 {
		t.Fatalf("limit 1: %d rows, %v", len(one), err)
	}

	// b delivered (c, later in its partition, not) and d: the reads pass
	// over them, though they stay in the outbox, and a partition's
	// delivered tick never goes down.
	if err := MarkDelivered(ctx, conn, []int32{b.Partition, d.Partition}, []int64{b.Tick, d.Tick}); err != nil {
		t.Fatal(err)
	}
	if err := MarkDelivered(ctx, conn, []int32{d.Partition}, []int64{d.Tick - 1}); err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	for _, r := range all(t, 100) {
		got = append(got, r.UserID)
	}
	if strings.Join(got, ",") != "a,c" {
		t.Fatalf("after delivering b and d: %v", got)
	}
	marks, err := DeliveredTicks(ctx, conn)
	if err != nil || len(marks) != 2 || marks[b.Partition] != b.Tick || marks[d.Partition] != d.Tick {
		t.Fatalf("delivered ticks %v, %v", marks, err)
	}
	kept, err := ReadRetained(ctx, conn, b.Partition, 0, math.MaxInt64, 10, 100, nil)
	if err != nil || len(kept) != 2 || kept[0].UserID != "b" || kept[1].UserID != "c" {
		t.Fatalf("retained rows of partition %d: %+v, %v", b.Partition, kept, err)
	}
}

// A delivered mark never re-creates the row of a partition whose clock row
// is gone or being deleted (a cancelled move's cleanup), and never waits
// for that deletion.
func TestMarkDeliveredSkipsLeavingPartitions(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2, 3)
	ctx := testCtx(t)
	for _, p := range []int32{1, 2} {
		if _, err := s.PutUser(ctx, p, "u", []byte(`{}`), nil); err != nil {
			t.Fatal(err)
		}
	}
	conn := relayConn(t, s)

	// Partition 2's clock row is being deleted by a transaction that has
	// not committed; partition 3 never had one.
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `DELETE FROM outbox_clock WHERE partition = 2`); err != nil {
		t.Fatal(err)
	}
	mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := MarkDelivered(mctx, conn, []int32{1, 2, 3}, []int64{1, 1, 1}); err != nil {
		t.Fatalf("mark while a clock row is being deleted: %v", err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	marks, err := DeliveredTicks(ctx, conn)
	if err != nil || len(marks) != 1 || marks[1] != 1 {
		t.Fatalf("delivered ticks %v, %v; want only partition 1's", marks, err)
	}
	// After the deletion committed, too.
	if err := MarkDelivered(ctx, conn, []int32{2}, []int64{1}); err != nil {
		t.Fatal(err)
	}
	if marks, _ := DeliveredTicks(ctx, conn); len(marks) != 1 {
		t.Fatalf("delivered ticks %v after the clock row was deleted", marks)
	}
}

// relayConn is a connection of s's pool, as the outbox functions take one
// (a relay's), given back when the test ends.
func relayConn(t *testing.T, s *Shard) *pgx.Conn {
	t.Helper()
	pc, err := s.pool.Acquire(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pc.Release)
	return pc.Conn()
}
