package shards

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/shardgate/shardgate/internal/versioning"
)

func TestUserRoundTrip(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1)
	ctx := testCtx(t)

	profiles := []struct {
		name, json string
	}{
		{"empty object", `{}`},
		{"whitespace and key order", `{ "b" : 2,   "a":[1, 2 ,3] }`},
		{"nested", `{"name":{"first":"Ada","last":"Lovelace"},"tags":["x"],"n":null,"ok":true}`},
		{"unicode and escapes", `{"city":"Zürich","emoji":"🙂","q":"a\"b\\c\n"}`},
		{"big numbers", `{"n":12345678901234567890,"f":1.5e-7}`},
	}
	for i, p := range profiles {
		t.Run(p.name, func(t *testing.T) {
			id := fmt.Sprintf("user-%d", i)
			v, err := s.PutUser(ctx, 1, id, []byte(p.json), nil)
			if err != nil || v != 1 {
				t.Fatalf("PutUser = %d, %v; want 1, nil", v, err)
			}
			u, err := s.GetUser(ctx, 1, id)
			if err != nil {
				t.Fatalf("GetUser: %v", err)
			}
			if u.UserID != id || u.Partition != 1 || u.Version != 1 {
				t.Fatalf("GetUser = %+v", u)
			}
			if !jsonEqual(t, u.Profile, []byte(p.json)) {
				t.Fatalf("profile = %s, want %s", u.Profile, p.json)
			}
			if u.CreatedAt.IsZero() || u.UpdatedAt.Before(u.CreatedAt) {
				t.Fatalf("timestamps: created %v updated %v", u.CreatedAt, u.UpdatedAt)
			}

			// An unconditional put of an existing user bumps the version.
			v, err = s.PutUser(ctx, 1, id, []byte(`{"again":true}`), nil)
			if err != nil || v != 2 {
				t.Fatalf("second PutUser = %d, %v; want 2, nil", v, err)
			}
			u2, err := s.GetUser(ctx, 1, id)
			if err != nil || u2.Version != 2 || !jsonEqual(t, u2.Profile, []byte(`{"again":true}`)) {
				t.Fatalf("GetUser after update = %+v, %v", u2, err)
			}
			if !u2.CreatedAt.Equal(u.CreatedAt) || u2.UpdatedAt.Before(u.UpdatedAt) {
				t.Fatalf("timestamps after update: %v/%v then %v/%v", u.CreatedAt, u.UpdatedAt, u2.CreatedAt, u2.UpdatedAt)
			}
		})
	}

	if _, err := s.GetUser(ctx, 1, "nobody"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("GetUser(missing) err = %v, want versioning.ErrNotFound", err)
	}
	if _, err := s.PutUser(ctx, 1, "bad", []byte(`{not json`), nil); err == nil {
		t.Fatal("PutUser accepted invalid JSON")
	}
}

