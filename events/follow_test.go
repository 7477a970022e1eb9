package events

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// xadd appends entries with ticks from..to to a partition's stream.
func xadd(t testing.TB, f *Follower, keys Keys, p int32, from, to int64) {
	t.Helper()
	c := f.Redis
	for tick := from; tick <= to; tick++ {
		u := fmt.Sprint("u", tick%2)
		e := Event{ID: fmt.Sprintf("00000000-0000-4000-8000-%012d", tick), Partition: p, Tick: tick, UserID: u, Entity: EntityUser,
			Key: u, Op: OpUpsert, Version: tick, CommittedAt: time.Now()}
		fv := c.B().Xadd().Key(keys.Stream(p)).Id(entryID(tick)).FieldValue()
		f := e.fields()
		for j := 0; j < len(f); j += 2 {
			fv = fv.FieldValue(f[j], f[j+1])
		}
		if err := c.Do(context.Background(), fv.Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
}

var errEnough = errors.New("enough")

// follow collects events until n arrive.
func follow(t testing.TB, f *Follower, sub Subscription, n int) ([]Event, Cursor, error) {
	t.Helper()
	var (
		got []Event
		cur Cursor
	)
	err := f.Follow(testCtx(t, 30*time.Second), sub, func(e *Event, c Cursor) error {
		got = append(got, *e)
		cur = append(Cursor(nil), c...)
		if len(got) == n {
			return errEnough
		}
		return nil
	}, func(Cursor) error { return nil })
	if errors.Is(err, errEnough) {
		err = nil
	}
	return got, cur, err
}

func TestFollowCursorsAndGaps(t *testing.T) {
	t.Parallel()
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	f := &Follower{Redis: rc, Prefix: prefix, Heartbeat: 50 * time.Millisecond}
	xadd(t, f, keys, 1, 1, 10)
	xadd(t, f, keys, 2, 1, 3)

	// From a cursor: exactly the events after it, filtered to the users.
	got, cur, err := follow(t, f, Subscription{Partitions: []int32{1, 2}, Users: map[string]bool{"u1": true},
		From: Cursor{{1, 4}, {2, 0}}}, 5)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range got {
		ids = append(ids, fmt.Sprint("e", e.Tick))
	}
	if fmt.Sprint(ids) != "[e5 e7 e9 e1 e3]" {
		t.Fatalf("events after the cursor: %v", ids)
	}
	if fmt.Sprint([]Position(cur)) != "[{1 10} {2 3}]" {
		t.Fatalf("cursor after them: %v", cur)
	}

	// A cursor whose next event was trimmed is expired; one just before the
	// oldest entry is not.
	if err := rc.Do(context.Background(), rc.B().Xtrim().Key(keys.Stream(1)).Maxlen().Threshold("3").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := follow(t, f, Subscription{Partitions: []int32{1}, From: Cursor{{1, 6}}}, 1); !errors.Is(err, ErrCursorExpired) {
		t.Fatalf("cursor behind retention: %v", err)
	}
	if got, _, err := follow(t, f, Subscription{Partitions: []int32{1}, From: Cursor{{1, 7}}}, 1); err != nil || got[0].Tick != 8 {
		t.Fatalf("cursor at the edge: %v, %v", got, err)
	}
	// A cursor into a stream that does not exist (Redis lost it) is expired.
	if _, _, err := follow(t, f, Subscription{Partitions: []int32{3}, From: Cursor{{3, 5}}}, 1); !errors.Is(err, ErrCursorExpired) {
		t.Fatalf("cursor into a missing stream: %v", err)
	}

	// From now on a missing stream: the first event may have any tick.
	started := make(chan struct{}, 1)
	done := make(chan []Event, 1)
	go func() {
		var got []Event
		err := f.Follow(testCtx(t, 30*time.Second), Subscription{Partitions: []int32{4}}, func(e *Event, _ Cursor) error {
			if got = append(got, *e); len(got) == 2 {
				return errEnough
			}
			return nil
		}, func(Cursor) error {
			select {
			case started <- struct{}{}:
			default:
			}
			return nil
		})
		if !errors.Is(err, errEnough) {
			t.Error(err)
		}
		done <- got
	}()
	<-started // a heartbeat: the watch has resolved "now"
	xadd(t, f, keys, 4, 40, 41)
	if got := <-done; len(got) != 2 || got[0].Tick != 40 {
		t.Fatalf("from now on a new stream: %v", got)
	}
}

// A watch wider than PerEventCursorStreams gets a cursor with the last event
// of each read only, and that cursor resumes exactly after the read.
func TestWideFollowCursorPerRead(t *testing.T) {
	t.Parallel()
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	f := &Follower{Redis: rc, Prefix: prefix, Heartbeat: 50 * time.Millisecond}
	xadd(t, f, keys, 3, 1, 5)
	xadd(t, f, keys, 70, 1, 5)
	sub := Subscription{}
	for p := range int32(PerEventCursorStreams + 36) {
		sub.Partitions = append(sub.Partitions, p)
		sub.From = append(sub.From, Position{Stream: p})
	}
	var cursors []Cursor
	err := f.Follow(testCtx(t, 30*time.Second), sub, func(e *Event, c Cursor) error {
		cursors = append(cursors, append(Cursor(nil), c...))
		if len(cursors) == 10 {
			return errEnough
		}
		return nil
	}, func(Cursor) error { return nil })
	if !errors.Is(err, errEnough) {
		t.Fatal(err)
	}
	// One read holds all ten (each stream may return up to 10).
	for i, c := range cursors[:9] {
		if c != nil {
			t.Fatalf("event %d of the read carries a cursor", i)
		}
	}
	last := cursors[9]
	if tick, _ := last.Tick(3); tick != 5 {
		t.Fatalf("the read's cursor has tick %d in stream 3, want 5", tick)
	}
	if tick, _ := last.Tick(70); tick != 5 {
		t.Fatalf("the read's cursor has tick %d in stream 70, want 5", tick)
	}
	xadd(t, f, keys, 70, 6, 6)
	sub.From = last
	got, _, err := follow(t, f, sub, 1)
	if err != nil || got[0].Tick != 6 || got[0].Partition != 70 {
		t.Fatalf("resumed from the read's cursor: %v, %v", got, err)
	}
}
