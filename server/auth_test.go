package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/shardgate/shardgate/auth/keyset"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/ratelimit"
)

// testKeys are the keys of an auth test: an Ed25519 and an RSA key the
// server trusts, and an Ed25519 key it does not.
type testKeys struct {
	ed       ed25519.PrivateKey
	rsa      *rsa.PrivateKey
	rsaPEM   []byte // the RSA public key, as an attacker could fetch it
	stranger ed25519.PrivateKey
}

func newTestKeys(t testing.TB) *testKeys {
	t.Helper()
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	return &testKeys{ed: ed, rsa: rk, stranger: stranger, rsaPEM: pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})}
}

const (
	testIssuer   = "https://issuer.test"
	testAudience = "shardgate-test"
)

func (k *testKeys) verifier(t testing.TB) *Verifier {
	t.Helper()
	v, err := NewVerifier(AuthOptions{
		Keys:     keyset.Static{"ed": {Alg: "EdDSA", Verify: k.ed.Public()}, "rs": {Alg: "RS256", Verify: &k.rsa.PublicKey}},
		Issuer:   testIssuer,
		Audience: testAudience,
		Leeway:   5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func claims(role, sub string) jwt.MapClaims {
	now := time.Now()
	return jwt.MapClaims{"role": role, "sub": sub, "iss": testIssuer, "aud": testAudience,
		"iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
}

func sign(t testing.TB, m jwt.SigningMethod, kid string, key any, c jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(m, c)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (k *testKeys) token(t testing.TB, role, sub string) string {
	return sign(t, jwt.SigningMethodEdDSA, "ed", k.ed, claims(role, sub))
}

// badTokens are tokens the server must refuse with Unauthenticated.
func (k *testKeys) badTokens(t testing.TB) map[string]string {
	expired := claims("admin", "ops")
	expired["exp"] = time.Now().Add(-time.Hour).Unix()
	wrongAud := claims("admin", "ops")
	wrongAud["aud"] = "someone-else"
	none, err := jwt.NewWithClaims(jwt.SigningMethodNone, claims("admin", "ops")).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		t.Fatal(err)
	}
	noRole := claims("", "ops")
	delete(noRole, "role")
	return map[string]string{
		"expired":         sign(t, jwt.SigningMethodEdDSA, "ed", k.ed, expired),
		"wrong audience":  sign(t, jwt.SigningMethodEdDSA, "ed", k.ed, wrongAud),
		"wrong signature": sign(t, jwt.SigningMethodEdDSA, "ed", k.stranger, claims("admin", "ops")),
		"alg none":        none,
		// HS256 with the RSA public key as the secret: the classic confusion.
		"HS/RS confusion": sign(t, jwt.SigningMethodHS256, "rs", k.rsaPEM, claims("admin", "ops")),
		"no role":         sign(t, jwt.SigningMethodEdDSA, "ed", k.ed, noRole),
		"garbage":         "not.a.jwt",
	}
}

func bearer(ctx context.Context, tok string) context.Context {
	if tok == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}

// outcome is what a principal should get from an RPC.
type outcome int

const (
	allowed outcome = iota // any code but the refusals below
	unauthenticated
	denied   // PermissionDenied
	notFound // NotFound: another user's session looks absent
)

func TestAuthMatrix(t *testing.T) {
	keys := newTestKeys(t)
	ts := newTestCluster(t, 2).startWith(t, false, GRPCOptions{Auth: keys.verifier(t)}, nil)
	ctx := ctxT(t)
	admin := bearer(ctx, keys.token(t, "admin", "ops"))
	if _, err := ts.data.PutUser(admin, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{}`}); err != nil {
		t.Fatal(err)
	}
	sess, err := ts.data.CreateSession(admin, &pb.CreateSessionRequest{UserId: "alice", TtlSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.data.PutItem(admin, &pb.PutItemRequest{UserId: "alice", Collection: "c", Key: "k", ValueJson: "1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.data.SetConfig(admin, &pb.SetConfigRequest{Namespace: "ns", Key: "k", ValueJson: "1"}); err != nil {
		t.Fatal(err)
	}
	v999 := int64(999)
	absentToken := "0.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

	type rpc struct {
		name string
		kind string // "user", "session", "config-read", "config-write", "admin", "schema-read"
		call func(ctx context.Context) error
	}
	d, a := ts.data, ts.admin
	rpcs := []rpc{
		{"PutUser", "user", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: "alice", ExpectedVersion: &v999})
			return err
		}},
		{"GetUser", "user", func(ctx context.Context) error {
			_, err := d.GetUser(ctx, &pb.GetUserRequest{UserId: "alice"})
			return err
		}},
		{"DeleteUser", "user", func(ctx context.Context) error {
			_, err := d.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: "alice", ExpectedVersion: &v999})
			return err
		}},
		{"CreateSession", "user", func(ctx context.Context) error {
			_, err := d.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "alice", TtlSeconds: 60})
			return err
		}},
		{"GetSession", "session", func(ctx context.Context) error {
			_, err := d.GetSession(ctx, &pb.GetSessionRequest{Token: sess.GetToken()})
			return err
		}},
		{"TouchSession", "session", func(ctx context.Context) error {
			_, err := d.TouchSession(ctx, &pb.TouchSessionRequest{Token: sess.GetToken(), TtlSeconds: 3600})
			return err
		}},
		{"RevokeSession", "session-absent", func(ctx context.Context) error {
			_, err := d.RevokeSession(ctx, &pb.RevokeSessionRequest{Token: absentToken})
			return err
		}},
		{"ListSessions", "user", func(ctx context.Context) error {
			_, err := d.ListSessions(ctx, &pb.ListSessionsRequest{UserId: "alice"})
			return err
		}},
		{"PutItem", "user", func(ctx context.Context) error {
			_, err := d.PutItem(ctx, &pb.PutItemRequest{UserId: "alice", Collection: "c", Key: "k2", ValueJson: "2"})
			return err
		}},
		{"GetItem", "user", func(ctx context.Context) error {
			_, err := d.GetItem(ctx, &pb.GetItemRequest{UserId: "alice", Collection: "c", Key: "k"})
			return err
		}},
		{"DeleteItem", "user", func(ctx context.Context) error {
			_, err := d.DeleteItem(ctx, &pb.DeleteItemRequest{UserId: "alice", Collection: "c", Key: "k", ExpectedVersion: &v999})
			return err
		}},
		{"ListItems", "user", func(ctx context.Context) error {
			_, err := d.ListItems(ctx, &pb.ListItemsRequest{UserId: "alice", Collection: "c"})
			return err
		}},
		{"GetConfig", "config-read", func(ctx context.Context) error {
			_, err := d.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "ns", Key: "k"})
			return err
		}},
		{"ListConfig", "config-read", func(ctx context.Context) error {
			_, err := d.ListConfig(ctx, &pb.ListConfigRequest{Namespace: "ns"})
			return err
		}},
		{"SetConfig", "config-write", func(ctx context.Context) error {
			_, err := d.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "ns", Key: "k", ValueJson: "2"})
			return err
		}},
		{"DeleteConfig", "config-write", func(ctx context.Context) error {
			_, err := d.DeleteConfig(ctx, &pb.DeleteConfigRequest{Namespace: "ns", Key: "k", ExpectedVersion: &v999})
			return err
		}},
		{"GetTopology", "admin", func(ctx context.Context) error { _, err := a.GetTopology(ctx, &pb.GetTopologyRequest{}); return err }},
		{"LocateUser", "admin", func(ctx context.Context) error {
			_, err := a.LocateUser(ctx, &pb.LocateUserRequest{UserId: "alice"})
			return err
		}},
		{"MigrationStatus", "admin", func(ctx context.Context) error {
			_, err := a.MigrationStatus(ctx, &pb.MigrationStatusRequest{})
			return err
		}},
		{"SetConfigSchema", "admin", func(ctx context.Context) error {
			_, err := a.SetConfigSchema(ctx, &pb.SetConfigSchemaRequest{Namespace: "other"})
			return err
		}},
		{"GetConfigSchema", "schema-read", func(ctx context.Context) error {
			_, err := a.GetConfigSchema(ctx, &pb.GetConfigSchemaRequest{Namespace: "ns"})
			return err
		}},
	}

	type principal struct {
		name   string
		token  string
		expect func(kind string) outcome
	}
	refuse := func(string) outcome { return unauthenticated }
	principals := []principal{{"none", "", refuse}}
	for name, tok := range keys.badTokens(t) {
		principals = append(principals, principal{name, tok, refuse})
	}
	principals = append(principals,
		principal{"user for another user", keys.token(t, "user", "bob"), func(kind string) outcome {
			switch kind {
			case "session", "session-absent":
				return notFound
			case "config-read":
				return allowed
			}
			return denied
		}},
		principal{"user itself", keys.token(t, "user", "alice"), func(kind string) outcome {
			switch kind {
			case "user", "session", "session-absent", "config-read":
				return allowed
			}
			return denied
		}},
		principal{"service", keys.token(t, "service", "backend"), func(kind string) outcome {
			if kind == "admin" {
				return denied
			}
			return allowed
		}},
		principal{"admin", keys.token(t, "admin", "ops"), func(string) outcome { return allowed }},
	)
	for _, p := range principals {
		for _, r := range rpcs {
			err := r.call(bearer(ctx, p.token))
			got := status.Code(err)
			switch want := p.expect(r.kind); want {
			case allowed:
				switch got {
				case codes.Unauthenticated, codes.PermissionDenied, codes.InvalidArgument, codes.Internal, codes.Unknown:
					t.Errorf("%s / %s: got %v (%v), want the call to be allowed", p.name, r.name, got, err)
				}
			case unauthenticated, denied, notFound:
				wantCode := map[outcome]codes.Code{unauthenticated: codes.Unauthenticated, denied: codes.PermissionDenied, notFound: codes.NotFound}[want]
				if got != wantCode {
					t.Errorf("%s / %s: got %v (%v), want %v", p.name, r.name, got, err, wantCode)
				}
			}
		}
	}

	// Another user's session is untouched by its failed calls.
	bob := bearer(ctx, keys.token(t, "user", "bob"))
	_, err = ts.data.RevokeSession(bob, &pb.RevokeSessionRequest{Token: sess.GetToken()})
	wantCode(t, err, codes.NotFound)
	if _, err := ts.data.GetSession(bearer(ctx, keys.token(t, "user", "alice")), &pb.GetSessionRequest{Token: sess.GetToken()}); err != nil {
		t.Fatalf("alice's session after bob's revoke: %v", err)
	}
}

// fakeStream is a server stream that receives one WatchRequest.
type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
	msg *pb.WatchRequest
}

func (f *fakeStream) Context() context.Context { return f.ctx }
func (f *fakeStream) RecvMsg(m any) error {
	proto.Merge(m.(*pb.WatchRequest), f.msg)
	return nil
}

// TestAuthWatchStream checks the stream interceptor alone, on every shape
// of filter a principal may send.
func TestAuthWatchStream(t *testing.T) {
	keys := newTestKeys(t)
	intercept := authStream(keys.verifier(t))
	info := &grpc.StreamServerInfo{FullMethod: "/shardgate.v1.DataService/Watch", IsServerStream: true}
	handler := func(srv any, ss grpc.ServerStream) error {
		return ss.RecvMsg(new(pb.WatchRequest))
	}
	for _, c := range []struct {
		name  string
		token string
		req   *pb.WatchRequest
		want  codes.Code
	}{
		{"user watches itself", keys.token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"alice"}}, codes.OK},
		{"user watches itself and config", keys.token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"alice"}, Config: true}, codes.OK},
		{"user watches another", keys.token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"bob"}}, codes.PermissionDenied},
		{"user watches itself and another", keys.token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"alice", "bob"}}, codes.PermissionDenied},
		{"user watches partitions", keys.token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"alice"}, Partitions: []uint32{7}}, codes.PermissionDenied},
		{"user watches nothing", keys.token(t, "user", "alice"), &pb.WatchRequest{}, codes.PermissionDenied},
		{"service watches partitions", keys.token(t, "service", "pusher"), &pb.WatchRequest{Partitions: []uint32{1, 2}}, codes.OK},
		{"admin watches users", keys.token(t, "admin", "ops"), &pb.WatchRequest{UserIds: []string{"bob"}}, codes.OK},
		{"no token", "", &pb.WatchRequest{UserIds: []string{"alice"}}, codes.Unauthenticated},
		{"expired", keys.badTokens(t)["expired"], &pb.WatchRequest{UserIds: []string{"alice"}}, codes.Unauthenticated},
	} {
		md := metadata.MD{}
		if c.token != "" {
			md.Set("authorization", "Bearer "+c.token)
		}
		ss := &fakeStream{ctx: metadata.NewIncomingContext(context.Background(), md), msg: c.req}
		err := intercept(nil, ss, info, handler)
		if got := status.Code(err); got != c.want {
			t.Errorf("%s: got %v (%v), want %v", c.name, got, err, c.want)
		}
	}
}

// TestAuthWatchEndToEnd: over a real server with events on, a user token
// follows its own changes and is refused another user's.
func TestAuthWatchEndToEnd(t *testing.T) {
	keys := newTestKeys(t)
	ts := newTestCluster(t, 2).startWith(t, false, GRPCOptions{Auth: keys.verifier(t)}, nil, withEvents(t, 0))
	ctx := ctxT(t)
	alice := bearer(ctx, keys.token(t, "user", "alice"))

	st, err := ts.data.Watch(bearer(ctx, keys.token(t, "user", "alice")), &pb.WatchRequest{UserIds: []string{"bob"}})
	if err == nil {
		_, err = st.Recv()
	}
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("alice watching bob: %v, want PermissionDenied", err)
	}

	st, err = ts.data.Watch(alice, &pb.WatchRequest{UserIds: []string{"alice"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.data.PutUser(alice, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{"n":1}`}); err != nil {
		t.Fatal(err)
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("alice watching herself: %v", err)
		}
		if ev := resp.GetEvent(); ev != nil {
			if ev.GetUserId() != "alice" || ev.GetEntity() != "user" {
				t.Fatalf("event %v", ev)
			}
			break
		}
	}
}

func TestDevAllowsAnonymousButChecksTokens(t *testing.T) {
	keys := newTestKeys(t)
	v, err := NewVerifier(AuthOptions{Keys: keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.ed.Public()}}, AllowAnonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{Auth: v}, nil)
	ctx := ctxT(t)
	if _, err := ts.admin.GetTopology(ctx, &pb.GetTopologyRequest{}); err != nil {
		t.Fatalf("anonymous call in dev: %v", err)
	}
	_, err = ts.admin.GetTopology(bearer(ctx, sign(t, jwt.SigningMethodEdDSA, "ed", keys.stranger, claims("admin", "x"))), &pb.GetTopologyRequest{})
	wantCode(t, err, codes.Unauthenticated)
	_, err = ts.admin.GetTopology(bearer(ctx, sign(t, jwt.SigningMethodEdDSA, "ed", keys.ed, claims("user", "alice"))), &pb.GetTopologyRequest{})
	wantCode(t, err, codes.PermissionDenied)
}

// A stream lives no longer than its token: at exp its context ends with
// Unauthenticated as the cause (Watch returns it).
func TestStreamEndsWhenTokenExpires(t *testing.T) {
	keys := newTestKeys(t)
	intercept := authStream(keys.verifier(t))
	info := &grpc.StreamServerInfo{FullMethod: "/shardgate.v1.DataService/Watch", IsServerStream: true}
	c := claims("service", "pusher")
	c["exp"] = time.Now().Add(1500 * time.Millisecond).Unix()
	md := metadata.Pairs("authorization", "Bearer "+sign(t, jwt.SigningMethodEdDSA, "ed", keys.ed, c))
	ss := &fakeStream{ctx: metadata.NewIncomingContext(ctxT(t), md), msg: &pb.WatchRequest{Partitions: []uint32{1}}}
	err := intercept(nil, ss, info, func(srv any, ss grpc.ServerStream) error {
		<-ss.Context().Done()
		return watchEnded(ss.Context())
	})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("stream past its token's exp: %v, want Unauthenticated", err)
	}
}

