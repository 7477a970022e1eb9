package shards

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/pglock"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/internal/versioning"
)

// newSessions creates user "u<p>" in partition p and n sessions for it,
// live for an hour, and returns their token hashes.
func newSessions(t testing.TB, s *Shard, p int32, n int) [][]byte {
	t.Helper()
	ctx := testCtx(t)
	user := fmt.Sprintf("u%d", p)
	if _, err := s.PutUser(ctx, p, user, []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for i := range n {
		th := tokenHash(fmt.Sprintf("%d.%s.%d", p, testenv.RandomHex(4), i))
		if _, err := s.CreateSession(ctx, p, user, th, []byte(`{"secret":"s"}`), time.Hour); err != nil {
			t.Fatal(err)
		}
		out = append(out, th)
	}
	return out
}

// expire makes sessions expired, without an event (as time passing would).
func expire(t testing.TB, s *Shard, hashes [][]byte) {
	t.Helper()
	exec(t, s, `UPDATE sessions SET expires_at = now() - interval '1 second' WHERE token_hash = ANY($1)`, hashes)
}

// sessionHashes returns the hex token hashes of every session row, sorted.
func sessionHashes(t testing.TB, s *Shard) []string {
	t.Helper()
	rows, err := s.pool.Query(testCtx(t), `SELECT encode(token_hash, 'hex') FROM sessions ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var h string
		if err := rows.Scan(&h); err != nil {
			t.Fatal(err)
		}
		out = append(out, h)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func hexes(hashes ...[][]byte) []string {
	var out []string
	for _, hs := range hashes {
		for _, h := range hs {
			out = append(out, fmt.Sprintf("%x", h))
		}
	}
	sort.Strings(out)
	return out
}

func equalStrings(a, b []string) bool {
	return fmt.Sprint(a) == fmt.Sprint(b)
}

// Expired sessions go, each with a delete event one version past its row;
// live ones stay, and a second sweep finds nothing.
func TestSweepExpiredSessions(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2)
	ctx := testCtx(t)
	live1, dead1 := newSessions(t, s, 1, 2), newSessions(t, s, 1, 3)
	live2, dead2 := newSessions(t, s, 2, 1), newSessions(t, s, 2, 2)
	// One expired session was touched first: its delete is version 3.
	if _, err := s.TouchSession(ctx, 2, dead2[0], time.Hour); err != nil {
		t.Fatal(err)
	}
	expire(t, s, append(append([][]byte{}, dead1...), dead2...))
	_, seq := eventsAfter(t, s, 0)

	n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit)
	if err != nil || n != 5 {
		t.Fatalf("SweepExpiredSessions = %d, %v; want 5", n, err)
	}
	if got, want := sessionHashes(t, s), hexes(live1, live2); !equalStrings(got, want) {
		t.Fatalf("sessions left %v, want the live ones %v", got, want)
	}
	evs, seq := eventsAfter(t, s, seq)
	var want []event
	for _, th := range dead1 {
		want = append(want, event{1, "u1", "session", fmt.Sprintf("%x", th), "delete", 2, ""})
	}
	want = append(want, event{2, "u2", "session", fmt.Sprintf("%x", dead2[0]), "delete", 3, ""})
	want = append(want, event{2, "u2", "session", fmt.Sprintf("%x", dead2[1]), "delete", 2, ""})
	sortEvents(evs)
	sortEvents(want)
	if fmt.Sprint(evs) != fmt.Sprint(want) {
		t.Fatalf("events\n%+v\nwant\n%+v", evs, want)
	}

	for _, th := range dead1 {
		_, err := s.GetSession(ctx, 1, th)
		wantErr(t, err, versioning.ErrNotFound)
	}
	if _, err := s.GetSession(ctx, 1, live1[0]); err != nil {
		t.Fatalf("live session after the sweep: %v", err)
	}
	if n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit); err != nil || n != 0 {
		t.Fatalf("second sweep = %d, %v; want 0", n, err)
	}
	if evs, _ := eventsAfter(t, s, seq); len(evs) != 0 {
		t.Fatalf("second sweep wrote events %+v", evs)
	}
}

func sortEvents(evs []event) {
	sort.Slice(evs, func(i, j int) bool {
		if evs[i].Partition != evs[j].Partition {
			return evs[i].Partition < evs[j].Partition
		}
		return evs[i].Key < evs[j].Key
	})
}

// Only owned partitions are swept: frozen and moved ones, and sessions of a
// partition the shard does not list, are left as they are.
func TestSweepOnlyOwnedPartitions(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2, 3)
	ctx := testCtx(t)
	owned, frozen, moved := newSessions(t, s, 1, 2), newSessions(t, s, 2, 2), newSessions(t, s, 3, 2)
	exec(t, s, `INSERT INTO sessions (partition, token_hash, user_id, data, expires_at, version)
		VALUES (4, $1, 'u4', '{}', now() - interval '1 hour', 1)`, tokenHash("4.stray"))
	expire(t, s, append(append(append([][]byte{}, owned...), frozen...), moved...))
	if err := s.SetOwnership(ctx, []int32{2}, Frozen); err != nil {
		t.Fatal(err)
	}
	if err := s.SetOwnership(ctx, []int32{3}, Moved); err != nil {
		t.Fatal(err)
	}
	_, seq := eventsAfter(t, s, 0)

	n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit)
	if err != nil || n != 2 {
		t.Fatalf("SweepExpiredSessions = %d, %v; want 2", n, err)
	}
	if got, want := sessionHashes(t, s), hexes(frozen, moved, [][]byte{tokenHash("4.stray")}); !equalStrings(got, want) {
		t.Fatalf("sessions left %v, want %v", got, want)
	}
	evs, _ := eventsAfter(t, s, seq)
	if len(evs) != 2 || evs[0].Partition != 1 || evs[1].Partition != 1 {
		t.Fatalf("events %+v, want two of partition 1", evs)
	}
}

// A batch deletes at most limit sessions; batches continue where the last
// stopped, and a short one means the sweep is done.
func TestSweepLimit(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2)
	ctx := testCtx(t)
	dead := append(newSessions(t, s, 1, 13), newSessions(t, s, 2, 12)...)
	expire(t, s, dead)
	_, seq := eventsAfter(t, s, 0)
	for i, want := range []int{10, 10, 5, 0} {
		n, err := s.SweepExpiredSessions(ctx, 10)
		if err != nil || n != want {
			t.Fatalf("batch %d = %d, %v; want %d", i, n, err, want)
		}
		var evs []event
		evs, seq = eventsAfter(t, s, seq)
		if len(evs) != want {
			t.Fatalf("batch %d wrote %d events, want %d", i, len(evs), want)
		}
	}
	if c := countRows(t, s); c.Sessions != 0 {
		t.Fatalf("%d sessions left", c.Sessions)
	}
	for _, limit := range []int{0, -1, MaxSweepLimit + 1} {
		if _, err := s.SweepExpiredSessions(ctx, limit); err == nil {
			t.Errorf("limit %d accepted", limit)
		}
	}
}

// While another transaction holds the shard's sweep lock, a sweep returns 0
// at once and deletes nothing.
func TestSweepLockHeldElsewhere(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1)
	ctx := testCtx(t)
	expire(t, s, newSessions(t, s, 1, 3))
	hold, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, `SELECT pg_advisory_xact_lock($1, $2)`, pglock.ClassMaintenance, pglock.KeySweep); err != nil {
		t.Fatal(err)
	}
	before := countRows(t, s)
	if n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit); err != nil || n != 0 {
		t.Fatalf("sweep while the lock is held = %d, %v; want 0, nil", n, err)
	}
	if after := countRows(t, s); after != before {
		t.Fatalf("sweep without the lock wrote: %+v → %+v", before, after)
	}
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit); err != nil || n != 3 {
		t.Fatalf("sweep after the lock was released = %d, %v; want 3", n, err)
	}
}

// A second sweeper, started while one is mid-batch (waiting for a
// partition's outbox clock), does nothing and reports no error; the first
// finishes the batch. Sweepers started together delete each session once.
func TestConcurrentSweepers(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2)
	ctx := testCtx(t)
	dead := append(newSessions(t, s, 1, 4), newSessions(t, s, 2, 4)...)
	expire(t, s, dead)
	_, seq := eventsAfter(t, s, 0)

	hold, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, `SELECT tick FROM outbox_clock WHERE partition = 2 FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	type result struct {
		n   int
		err error
	}
	first := make(chan result, 1)
	go func() { n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit); first <- result{n, err} }()
	testenv.WaitForLockWaiters(t, ctx, s.pool, 1)
	if n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit); err != nil || n != 0 {
		t.Fatalf("second sweeper = %d, %v; want 0, nil", n, err)
	}
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if r := <-first; r.err != nil || r.n != len(dead) {
		t.Fatalf("first sweeper = %d, %v; want %d", r.n, r.err, len(dead))
	}

	more := append(newSessions(t, s, 1, 30), newSessions(t, s, 2, 30)...)
	expire(t, s, more)
	_, seq = eventsAfter(t, s, seq)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		total int
	)
	for range 6 {
		wg.Go(func() {
			for {
				n, err := s.SweepExpiredSessions(ctx, 7)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				total += n
				mu.Unlock()
				if n == 0 {
					return
				}
			}
		})
	}
	wg.Wait()
	// A sweeper that lost the lock stops early; one more sweep catches up.
	for {
		n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		total += n
	}
	if total != len(more) {
		t.Fatalf("sweepers deleted %d sessions in all, want %d", total, len(more))
	}
	evs, _ := eventsAfter(t, s, seq)
	keys := map[string]bool{}
	for _, e := range evs {
		if keys[e.Key] {
			t.Fatalf("two events for session %s", e.Key)
		}
		keys[e.Key] = true
	}
	if len(keys) != len(more) {
		t.Fatalf("%d delete events, want %d", len(keys), len(more))
	}
}

