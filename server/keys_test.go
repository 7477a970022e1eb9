package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/golang-jwt/jwt/v5"
)

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

func TestParseKeys(t *testing.T) {
	keys := newTestKeys(t)
	edDER, _ := x509.MarshalPKCS8PrivateKey(keys.ed)
	edPub, _ := x509.MarshalPKIXPublicKey(keys.ed.Public())
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)

	pemKeys, err := ParseKeys(append(append(
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: edDER}),
		keys.rsaPEM...),
		pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Headers: map[string]string{"kid": "named"}, Bytes: edPub})...))
	if err != nil {
		t.Fatal(err)
	}
	kid, _ := KeyID(keys.ed.Public())
	rkid, _ := KeyID(&keys.rsa.PublicKey)
	if pemKeys[kid].Alg != "EdDSA" || pemKeys[rkid].Alg != "RS256" || pemKeys["named"].Alg != "EdDSA" || len(pemKeys) != 3 {
		t.Fatalf("PEM keys: %+v", pemKeys)
	}

	set, _ := json.Marshal(map[string]any{"keys": []any{
		jwkOf(t, "e", keys.ed.Public()), jwkOf(t, "p", &ec.PublicKey),
		map[string]string{"kty": "RSA", "kid": "r", "alg": "RS256", "n": base64.RawURLEncoding.EncodeToString(keys.rsa.N.Bytes()),
			"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(keys.rsa.E)).Bytes())},
	}})
	jwks, err := ParseKeys(set)
	if err != nil {
		t.Fatal(err)
	}
	if jwks["e"].Alg != "EdDSA" || jwks["p"].Alg != "ES256" || jwks["r"].Alg != "RS256" {
		t.Fatalf("JWK set: %+v", jwks)
	}

	for name, bad := range map[string]string{
		"oct":          `{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}`,
		"alg mismatch": `{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"HS256","x":"` + base64.RawURLEncoding.EncodeToString(keys.ed.Public().(ed25519.PublicKey)) + `"}]}`,
		"bad curve":    `{"keys":[{"kty":"EC","crv":"P-384","x":"AA","y":"AA"}]}`,
		"not on curve": `{"keys":[{"kty":"EC","crv":"P-256","x":"` + base64.RawURLEncoding.EncodeToString(make([]byte, 32)) + `","y":"` + base64.RawURLEncoding.EncodeToString(make([]byte, 32)) + `"}]}`,
		"empty":        ``,
		"garbage":      `hello`,
		"no sig keys":  `{"keys":[]}`,
	} {
		if _, err := ParseKeys([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := HMACKey([]byte("short")); err == nil {
		t.Error("short HS256 secret accepted")
	}
}

func TestHS256OnlyWhenConfigured(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	hk, err := HMACKey(secret)
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
	j := &JWKSKeys{URL: srv.URL, MinRefetch: 1}
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