// A user token holds at most maxWatchesPerUser watches on an instance, so it
// cannot take the slots pushers need; another user is unaffected.
func TestUserWatchCap(t *testing.T) {
	keys := newTestKeys(t)
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{Auth: keys.verifier(t)}, nil, withEvents(t, 0))
	open := func(user string) (context.CancelFunc, error) {
		ctx, cancel := context.WithCancel(bearer(ctxT(t), keys.token(t, "user", user)))
		st, err := ts.data.Watch(ctx, &pb.WatchRequest{UserIds: []string{user}})
		if err == nil {
			_, err = st.Recv() // the first heartbeat: the watch is open
		}
		return cancel, err
	}
	var cancels []context.CancelFunc
	defer func() {
		for _, c := range cancels {
			c()
		}
	}()
	for i := range maxWatchesPerUser {
		cancel, err := open("alice")
		cancels = append(cancels, cancel)
		if err != nil {
			t.Fatalf("alice's watch %d: %v", i+1, err)
		}
	}
	cancel, err := open("alice")
	cancel()
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("alice's watch %d: %v, want ResourceExhausted", maxWatchesPerUser+1, err)
	}
	cancel, err = open("bob")
	cancel()
	if err != nil {
		t.Fatalf("bob's first watch: %v", err)
	}
	cancels[0]()
	waitUntil(t, "alice's closed watch to release its slot", func() bool {
		cancel, err := open("alice")
		cancel()
		return err == nil
	})
}

