package shards

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/versioning"
)

func TestSessionLifecycle(t *testing.T) {
	t.Parallel()
	s := newShard(t, 3)
	ctx := testCtx(t)
	if _, err := s.PutUser(ctx, 3, "alice", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	th := tokenHash("3.secret")
	data := `{ "ip": "10.0.0.1", "roles": ["admin"] }`

	created, err := s.CreateSession(ctx, 3, "alice", th, []byte(data), time.Hour)
	if err != nil {
		t.Fatalf("CreateSession: %v", err)
	}
	if !bytes.Equal(created.TokenHash, th) || created.UserID != "alice" || created.Partition != 3 || created.Version != 1 {
		t.Fatalf("CreateSession = %+v", created)
	}
	if !jsonEqual(t, created.Data, []byte(data)) {
		t.Fatalf("data = %s, want %s", created.Data, data)
	}
	if d := created.ExpiresAt.Sub(created.CreatedAt); d != time.Hour {
		t.Fatalf("expires_at - created_at = %v, want 1h", d)
	}

	got, err := s.GetSession(ctx, 3, th)
	if err != nil {
		t.Fatalf("GetSession: %v", err)
	}
	if !bytes.Equal(got.TokenHash, th) || got.UserID != "alice" || got.Version != 1 ||
		!got.ExpiresAt.Equal(created.ExpiresAt) || !got.CreatedAt.Equal(created.CreatedAt) || !jsonEqual(t, got.Data, []byte(data)) {
		t.Fatalf("GetSession = %+v, want %+v", got, created)
	}

	touched, err := s.TouchSession(ctx, 3, th, 2*time.Hour)
	if err != nil {
		t.Fatalf("TouchSession: %v", err)
	}
	if touched.Version != 2 || !touched.ExpiresAt.After(created.ExpiresAt) || touched.UserID != "alice" ||
		!touched.CreatedAt.Equal(created.CreatedAt) || !jsonEqual(t, touched.Data, []byte(data)) {
		t.Fatalf("TouchSession = %+v (created %+v)", touched, created)
	}
	if got, err := s.GetSession(ctx, 3, th); err != nil || got.Version != 2 || !got.ExpiresAt.Equal(touched.ExpiresAt) {
		t.Fatalf("GetSession after touch = %+v, %v", got, err)
	}

	list, err := s.ListSessions(ctx, 3, "alice", SessionKey{}, MaxListSessions)
	if err != nil || len(list) != 1 || !bytes.Equal(list[0].TokenHash, th) || list[0].Version != 2 {
		t.Fatalf("ListSessions = %+v, %v", list, err)
	}

	if err := s.RevokeSession(ctx, 3, th); err != nil {
		t.Fatalf("RevokeSession: %v", err)
	}
	wantErr(t, s.RevokeSession(ctx, 3, th), versioning.ErrNotFound)
	_, err = s.GetSession(ctx, 3, th)
	wantErr(t, err, versioning.ErrNotFound)
	_, err = s.TouchSession(ctx, 3, th, time.Hour)
	wantErr(t, err, versioning.ErrNotFound)
	if list, err := s.ListSessions(ctx, 3, "alice", SessionKey{}, MaxListSessions); err != nil || len(list) != 0 {
		t.Fatalf("ListSessions after revoke = %+v, %v", list, err)
	}
}

func TestSessionExpired(t *testing.T) {
	t.Parallel()
	s := newShard(t, 3)
	ctx := testCtx(t)
	if _, err := s.PutUser(ctx, 3, "alice", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	live, dead := tokenHash("live"), tokenHash("dead")
	for _, th := range [][]byte{live, dead} {
		if _, err := s.CreateSession(ctx, 3, "alice", th, []byte(`{}`), time.Second); err != nil {
			t.Fatal(err)
		}
	}
	exec(t, s, `UPDATE sessions SET expires_at = now() - interval '1 millisecond' WHERE token_hash = $1`, dead)
	exec(t, s, `UPDATE sessions SET expires_at = now() + interval '1 hour' WHERE token_hash = $1`, live)
	before := countRows(t, s)

	_, err := s.GetSession(ctx, 3, dead)
	wantErr(t, err, versioning.ErrNotFound)
	_, err = s.TouchSession(ctx, 3, dead, time.Hour)
	wantErr(t, err, versioning.ErrNotFound)
	wantErr(t, s.RevokeSession(ctx, 3, dead), versioning.ErrNotFound)
	list, err := s.ListSessions(ctx, 3, "alice", SessionKey{}, MaxListSessions)
	if err != nil || len(list) != 1 || !bytes.Equal(list[0].TokenHash, live) {
		t.Fatalf("ListSessions = %+v, %v; want only the live one", list, err)
	}
	if after := countRows(t, s); after != before {
		t.Fatalf("operations on an expired session wrote: %+v → %+v", before, after)
	}
}

func TestCreateSessionMissingUser(t *testing.T) {
	t.Parallel()
	s := newShard(t, 3, 4)
	ctx := testCtx(t)
	// The user exists, but in another partition.
	if _, err := s.PutUser(ctx, 4, "alice", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	before := countRows(t, s)
	_, err := s.CreateSession(ctx, 3, "alice", tokenHash("x"), []byte(`{}`), time.Hour)
	wantErr(t, err, ErrUserNotFound)
	if after := countRows(t, s); after != before {
		t.Fatalf("rows changed: %+v → %+v", before, after)
	}
}

func TestSessionInputErrors(t *testing.T) {
	t.Parallel()
	s := newShard(t, 3)
	ctx := testCtx(t)
	if _, err := s.PutUser(ctx, 3, "alice", []byte(`{}`), nil); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		hash []byte
		ttl  time.Duration
	}{
		{"short hash", []byte("abc"), time.Hour},
		{"nil hash", nil, time.Hour},
		{"zero ttl", tokenHash("a"), 0},
		{"negative ttl", tokenHash("a"), -time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := s.CreateSession(ctx, 3, "alice", tc.hash, []byte(`{}`), tc.ttl); err == nil {
				t.Fatal("CreateSession accepted it")
			}
		})
	}
	if _, err := s.CreateSession(ctx, 3, "alice", tokenHash("a"), []byte(`{}`), time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := s.TouchSession(ctx, 3, tokenHash("a"), 0); err == nil {
		t.Fatal("TouchSession accepted ttl 0")
	}
	// A token hash is unique; reusing one is an error, not a silent overwrite.
	if _, err := s.CreateSession(ctx, 3, "alice", tokenHash("a"), []byte(`{"x":1}`), time.Hour); err == nil {
		t.Fatal("CreateSession reused a token hash")
	}
	if c := countRows(t, s); c.Sessions != 1 {
		t.Fatalf("%d sessions, want 1", c.Sessions)
	}
}

func TestListSessionsOrder(t *testing.T) {
	t.Parallel()
	s := newShard(t, 3)
	ctx := testCtx(t)
	for _, u := range []string{"alice", "bob"} {
		if _, err := s.PutUser(ctx, 3, u, []byte(`{}`), nil); err != nil {
			t.Fatal(err)
		}
	}
	hashes := make([][]byte, 5)
	for i := range hashes {
		hashes[i] = tokenHash(fmt.Sprint("alice-", i))
		if _, err := s.CreateSession(ctx, 3, "alice", hashes[i], []byte(`{}`), time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.CreateSession(ctx, 3, "bob", tokenHash("bob"), []byte(`{}`), time.Hour); err != nil {
		t.Fatal(err)
	}
	// Sessions 0-2 are created at the same instant, so the token hash
	// decides among them; 3 and 4 come later, 4 first.
	exec(t, s, `UPDATE sessions SET created_at = '2030-01-01' WHERE token_hash = ANY ($1)`, hashes[:3])
	exec(t, s, `UPDATE sessions SET created_at = '2030-01-03' WHERE token_hash = $1`, hashes[3])
	exec(t, s, `UPDATE sessions SET created_at = '2030-01-02' WHERE token_hash = $1`, hashes[4])
	first := [][]byte{hashes[0], hashes[1], hashes[2]}
	for i := range first {
		for j := i + 1; j < len(first); j++ {
			if bytes.Compare(first[j], first[i]) < 0 {
				first[i], first[j] = first[j], first[i]
			}
		}
	}
	want := append(first, hashes[4], hashes[3])

	list, err := s.ListSessions(ctx, 3, "alice", SessionKey{}, MaxListSessions)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != len(want) {
		t.Fatalf("%d sessions, want %d", len(list), len(want))
	}
	for i := range want {
		if !bytes.Equal(list[i].TokenHash, want[i]) || list[i].UserID != "alice" {
			t.Fatalf("session %d = %x (%s), want %x", i, list[i].TokenHash, list[i].UserID, want[i])
		}
	}
	if list, err := s.ListSessions(ctx, 3, "nobody", SessionKey{}, MaxListSessions); err != nil || len(list) != 0 {
		t.Fatalf("ListSessions(nobody) = %+v, %v", list, err)
	}

	// Paging two at a time walks the same order, ties included, once each.
	var paged [][]byte
	var key SessionKey
	for range 4 {
		page, err := s.ListSessions(ctx, 3, "alice", key, 2)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range page {
			paged = append(paged, p.TokenHash)
		}
		if len(page) < 2 {
			break
		}
		last := page[len(page)-1]
		key = SessionKey{CreatedAt: last.CreatedAt, TokenHash: last.TokenHash}
	}
	if len(paged) != len(want) {
		t.Fatalf("paging gave %d sessions, want %d", len(paged), len(want))
	}
	for i := range want {
		if !bytes.Equal(paged[i], want[i]) {
			t.Fatalf("paged session %d = %x, want %x", i, paged[i], want[i])
		}
	}
	if _, err := s.ListSessions(ctx, 3, "alice", SessionKey{}, 0); err == nil {
		t.Fatal("limit 0 accepted")
	}
}

// TestDeleteUserRacesCreateSessionAndPutItem checks that a session or item
// created while its user is being deleted is either refused or deleted with
// the user (and its delete event written): never left behind.
func TestDeleteUserRacesCreateSessionAndPutItem(t *testing.T) {
	t.Parallel()
	s := newShard(t, 5)
	ctx := testCtx(t)
	for round := range 10 {
		user := fmt.Sprint("racer-", round)
		if _, err := s.PutUser(ctx, 5, user, []byte(`{}`), nil); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Go(func() {
				for i := 0; ; i++ {
					var err error
					if w%2 == 0 {
						th := tokenHash(fmt.Sprintf("%s-%d-%d", user, w, i))
						_, err = s.CreateSession(ctx, 5, user, th, []byte(`{}`), time.Hour)
					} else {
						_, err = s.PutItem(ctx, 5, user, "c", fmt.Sprintf("%d-%d", w, i), []byte(`1`), nil)
					}
					if errors.Is(err, ErrUserNotFound) {
						return
					}
					if err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		time.Sleep(5 * time.Millisecond)
		if _, err := s.DeleteUser(ctx, 5, user, nil); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
	}
	if c := countRows(t, s); c.Sessions != 0 || c.Items != 0 || c.Users != 0 {
		t.Fatalf("left behind: %+v", c)
	}
	var unmatched int
	err := s.pool.QueryRow(ctx, `
SELECT count(*) FROM (
    SELECT key FROM outbox WHERE entity IN ('session', 'item')
    GROUP BY user_id, key HAVING count(*) FILTER (WHERE op = 'upsert') <> count(*) FILTER (WHERE op = 'delete')
) AS k`).Scan(&unmatched)
	if err != nil || unmatched != 0 {
		t.Fatalf("%d sessions or items without exactly one create and one delete event (err %v)", unmatched, err)
	}
}