func TestPutUserExpected(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1)
	ctx := testCtx(t)
	// "existing" is at version 3 before every case.
	profile := []byte(`{"v":1}`)

	tests := []struct {
		name        string
		user        string
		expected    *int64
		wantVersion int64 // 0: expect a conflict
		wantCurrent int64
	}{
		{"create missing", "new", ver(0), 1, 0},
		{"create existing", "existing", ver(0), 0, 3},
		{"update at version", "existing", ver(3), 4, 0},
		{"update stale version", "existing", ver(2), 0, 3},
		{"update future version", "existing", ver(9), 0, 3},
		{"update missing", "new", ver(1), 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Tombstones go too: each case starts from keys that never existed.
			exec(t, s, `TRUNCATE users, outbox, user_tombstones`)
			for range 3 {
				if _, err := s.PutUser(ctx, 1, "existing", profile, nil); err != nil {
					t.Fatal(err)
				}
			}
			before := countRows(t, s)

			v, err := s.PutUser(ctx, 1, tc.user, []byte(`{"v":2}`), tc.expected)
			if tc.wantVersion == 0 {
				wantConflict(t, err, *tc.expected, tc.wantCurrent)
				if after := countRows(t, s); after != before {
					t.Fatalf("a conflict wrote rows: %+v → %+v", before, after)
				}
				if tc.user == "existing" {
					u, err := s.GetUser(ctx, 1, "existing")
					if err != nil || u.Version != 3 || !jsonEqual(t, u.Profile, profile) {
						t.Fatalf("user changed by a conflict: %+v, %v", u, err)
					}
				}
				return
			}
			if err != nil || v != tc.wantVersion {
				t.Fatalf("PutUser = %d, %v; want %d", v, err, tc.wantVersion)
			}
			u, err := s.GetUser(ctx, 1, tc.user)
			if err != nil || u.Version != tc.wantVersion || !jsonEqual(t, u.Profile, []byte(`{"v":2}`)) {
				t.Fatalf("GetUser = %+v, %v", u, err)
			}
		})
	}

	if _, err := s.PutUser(ctx, 1, "existing", profile, ver(-1)); err == nil || errors.Is(err, versioning.ErrConflict) {
		t.Fatalf("negative expected version: err = %v, want a plain error", err)
	}
}