// Failed verifications are limited per address: past the bucket, new
// tokens are refused unchecked (RESOURCE_EXHAUSTED with retry-after-ms),
// tokens verified before keep working, and the address recovers once the
// bucket refills.
func TestFailedAuthenticationsAreThrottled(t *testing.T) {
	keys := newTestKeys(t)
	v, err := NewVerifier(AuthOptions{
		Keys:        keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.ed.Public()}},
		FailureRate: ratelimit.Rate{PerSecond: 2, Burst: 5},
	})
	if err != nil {
		t.Fatal(err)
	}
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{Auth: v}, nil)
	ctx := ctxT(t)
	admin := sign(t, jwt.SigningMethodEdDSA, "ed", keys.ed, claims("admin", "ops"))
	if _, err := ts.admin.GetTopology(bearer(ctx, admin), &pb.GetTopologyRequest{}); err != nil {
		t.Fatal(err)
	}
	var unauth, exhausted int
	var retryAfter string
	start := time.Now()
	for i := range 20 {
		forged := sign(t, jwt.SigningMethodEdDSA, "ed", keys.stranger, claims("admin", fmt.Sprint("x", i)))
		var md metadata.MD
		_, err := ts.admin.GetTopology(bearer(ctx, forged), &pb.GetTopologyRequest{}, grpc.Header(&md))
		switch status.Code(err) {
		case codes.Unauthenticated:
			unauth++
		case codes.ResourceExhausted:
			exhausted++
			if v := md.Get(ratelimit.RetryAfterKey); len(v) == 1 {
				retryAfter = v[0]
			}
		default:
			t.Fatalf("forged token %d: %v", i, err)
		}
	}
	// The bucket lets 5 through at once, and refills at 2/s while the loop runs.
	most := 5 + int(2*time.Since(start).Seconds()) + 1
	if unauth < 5 || unauth > most || exhausted == 0 || retryAfter == "" {
		t.Fatalf("20 forged tokens: %d unauthenticated, %d exhausted (retry-after %q); want 5-%d checked, the rest refused", unauth, exhausted, retryAfter, most)
	}
	if _, err := ts.admin.GetTopology(bearer(ctx, admin), &pb.GetTopologyRequest{}); err != nil {
		t.Fatalf("a token verified before the flood: %v", err)
	}
	fresh := sign(t, jwt.SigningMethodEdDSA, "ed", keys.ed, claims("admin", "other"))
	_, err = ts.admin.GetTopology(bearer(ctx, fresh), &pb.GetTopologyRequest{})
	wantCode(t, err, codes.ResourceExhausted)
	waitUntil(t, "the address to be let through again", func() bool {
		_, err := ts.admin.GetTopology(bearer(ctx, fresh), &pb.GetTopologyRequest{})
		return err == nil
	})
}