// A sweep waits for no session or ownership row another transaction holds:
// it passes over them and takes them in a later sweep.
func TestSweepSkipsHeldRows(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2)
	ctx := testCtx(t)
	held, free := newSessions(t, s, 1, 2), newSessions(t, s, 1, 2)
	freezing := newSessions(t, s, 2, 2)
	expire(t, s, append(append(append([][]byte{}, held...), free...), freezing...))

	hold, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	// A Revoke or Touch holding the session rows, and a mover about to
	// freeze partition 2.
	if _, err := hold.Exec(ctx, `SELECT 1 FROM sessions WHERE token_hash = ANY($1) FOR UPDATE`, held); err != nil {
		t.Fatal(err)
	}
	if _, err := hold.Exec(ctx, `SELECT 1 FROM ownership WHERE partition = 2 FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	n, err := s.SweepExpiredSessions(short, DefaultSweepLimit)
	if err != nil || n != len(free) {
		t.Fatalf("sweep beside held rows = %d, %v; want %d", n, err, len(free))
	}
	if got, want := sessionHashes(t, s), hexes(held, freezing); !equalStrings(got, want) {
		t.Fatalf("sessions left %v, want %v", got, want)
	}
	if err := hold.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit); err != nil || n != len(held)+len(freezing) {
		t.Fatalf("sweep after release = %d, %v; want %d", n, err, len(held)+len(freezing))
	}
}

// Sweeps spanning many partitions run beside single-partition writers of
// those partitions without deadlocks or other errors.
func TestSweepBesideWriters(t *testing.T) {
	t.Parallel()
	const parts = 8
	var owned []int32
	for p := range int32(parts) {
		owned = append(owned, p)
	}
	s := newShard(t, owned...)
	ctx := testCtx(t)
	for _, p := range owned {
		newSessions(t, s, p, 0) // the users
	}
	deadline := time.Now().Add(2 * time.Second)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for i := 0; time.Now().Before(deadline); i++ {
				p := int32(rng.IntN(parts))
				user := fmt.Sprintf("u%d", p)
				th := tokenHash(fmt.Sprintf("%d.w%d.%d", p, w, i))
				// Sessions that expire almost at once, so the sweeps race
				// the touches and revokes for them.
				if _, err := s.CreateSession(ctx, p, user, th, []byte(`{}`), time.Millisecond*time.Duration(1+rng.IntN(20))); err != nil {
					t.Error(err)
					return
				}
				var err error
				switch rng.IntN(3) {
				case 0:
					_, err = s.TouchSession(ctx, p, th, time.Millisecond)
				case 1:
					err = s.RevokeSession(ctx, p, th)
				default:
					_, err = s.PutUser(ctx, p, user, []byte(`{}`), nil)
				}
				if err != nil && !errors.Is(err, versioning.ErrNotFound) {
					t.Error(err)
					return
				}
			}
		})
	}
	for range 2 {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				if _, err := s.SweepExpiredSessions(ctx, 50); err != nil {
					t.Errorf("sweep: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	exec(t, s, `UPDATE sessions SET expires_at = now() - interval '1 second'`)
	for {
		n, err := s.SweepExpiredSessions(ctx, DefaultSweepLimit)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
	}
	if c := countRows(t, s); c.Sessions != 0 {
		t.Fatalf("%d sessions left after the last sweep", c.Sessions)
	}
	// Each session has exactly one delete event: from its revoke or a sweep.
	var dup int
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM (SELECT key FROM outbox
		WHERE entity = 'session' AND op = 'delete' GROUP BY key HAVING count(*) > 1) AS d`).Scan(&dup); err != nil {
		t.Fatal(err)
	}
	if dup != 0 {
		t.Fatalf("%d sessions have more than one delete event", dup)
	}
	var undeleted int
	if err := s.pool.QueryRow(ctx, `SELECT count(DISTINCT key) FROM outbox WHERE entity = 'session'
		AND key NOT IN (SELECT key FROM outbox WHERE entity = 'session' AND op = 'delete')`).Scan(&undeleted); err != nil {
		t.Fatal(err)
	}
	if undeleted != 0 {
		t.Fatalf("%d sessions are gone without a delete event", undeleted)
	}
}
