// Package authtest provides keys, tokens and verifiers for tests of code
// behind the auth interceptors, as net/http/httptest does for HTTP.
package authtest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc/metadata"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/auth/keyset"
)

// The issuer and audience Verifier requires and Claims sets.
const (
	Issuer   = "https://issuer.test"
	Audience = "shardgate-test"
)

// Keys are the keys of an auth test: an Ed25519 and an RSA key the server
// trusts, and an Ed25519 key it does not.
type Keys struct {
	Ed       ed25519.PrivateKey // kid "ed"
	RSA      *rsa.PrivateKey    // kid "rs"
	RSAPEM   []byte             // the RSA public key, as an attacker could fetch it
	Stranger ed25519.PrivateKey
}

// NewKeys makes fresh keys.
func NewKeys(t testing.TB) *Keys {
	t.Helper()
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	return &Keys{Ed: ed, RSA: rk, Stranger: stranger, RSAPEM: pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})}
}

// Verifier trusts Ed and RSA, and wants Issuer and Audience.
func (k *Keys) Verifier(t testing.TB) *auth.Verifier {
	t.Helper()
	v, err := auth.NewVerifier(auth.Options{
		Keys:     keyset.Static{"ed": {Alg: "EdDSA", Verify: k.Ed.Public()}, "rs": {Alg: "RS256", Verify: &k.RSA.PublicKey}},
		Issuer:   Issuer,
		Audience: Audience,
		Leeway:   5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// Claims are valid claims for role and sub, expiring in an hour.
func Claims(role, sub string) jwt.MapClaims {
	now := time.Now()
	return jwt.MapClaims{"role": role, "sub": sub, "iss": Issuer, "aud": Audience,
		"iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
}

// Sign signs c with key by method m, naming kid unless it is empty.
func Sign(t testing.TB, m jwt.SigningMethod, kid string, key any, c jwt.MapClaims) string {
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

// Token is a valid token for role and sub, signed with Ed.
func (k *Keys) Token(t testing.TB, role, sub string) string {
	return Sign(t, jwt.SigningMethodEdDSA, "ed", k.Ed, Claims(role, sub))
}

// BadTokens are tokens, by what is wrong with them, that Verifier must
// refuse with Unauthenticated.
func (k *Keys) BadTokens(t testing.TB) map[string]string {
	expired := Claims("admin", "ops")
	expired["exp"] = time.Now().Add(-time.Hour).Unix()
	wrongAud := Claims("admin", "ops")
	wrongAud["aud"] = "someone-else"
	none, err := jwt.NewWithClaims(jwt.SigningMethodNone, Claims("admin", "ops")).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		t.Fatal(err)
	}
	noRole := Claims("", "ops")
	delete(noRole, "role")
	return map[string]string{
		"expired":         Sign(t, jwt.SigningMethodEdDSA, "ed", k.Ed, expired),
		"wrong audience":  Sign(t, jwt.SigningMethodEdDSA, "ed", k.Ed, wrongAud),
		"wrong signature": Sign(t, jwt.SigningMethodEdDSA, "ed", k.Stranger, Claims("admin", "ops")),
		"alg none":        none,
		// HS256 with the RSA public key as the secret: the classic confusion.
		"HS/RS confusion": Sign(t, jwt.SigningMethodHS256, "rs", k.RSAPEM, Claims("admin", "ops")),
		"no role":         Sign(t, jwt.SigningMethodEdDSA, "ed", k.Ed, noRole),
		"garbage":         "not.a.jwt",
	}
}

// Bearer returns ctx sending tok as "authorization: Bearer <tok>" on
// outgoing calls (ctx itself when tok is empty).
func Bearer(ctx context.Context, tok string) context.Context {
	if tok == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}