func TestDeleteUser(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1, 2)
	ctx := testCtx(t)

	// alice and bob share partition 1; carol has the same user ID in
	// partition 2 and must be untouched.
	setup := func(t *testing.T) {
		// Tombstones go too: each case starts from keys that never existed.
		exec(t, s, `TRUNCATE users, sessions, items, outbox, user_tombstones, item_tombstones`)
		for _, u := range []struct {
			p  int32
			id string
		}{{1, "alice"}, {1, "bob"}, {2, "alice"}} {
			if _, err := s.PutUser(ctx, u.p, u.id, []byte(`{}`), nil); err != nil {
				t.Fatal(err)
			}
			for i := range 3 {
				tok := fmt.Sprintf("%d-%s-%d", u.p, u.id, i)
				if _, err := s.CreateSession(ctx, u.p, u.id, tokenHash(tok), []byte(`{}`), 3600e9); err != nil {
					t.Fatal(err)
				}
				if _, err := s.PutItem(ctx, u.p, u.id, "notes", fmt.Sprint(i), []byte(`1`), nil); err != nil {
					t.Fatal(err)
				}
			}
		}
		// alice (partition 1) is at version 2, has an extra item, and one
		// expired session, which goes too.
		if _, err := s.PutUser(ctx, 1, "alice", []byte(`{"x":1}`), nil); err != nil {
			t.Fatal(err)
		}
		if _, err := s.PutItem(ctx, 1, "alice", "photos", "p1", []byte(`2`), nil); err != nil {
			t.Fatal(err)
		}
		exec(t, s, `UPDATE sessions SET expires_at = now() - interval '1 minute' WHERE token_hash = $1`, tokenHash("1-alice-0"))
	}

	tests := []struct {
		name     string
		expected *int64
		wantErr  error // nil: deleted
		current  int64 // for conflicts
	}{
		{"unconditional", nil, nil, 0},
		{"at version", ver(2), nil, 0},
		{"stale version", ver(1), versioning.ErrConflict, 2},
		{"must not exist", ver(0), versioning.ErrConflict, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			setup(t)
			before := countRows(t, s)
			_, seq := eventsAfter(t, s, 0)

			res, err := s.DeleteUser(ctx, 1, "alice", tc.expected)
			if tc.wantErr != nil {
				wantConflict(t, err, *tc.expected, tc.current)
				if after := countRows(t, s); after != before {
					t.Fatalf("a conflict changed rows: %+v → %+v", before, after)
				}
				return
			}
			if err != nil {
				t.Fatalf("DeleteUser: %v", err)
			}
			if res.Sessions != 3 || res.Items != 4 {
				t.Fatalf("DeleteUser = %+v, want 3 sessions, 4 items", res)
			}
			var hashes []string
			for _, h := range res.SessionHashes {
				hashes = append(hashes, string(h))
			}
			slices.Sort(hashes)
			var wantHashes []string
			for i := range 3 {
				wantHashes = append(wantHashes, string(tokenHash(fmt.Sprintf("1-alice-%d", i))))
			}
			slices.Sort(wantHashes)
			if !slices.Equal(hashes, wantHashes) {
				t.Fatalf("DeleteUser session hashes = %x, want alice's three in partition 1", res.SessionHashes)
			}
			after := countRows(t, s)
			want := rowCounts{Users: before.Users - 1, Sessions: before.Sessions - 3, Items: before.Items - 4, Outbox: before.Outbox + 8}
			if after != want {
				t.Fatalf("rows after delete = %+v, want %+v", after, want)
			}
			if _, err := s.GetUser(ctx, 1, "alice"); !errors.Is(err, versioning.ErrNotFound) {
				t.Fatalf("GetUser after delete: %v", err)
			}
			// bob and the other partition's alice keep everything.
			for _, u := range []struct {
				p  int32
				id string
			}{{1, "bob"}, {2, "alice"}} {
				ss, err := s.ListSessions(ctx, u.p, u.id, SessionKey{}, MaxListSessions)
				if err != nil || len(ss) != 3 {
					t.Fatalf("%d/%s sessions = %d, %v; want 3", u.p, u.id, len(ss), err)
				}
				items, err := s.ListItems(ctx, u.p, u.id, "notes", "", "", 10)
				if err != nil || len(items) != 3 {
					t.Fatalf("%d/%s items = %d, %v; want 3", u.p, u.id, len(items), err)
				}
			}

			evs, _ := eventsAfter(t, s, seq)
			got := map[string]event{}
			for _, e := range evs {
				got[e.Entity+" "+e.Key] = e
			}
			wantEv := []event{
				{1, "alice", "user", "alice", "delete", 3, ""},
				{1, "alice", "item", "notes/0", "delete", 2, ""},
				{1, "alice", "item", "notes/1", "delete", 2, ""},
				{1, "alice", "item", "notes/2", "delete", 2, ""},
				{1, "alice", "item", "photos/p1", "delete", 2, ""},
			}
			for i := range 3 {
				wantEv = append(wantEv, event{1, "alice", "session", fmt.Sprintf("%x", tokenHash(fmt.Sprintf("1-alice-%d", i))), "delete", 2, ""})
			}
			if len(evs) != len(wantEv) {
				t.Fatalf("events = %+v, want %+v", evs, wantEv)
			}
			for _, w := range wantEv {
				if got[w.Entity+" "+w.Key] != w {
					t.Errorf("event %s %s = %+v, want %+v", w.Entity, w.Key, got[w.Entity+" "+w.Key], w)
				}
			}
		})
	}

	t.Run("missing", func(t *testing.T) {
		setup(t)
		before := countRows(t, s)
		for _, exp := range []*int64{nil, ver(0)} {
			if _, err := s.DeleteUser(ctx, 1, "nobody", exp); !errors.Is(err, versioning.ErrNotFound) {
				t.Fatalf("DeleteUser(missing, %v) err = %v, want versioning.ErrNotFound", exp, err)
			}
		}
		_, err := s.DeleteUser(ctx, 1, "nobody", ver(4))
		wantConflict(t, err, 4, 0)
		if after := countRows(t, s); after != before {
			t.Fatalf("rows changed: %+v → %+v", before, after)
		}
	})
}

