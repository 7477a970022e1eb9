package auth_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/auth/authtest"
	"github.com/shardgate/shardgate/auth/keyset"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/ratelimit"
)

// topologyStub answers GetTopology with an empty topology: a method only an
// admin may call.
type topologyStub struct {
	pb.UnimplementedAdminServiceServer
}

func (topologyStub) GetTopology(context.Context, *pb.GetTopologyRequest) (*pb.GetTopologyResponse, error) {
	return &pb.GetTopologyResponse{}, nil
}

// serve serves topologyStub through v's interceptors on a free loopback
// port until the test ends, and returns a client of it.
func serve(t *testing.T, v *auth.Verifier) pb.AdminServiceClient {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.ChainUnaryInterceptor(auth.UnaryServerInterceptor(v)),
		grpc.ChainStreamInterceptor(auth.StreamServerInterceptor(v)))
	pb.RegisterAdminServiceServer(g, topologyStub{})
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewAdminServiceClient(conn)
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t testing.TB, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("got %v (%v), want %v", got, err, want)
	}
}

func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
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
	keys := authtest.NewKeys(t)
	intercept := auth.StreamServerInterceptor(keys.Verifier(t))
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
		{"user watches itself", keys.Token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"alice"}}, codes.OK},
		{"user watches itself and config", keys.Token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"alice"}, Config: true}, codes.OK},
		{"user watches another", keys.Token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"bob"}}, codes.PermissionDenied},
		{"user watches itself and another", keys.Token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"alice", "bob"}}, codes.PermissionDenied},
		{"user watches partitions", keys.Token(t, "user", "alice"), &pb.WatchRequest{UserIds: []string{"alice"}, Partitions: []uint32{7}}, codes.PermissionDenied},
		{"user watches nothing", keys.Token(t, "user", "alice"), &pb.WatchRequest{}, codes.PermissionDenied},
		{"service watches partitions", keys.Token(t, "service", "pusher"), &pb.WatchRequest{Partitions: []uint32{1, 2}}, codes.OK},
		{"admin watches users", keys.Token(t, "admin", "ops"), &pb.WatchRequest{UserIds: []string{"bob"}}, codes.OK},
		{"no token", "", &pb.WatchRequest{UserIds: []string{"alice"}}, codes.Unauthenticated},
		{"expired", keys.BadTokens(t)["expired"], &pb.WatchRequest{UserIds: []string{"alice"}}, codes.Unauthenticated},
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

// A stream lives no longer than its token: at exp its context ends with
// Unauthenticated as the cause (Watch returns it).
func TestStreamEndsWhenTokenExpires(t *testing.T) {
	keys := authtest.NewKeys(t)
	intercept := auth.StreamServerInterceptor(keys.Verifier(t))
	info := &grpc.StreamServerInfo{FullMethod: "/shardgate.v1.DataService/Watch", IsServerStream: true}
	c := authtest.Claims("service", "pusher")
	c["exp"] = time.Now().Add(1500 * time.Millisecond).Unix()
	md := metadata.Pairs("authorization", "Bearer "+authtest.Sign(t, jwt.SigningMethodEdDSA, "ed", keys.Ed, c))
	ss := &fakeStream{ctx: metadata.NewIncomingContext(ctxT(t), md), msg: &pb.WatchRequest{Partitions: []uint32{1}}}
	err := intercept(nil, ss, info, func(srv any, ss grpc.ServerStream) error {
		<-ss.Context().Done()
		return context.Cause(ss.Context())
	})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("stream past its token's exp: %v, want Unauthenticated", err)
	}
}