func jwkOf(t testing.TB, kid string, pub any) map[string]string {
	t.Helper()
	b64 := base64.RawURLEncoding.EncodeToString
	switch k := pub.(type) {
	case ed25519.PublicKey:
		return map[string]string{"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(k)}
	case *ecdsa.PublicKey:
		pt, _ := k.Bytes()
		return map[string]string{"kty": "EC", "crv": "P-256", "kid": kid, "x": b64(pt[1:33]), "y": b64(pt[33:])}
	}
	t.Fatalf("jwkOf %T", pub)
	return nil
}

func TestHS256OnlyWhenConfigured(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	hk, err := keyset.HMAC(secret)
	if err != nil {
		t.Fatal(err)
	}
	v, err := NewVerifier(AuthOptions{Keys: hk})
	if err != nil {
		t.Fatal(err)
	}
	tok := sign(t, jwt.SigningMethodHS256, "", secret, jwt.MapClaims{"role": "service", "sub": "s", "exp": 4102444800})
	if p, err := v.Verify(context.Background(), tok); err != nil || p.Role != RoleService {
		t.Fatalf("HS256 with an HS256 key: %v", err)
	}
	// The same token against Ed25519 keys: refused.
	keys := newTestKeys(t)
	if _, err := keys.verifier(t).Verify(context.Background(), tok); err == nil {
		t.Fatal("HS256 token accepted by an asymmetric verifier")
	}
}

func TestJWKSRotation(t *testing.T) {
	keys := newTestKeys(t)
	_, next, _ := ed25519.GenerateKey(rand.Reader)
	var fetches atomic.Int32
	var rotated atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		set := []any{jwkOf(t, "k1", keys.ed.Public())}
		if rotated.Load() {
			set = []any{jwkOf(t, "k2", next.Public())}
		}
		json.NewEncoder(w).Encode(map[string]any{"keys": set})
	}))
	defer srv.Close()
	j := &keyset.JWKS{URL: srv.URL, MinRefetch: 1}
	if err := j.Fetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	v, err := NewVerifier(AuthOptions{Keys: j})
	if err != nil {
		t.Fatal(err)
	}
	c := jwt.MapClaims{"role": "user", "sub": "alice", "exp": 4102444800}
	old := sign(t, jwt.SigningMethodEdDSA, "k1", keys.ed, c)
	if _, err := v.Verify(context.Background(), old); err != nil {
		t.Fatal(err)
	}
	rotated.Store(true)
	if _, err := v.Verify(context.Background(), sign(t, jwt.SigningMethodEdDSA, "k2", next, c)); err != nil {
		t.Fatalf("token with the rotated key: %v", err)
	}
	before := fetches.Load()
	// Cached: verifying the same token again fetches nothing.
	if _, err := v.Verify(context.Background(), sign(t, jwt.SigningMethodEdDSA, "k2", next, c)); err != nil || fetches.Load() != before {
		t.Fatalf("second verification: %v, %d fetches", err, fetches.Load()-before)
	}
	// The token signed with the withdrawn key was cached; it is refused now.
	if _, err := v.Verify(context.Background(), old); err == nil {
		t.Fatal("a cached token signed with a rotated-out key still verifies")
	}
}
