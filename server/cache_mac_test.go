package server

import (
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// Whoever can write to Redis cannot forge a session: an entry edited in
// place, one copied to another token's key, and one written in the
// unsigned format of earlier versions are none of them served by
// GetSession, and each is counted.
func TestForgedSessionEntriesAreNotServed(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, 1)
	addr, prefix := testenv.Redis(t)
	ts := c.start(t, false, withCache(t, addr, prefix, cache.Options{}))
	raw := newRedisClient(t, addr)
	ctx := ctxT(t)
	if _, err := ts.data.PutUser(ctx, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{}`}); err != nil {
		t.Fatal(err)
	}
	sess, err := ts.data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "alice", DataJson: `{"role":"user"}`, TtlSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	get := func(tok string) (*pb.GetSessionResponse, error) {
		return ts.data.GetSession(ctx, &pb.GetSessionRequest{Token: tok})
	}
	if _, err := get(sess.GetToken()); err != nil { // now cached
		t.Fatal(err)
	}
	cch := ts.srv.opts.Cache
	key := cch.SessionKey(hashToken(sess.GetToken()))
	genuine, err := raw.Do(ctx, raw.B().Get().Key(key).Build()).ToString()
	if err != nil {
		t.Fatalf("the session is not in Redis: %v", err)
	}
	set := func(k, v string) {
		t.Helper()
		if err := raw.Do(ctx, raw.B().Set().Key(k).Value(v).Ex(time.Hour).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	rejected := func() int64 { return cch.Stats().Rejected }

	// Edited in place: same length, so only the MAC can tell.
	edited := strings.Replace(genuine, `"role": "user"`, `"role": "root"`, 1)
	if edited == genuine {
		t.Fatalf("the entry does not hold the data in the clear: %q", genuine)
	}
	before := rejected()
	set(key, edited)
	waitUntil(t, "the edited entry to be rejected", func() bool {
		r, err := get(sess.GetToken())
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(r.GetDataJson(), "root") {
			t.Fatalf("GetSession served the edited entry: %s", r.GetDataJson())
		}
		return rejected() > before
	})

	// A genuine entry copied to the key of a token the attacker made up.
	made := "0.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
	before = rejected()
	set(cch.SessionKey(hashToken(made)), genuine)
	if r, err := get(made); status.Code(err) != codes.NotFound {
		t.Fatalf("GetSession of a copied entry = %v, %v; want NotFound", r, err)
	}
	if rejected() <= before {
		t.Fatal("the copied entry was not counted")
	}

	// The unsigned format servers wrote before entries carried a MAC.
	made2 := "0.BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
	before = rejected()
	set(cch.SessionKey(hashToken(made2)), unsignedSession("alice", `{"role":"admin"}`, time.Now().Add(time.Hour)))
	if r, err := get(made2); status.Code(err) != codes.NotFound {
		t.Fatalf("GetSession of an unsigned entry = %v, %v; want NotFound", r, err)
	}
	if rejected() <= before {
		t.Fatal("the unsigned entry was not counted")
	}
	if m := scrape(t, ts.srv); !strings.Contains(m, "shardgate_cache_rejected_entries_total[reason=mac] ") ||
		strings.Contains(m, "shardgate_cache_rejected_entries_total[reason=mac] 0\n") {
		t.Fatalf("metric missing or zero:\n%s", m)
	}
}

// unsignedSession is a session entry in the format without a MAC (format
// byte 1): kind, version, updated, expires, owner, data, list length.
func unsignedSession(owner, data string, expires time.Time) string {
	b := []byte{1, 'V'}
	b = binary.AppendVarint(b, 1)
	b = binary.AppendVarint(b, 0)
	b = binary.AppendVarint(b, expires.UnixNano())
	b = binary.AppendUvarint(b, uint64(len(owner)))
	b = append(b, owner...)
	b = binary.AppendUvarint(b, uint64(len(data)))
	b = append(b, data...)
	b = binary.AppendUvarint(b, 0)
	return string(b)
}
