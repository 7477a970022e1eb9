package cache

import (
	"context"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
)

// readUntilMemoHit reads k on c until a read answers from the memo.
func readUntilMemoHit(t *testing.T, c *Cache, k string, s *source) Entry {
	t.Helper()
	before := c.Stats().MemoHits
	// Time, not tries: on a loaded machine a Redis timeout can make the
	// cache distrust memory for a while (FloorWindow).
	for giveUp := time.Now().Add(10 * time.Second); ; {
		e := mustGet(t, c, k, s)
		if c.Stats().MemoHits > before {
			return e
		}
		if time.Now().After(giveUp) {
			t.Fatalf("never a memo hit: %+v", c.Stats())
		}
	}
}

// Another process's write reaches a memo entry through Redis's
// invalidation push: after the push, the old value is not served.
func TestMemoDropsOnInvalidation(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	pushed := make(chan string, 16)
	a := newTestCache(t, addr, prefix, Options{OnInvalidation: func(k string) {
		select {
		case pushed <- k:
		default:
		}
	}})
	b := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	k := a.SessionKey([]byte("0123456789abcdef0123456789abcdef"))
	s.set(k, `"old"`)
	for round := range 3 {
		if e := readUntilMemoHit(t, a, k, s); e.Value == `"new"` {
			t.Fatalf("round %d: memo hit %+v before the write", round, e)
		}
		for len(pushed) > 0 {
			<-pushed
		}
		v := s.set(k, `"new"`)
		if err := b.Invalidate(context.Background(), k); err != nil {
			t.Fatal(err)
		}
		select {
		case <-pushed:
		case <-time.After(10 * time.Second):
			t.Fatal("no invalidation push for the key")
		}
		if e := mustGet(t, a, k, s); e.Version != v {
			t.Fatalf("round %d: after the push read version %d, want %d (%+v)", round, e.Version, v, a.Stats())
		}
		s.set(k, `"old"`)
		if err := b.Invalidate(context.Background(), k); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// This process's own write never lets a memo entry from before it answer,
// even while the invalidation push is not there (here: never comes).
func TestMemoHonoursOwnWriteFloor(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	k := c.ConfigKey("ns", "floor")
	s.set(k, `1`)
	readUntilMemoHit(t, c, k, s)
	// What Invalidate does before and after its delete, without the
	// delete: Redis keeps the value and pushes nothing.
	c.markFloors([]string{k})
	st := c.Stats()
	mustGet(t, c, k, s)
	after := c.Stats()
	if after.MemoHits != st.MemoHits || after.Predated != st.Predated+1 {
		t.Fatalf("read after a write: memo hits %d → %d, predated %d → %d; want the copy checked against Redis",
			st.MemoHits, after.MemoHits, st.Predated, after.Predated)
	}
	// Redis held the same bytes: the copy may answer again.
	readUntilMemoHit(t, c, k, s)
}

// A dropped connection (rueidis reports nil) empties the memo.
func TestMemoDroppedWithConnection(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	c := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	k := c.ConfigKey("ns", "conn")
	s.set(k, `1`)
	readUntilMemoHit(t, c, k, s)
	c.opts.Invalidations.receive(nil)
	if _, ok := c.memo.get(k); ok {
		t.Fatal("memo entry kept after the connection dropped")
	}
}

// A put that read its generation before an invalidation of its key
// installs nothing: its value may be the one invalidated.
func TestMemoPutRacingInvalidation(t *testing.T) {
	m := newMemo()
	e := memoEntry{e: Entry{Found: true, Value: "old"}, pxat: time.Now().Add(time.Minute).UnixMilli()}
	for _, inv := range [][]string{{"k"}, nil, {"other", "k"}} {
		g := m.gen("k")
		m.invalidate(inv)
		m.put("k", g, e, 10)
		if _, ok := m.get("k"); ok {
			t.Fatalf("put after invalidate(%q) installed its entry", inv)
		}
	}
	g := m.gen("k")
	m.put("k", g, e, 10)
	if _, ok := m.get("k"); !ok {
		t.Fatal("put with no invalidation since installed nothing")
	}
}