func TestDevAllowsAnonymousButChecksTokens(t *testing.T) {
	keys := authtest.NewKeys(t)
	v, err := auth.NewVerifier(auth.Options{Keys: keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.Ed.Public()}}, AllowAnonymous: true, AnyIssuer: true, AnyAudience: true})
	if err != nil {
		t.Fatal(err)
	}
	client := serve(t, v)
	ctx := ctxT(t)
	if _, err := client.GetTopology(ctx, &pb.GetTopologyRequest{}); err != nil {
		t.Fatalf("anonymous call in dev: %v", err)
	}
	_, err = client.GetTopology(authtest.Bearer(ctx, authtest.Sign(t, jwt.SigningMethodEdDSA, "ed", keys.Stranger, authtest.Claims("admin", "x"))), &pb.GetTopologyRequest{})
	wantCode(t, err, codes.Unauthenticated)
	_, err = client.GetTopology(authtest.Bearer(ctx, authtest.Sign(t, jwt.SigningMethodEdDSA, "ed", keys.Ed, authtest.Claims("user", "alice"))), &pb.GetTopologyRequest{})
	wantCode(t, err, codes.PermissionDenied)
}

// Failed verifications are limited per address: past the bucket, new
// tokens are refused unchecked (RESOURCE_EXHAUSTED with retry-after-ms),
// tokens verified before keep working, and the address recovers once the
// bucket refills.
func TestFailedAuthenticationsAreThrottled(t *testing.T) {
	keys := authtest.NewKeys(t)
	v, err := auth.NewVerifier(auth.Options{
		Keys:        keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.Ed.Public()}},
		FailureRate: ratelimit.Rate{PerSecond: 2, Burst: 5},
		AnyIssuer:   true, AnyAudience: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	client := serve(t, v)
	ctx := ctxT(t)
	admin := authtest.Sign(t, jwt.SigningMethodEdDSA, "ed", keys.Ed, authtest.Claims("admin", "ops"))
	if _, err := client.GetTopology(authtest.Bearer(ctx, admin), &pb.GetTopologyRequest{}); err != nil {
		t.Fatal(err)
	}
	var unauth, exhausted int
	var retryAfter string
	start := time.Now()
	for i := range 20 {
		forged := authtest.Sign(t, jwt.SigningMethodEdDSA, "ed", keys.Stranger, authtest.Claims("admin", fmt.Sprint("x", i)))
		var md metadata.MD
		_, err := client.GetTopology(authtest.Bearer(ctx, forged), &pb.GetTopologyRequest{}, grpc.Header(&md))
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
	if _, err := client.GetTopology(authtest.Bearer(ctx, admin), &pb.GetTopologyRequest{}); err != nil {
		t.Fatalf("a token verified before the flood: %v", err)
	}
	fresh := authtest.Sign(t, jwt.SigningMethodEdDSA, "ed", keys.Ed, authtest.Claims("admin", "other"))
	_, err = client.GetTopology(authtest.Bearer(ctx, fresh), &pb.GetTopologyRequest{})
	wantCode(t, err, codes.ResourceExhausted)
	waitUntil(t, "the address to be let through again", func() bool {
		_, err := client.GetTopology(authtest.Bearer(ctx, fresh), &pb.GetTopologyRequest{})
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
	v, err := auth.NewVerifier(auth.Options{Keys: hk, AnyIssuer: true, AnyAudience: true})
	if err != nil {
		t.Fatal(err)
	}
	tok := authtest.Sign(t, jwt.SigningMethodHS256, "", secret, jwt.MapClaims{"role": "service", "sub": "s", "exp": 4102444800})
	if p, err := v.Verify(context.Background(), tok); err != nil || p.Role != auth.RoleService {
		t.Fatalf("HS256 with an HS256 key: %v", err)
	}
	// The same token against Ed25519 keys: refused.
	keys := authtest.NewKeys(t)
	if _, err := keys.Verifier(t).Verify(context.Background(), tok); err == nil {
		t.Fatal("HS256 token accepted by an asymmetric verifier")
	}
}

func TestJWKSRotation(t *testing.T) {
	keys := authtest.NewKeys(t)
	_, next, _ := ed25519.GenerateKey(rand.Reader)
	var fetches atomic.Int32
	var rotated atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		set := []any{jwkOf(t, "k1", keys.Ed.Public())}
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
	v, err := auth.NewVerifier(auth.Options{Keys: j, AnyIssuer: true, AnyAudience: true})
	if err != nil {
		t.Fatal(err)
	}
	c := jwt.MapClaims{"role": "user", "sub": "alice", "exp": 4102444800}
	old := authtest.Sign(t, jwt.SigningMethodEdDSA, "k1", keys.Ed, c)
	if _, err := v.Verify(context.Background(), old); err != nil {
		t.Fatal(err)
	}
	rotated.Store(true)
	if _, err := v.Verify(context.Background(), authtest.Sign(t, jwt.SigningMethodEdDSA, "k2", next, c)); err != nil {
		t.Fatalf("token with the rotated key: %v", err)
	}
	before := fetches.Load()
	// Cached: verifying the same token again fetches nothing.
	if _, err := v.Verify(context.Background(), authtest.Sign(t, jwt.SigningMethodEdDSA, "k2", next, c)); err != nil || fetches.Load() != before {
		t.Fatalf("second verification: %v, %d fetches", err, fetches.Load()-before)
	}
	// The token signed with the withdrawn key was cached; it is refused now.
	if _, err := v.Verify(context.Background(), old); err == nil {
		t.Fatal("a cached token signed with a rotated-out key still verifies")
	}
}

// FuzzVerifyToken feeds arbitrary strings to the JWT verifier: it must
// never panic, and never accept anything but the one token signed with
// the trusted key (or a re-encoding of it), whose typ and lifetime pass.
func FuzzVerifyToken(f *testing.F) {
	keys := authtest.NewKeys(f)
	v, err := auth.NewVerifier(auth.Options{
		Keys:     keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.Ed.Public()}, "rs": {Alg: "RS256", Verify: &keys.RSA.PublicKey}},
		Issuer:   authtest.Issuer,
		Audience: authtest.Audience,
		// authtest's claims live an hour.
		MaxLifetime: time.Hour,
	})
	if err != nil {
		f.Fatal(err)
	}
	good := keys.Token(f, "admin", "ops")
	f.Add(good)
	for _, tok := range keys.BadTokens(f) {
		f.Add(tok)
	}
	f.Add("eyJhbGciOiJub25lIn0.e30.")
	f.Add("a.b.c")
	// typ: accepted spellings and refused ones.
	for _, typ := range []any{nil, "at+jwt", "application/JWT", "id+jwt", "JOSE", "", 7} {
		f.Add(signTyp(f, keys, typ, authtest.Claims("admin", "ops")))
	}
	// Lifetime: over the cap, and without iat.
	long := authtest.Claims("admin", "ops")
	long["exp"] = time.Now().Add(48 * time.Hour).Unix()
	f.Add(signTyp(f, keys, "JWT", long))
	noIat := authtest.Claims("admin", "ops")
	delete(noIat, "iat")
	f.Add(signTyp(f, keys, "JWT", noIat))
	f.Fuzz(func(t *testing.T, raw string) {
		p, err := v.Verify(context.Background(), raw)
		if err != nil {
			return
		}
		if p.Role != auth.RoleAdmin || p.Subject != "ops" {
			t.Fatalf("accepted %q as %+v", raw, p)
		}
		var claims jwt.MapClaims
		tok, _, err := jwt.NewParser().ParseUnverified(raw, &claims)
		if err != nil {
			t.Fatalf("accepted %q, which does not parse: %v", raw, err)
		}
		if typ, ok := tok.Header["typ"]; ok && typ != "JWT" && typ != "at+jwt" && typ != "application/JWT" {
			t.Fatalf("accepted %q with typ %#v", raw, typ)
		}
		iat, err1 := claims.GetIssuedAt()
		exp, err2 := claims.GetExpirationTime()
		if err1 != nil || err2 != nil || iat == nil || exp == nil || exp.Sub(iat.Time) > time.Hour {
			t.Fatalf("accepted %q with iat %v, exp %v", raw, iat, exp)
		}
	})
}

// signTyp signs c with the "ed" key, its "typ" header set to typ (removed
// when typ is nil).
func signTyp(t testing.TB, keys *authtest.Keys, typ any, c jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(jwt.SigningMethodEdDSA, c)
	tok.Header["kid"] = "ed"
	if typ == nil {
		delete(tok.Header, "typ")
	} else {
		tok.Header["typ"] = typ
	}
	s, err := tok.SignedString(keys.Ed)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// edVerifier trusts keys.Ed as "ed" and wants authtest's issuer and
// audience, with o's other options.
func edVerifier(t testing.TB, keys *authtest.Keys, o auth.Options) *auth.Verifier {
	t.Helper()
	o.Keys = keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.Ed.Public()}}
	if !o.AnyIssuer {
		o.Issuer = authtest.Issuer
	}
	if !o.AnyAudience {
		o.Audience = authtest.Audience
	}
	v, err := auth.NewVerifier(o)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// Leeway 0 forgives no skew: a token that expired a few seconds ago is
// refused, as is one valid from a few seconds on.
func TestZeroLeewayMeansZero(t *testing.T) {
	keys := authtest.NewKeys(t)
	expired := authtest.Claims("admin", "ops")
	expired["exp"] = time.Now().Add(-3 * time.Second).Unix()
	early := authtest.Claims("admin", "ops")
	early["nbf"] = time.Now().Add(5 * time.Second).Unix()
	for _, c := range []struct {
		leeway time.Duration
		ok     bool
	}{{0, false}, {30 * time.Second, true}} {
		v := edVerifier(t, keys, auth.Options{Leeway: c.leeway})
		for name, claims := range map[string]jwt.MapClaims{"expired 3s ago": expired, "valid in 5s": early} {
			_, err := v.Verify(context.Background(), signTyp(t, keys, "JWT", claims))
			if (err == nil) != c.ok {
				t.Errorf("leeway %v, token %s: %v", c.leeway, name, err)
			}
		}
	}
	if _, err := auth.NewVerifier(auth.Options{Keys: keyset.Static{}, AnyIssuer: true, AnyAudience: true, Leeway: -time.Second}); err == nil {
		t.Error("negative leeway accepted")
	}
}

// Issuer and audience are required unless explicitly waived; when set, a
// token for another issuer or audience, or without them, is refused.
func TestIssuerAndAudienceRequired(t *testing.T) {
	keys := authtest.NewKeys(t)
	ks := keyset.Static{"ed": {Alg: "EdDSA", Verify: keys.Ed.Public()}}
	for name, o := range map[string]auth.Options{
		"neither":               {Keys: ks},
		"no audience":           {Keys: ks, Issuer: authtest.Issuer},
		"no issuer":             {Keys: ks, Audience: authtest.Audience},
		"issuer and any issuer": {Keys: ks, Issuer: authtest.Issuer, AnyIssuer: true, Audience: authtest.Audience},
		"audience and any":      {Keys: ks, Issuer: authtest.Issuer, Audience: authtest.Audience, AnyAudience: true},
	} {
		if _, err := auth.NewVerifier(o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	v := edVerifier(t, keys, auth.Options{})
	otherIss := authtest.Claims("admin", "ops")
	otherIss["iss"] = "https://other.test"
	noIss := authtest.Claims("admin", "ops")
	delete(noIss, "iss")
	otherAud := authtest.Claims("admin", "ops")
	otherAud["aud"] = []string{"another-service"}
	noAud := authtest.Claims("admin", "ops")
	delete(noAud, "aud")
	manyAud := authtest.Claims("admin", "ops")
	manyAud["aud"] = []string{"another-service", authtest.Audience}
	for name, c := range map[string]struct {
		claims jwt.MapClaims
		ok     bool
	}{
		"right":          {authtest.Claims("admin", "ops"), true},
		"aud among many": {manyAud, true},
		"other issuer":   {otherIss, false},
		"no issuer":      {noIss, false},
		"other audience": {otherAud, false},
		"no audience":    {noAud, false},
	} {
		if _, err := v.Verify(context.Background(), signTyp(t, keys, "JWT", c.claims)); (err == nil) != c.ok {
			t.Errorf("%s: %v", name, err)
		}
	}
	// Waived: any issuer and audience, or none, will do.
	any := edVerifier(t, keys, auth.Options{AnyIssuer: true, AnyAudience: true})
	for name, c := range map[string]jwt.MapClaims{"other issuer": otherIss, "no audience": noAud} {
		if _, err := any.Verify(context.Background(), signTyp(t, keys, "JWT", c)); err != nil {
			t.Errorf("waived, %s: %v", name, err)
		}
	}
}

// With MaxLifetime, a token whose exp - iat is longer, or that has no
// iat, is refused; without it, both pass.
func TestMaxLifetime(t *testing.T) {
	keys := authtest.NewKeys(t)
	now := time.Now()
	lifetime := func(d time.Duration) jwt.MapClaims {
		c := authtest.Claims("service", "svc")
		c["iat"], c["exp"] = now.Unix(), now.Add(d).Unix()
		return c
	}
	noIat := lifetime(time.Minute)
	delete(noIat, "iat")
	limited := edVerifier(t, keys, auth.Options{MaxLifetime: time.Hour})
	unlimited := edVerifier(t, keys, auth.Options{})
	iatBefore := lifetime(time.Minute)
	iatBefore["iat"] = now.Add(-2 * time.Hour).Unix()
	for name, c := range map[string]struct {
		claims      jwt.MapClaims
		ok, okNoMax bool
	}{
		"1h":        {lifetime(time.Hour), true, true},
		"5m":        {lifetime(5 * time.Minute), true, true},
		"1h and 1s": {lifetime(time.Hour + time.Second), false, true},
		"a year":    {lifetime(365 * 24 * time.Hour), false, true},
		"no iat":    {noIat, false, true},
		// Issued 2h ago, expiring in a minute: its lifetime is what counts.
		"issued 2h ago": {iatBefore, false, true},
	} {
		tok := signTyp(t, keys, "JWT", c.claims)
		if _, err := limited.Verify(context.Background(), tok); (err == nil) != c.ok {
			t.Errorf("max 1h, %s: %v", name, err)
		}
		if _, err := unlimited.Verify(context.Background(), tok); (err == nil) != c.okNoMax {
			t.Errorf("no max, %s: %v", name, err)
		}
	}
	if _, err := auth.NewVerifier(auth.Options{Keys: keyset.Static{}, AnyIssuer: true, AnyAudience: true, MaxLifetime: -time.Hour}); err == nil {
		t.Error("negative maximum lifetime accepted")
	}
}

// A "typ" header, when present, must say JWT or at+jwt (any case, with or
// without "application/"); a token minted as something else is refused.
func TestTypHeader(t *testing.T) {
	keys := authtest.NewKeys(t)
	v := edVerifier(t, keys, auth.Options{})
	for typ, ok := range map[any]bool{
		nil:                  true,
		"JWT":                true,
		"jwt":                true,
		"at+jwt":             true,
		"AT+JWT":             true,
		"application/at+jwt": true,
		"Application/JWT":    true,
		"id+jwt":             false,
		"logout+jwt":         false,
		"JOSE":               false,
		"":                   false,
		"application/":       false,
		"secevent+jwt":       false,
		float64(1):           false,
	} {
		_, err := v.Verify(context.Background(), signTyp(t, keys, typ, authtest.Claims("admin", "ops")))
		if (err == nil) != ok {
			t.Errorf("typ %#v: %v", typ, err)
		}
	}
}