// TestPutUserConcurrent has 20 writers race compare-and-set updates of one
// user: every version must be won exactly once, and no update may be lost.
func TestPutUserConcurrent(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1)
	ctx := testCtx(t)
	if _, err := s.PutUser(ctx, 1, "hot", []byte(`{"by":"create"}`), ver(0)); err != nil {
		t.Fatal(err)
	}

	const writers, attempts = 20, 15
	var (
		mu        sync.Mutex
		winner    = map[int64]string{1: "create"} // version → profile marker
		successes int
		conflicts int
		wg        sync.WaitGroup
		errs      = make(chan error, writers)
	)
	for w := range writers {
		wg.Go(func() {
			for a := range attempts {
				u, err := s.GetUser(ctx, 1, "hot")
				if err != nil {
					errs <- err
					return
				}
				marker := fmt.Sprintf("w%d-a%d", w, a)
				v, err := s.PutUser(ctx, 1, "hot", fmt.Appendf(nil, `{"by":%q}`, marker), ver(u.Version))
				var ce *versioning.ConflictError
				switch {
				case err == nil:
					mu.Lock()
					if prev, dup := winner[v]; dup || v != u.Version+1 {
						mu.Unlock()
						errs <- fmt.Errorf("version %d won by %s and %s (expected %d)", v, prev, marker, u.Version)
						return
					}
					winner[v] = marker
					successes++
					mu.Unlock()
				case errors.As(err, &ce):
					// The conflict must name the version that beat us,
					// even when it committed after our snapshot.
					if ce.Expected != u.Version || ce.Current <= ce.Expected {
						errs <- fmt.Errorf("conflict %+v for expected %d", *ce, u.Version)
						return
					}
					mu.Lock()
					conflicts++
					mu.Unlock()
				default:
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}

	u, err := s.GetUser(ctx, 1, "hot")
	if err != nil {
		t.Fatal(err)
	}
	if u.Version != int64(successes)+1 {
		t.Fatalf("final version %d, want %d successes + 1", u.Version, successes)
	}
	for v := int64(1); v <= u.Version; v++ {
		if _, ok := winner[v]; !ok {
			t.Fatalf("version %d has no winner", v)
		}
	}
	if want := fmt.Sprintf(`{"by":%q}`, winner[u.Version]); !jsonEqual(t, u.Profile, []byte(want)) {
		t.Fatalf("final profile %s, want %s (the last winner's)", u.Profile, want)
	}
	evs, _ := eventsAfter(t, s, 0)
	if len(evs) != int(u.Version) {
		t.Fatalf("%d outbox rows, want one per version (%d)", len(evs), u.Version)
	}
	seen := map[int64]bool{}
	for _, e := range evs {
		seen[e.Version] = true
	}
	if len(seen) != int(u.Version) {
		t.Fatalf("outbox versions %v, want 1..%d once each", seen, u.Version)
	}
	t.Logf("%d successes, %d conflicts", successes, conflicts)
}

// TestPutUserConcurrentCreate races create-only puts: one wins, and every
// loser's conflict names the winner's version, although the winner committed
// after the loser's snapshot.
func TestPutUserConcurrentCreate(t *testing.T) {
	t.Parallel()
	s := newShard(t, 1)
	ctx := testCtx(t)
	for round := range 5 {
		id := fmt.Sprint("new-", round)
		var (
			wg   sync.WaitGroup
			mu   sync.Mutex
			wins int
		)
		for range 10 {
			wg.Go(func() {
				_, err := s.PutUser(ctx, 1, id, []byte(`{}`), ver(0))
				var ce *versioning.ConflictError
				switch {
				case err == nil:
					mu.Lock()
					wins++
					mu.Unlock()
				case errors.As(err, &ce):
					if ce.Expected != 0 || ce.Current != 1 {
						t.Errorf("conflict %+v, want {0, 1}", *ce)
					}
				default:
					t.Error(err)
				}
			})
		}
		wg.Wait()
		if wins != 1 {
			t.Fatalf("round %d: %d creates won, want 1", round, wins)
		}
	}
	if c := countRows(t, s); c.Users != 5 || c.Outbox != 5 {
		t.Fatalf("rows %+v, want 5 users and 5 events", c)
	}
}
