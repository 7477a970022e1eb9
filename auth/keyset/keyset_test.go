package keyset

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"testing"
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

// testKeys are an Ed25519 and an RSA key, and the RSA public key in PEM.
type testKeys struct {
	ed     ed25519.PrivateKey
	rsa    *rsa.PrivateKey
	rsaPEM []byte
}

func newTestKeys(t testing.TB) *testKeys {
	t.Helper()
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	return &testKeys{ed: ed, rsa: rk, rsaPEM: pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})}
}

func TestParseKeys(t *testing.T) {
	keys := newTestKeys(t)
	edDER, _ := x509.MarshalPKCS8PrivateKey(keys.ed)
	edPub, _ := x509.MarshalPKIXPublicKey(keys.ed.Public())
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)

	pemKeys, _, err := Parse(append(append(
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
	jwks, _, err := Parse(set)
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
		if _, _, err := Parse([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// One usable key among odd ones: it loads, the others are reported.
	mixed, _ := json.Marshal(map[string]any{"keys": []any{
		jwkOf(t, "e", keys.ed.Public()),
		map[string]string{"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
		map[string]string{"kty": "EC", "crv": "P-384", "kid": "p", "x": "AA", "y": "AA"},
		"not an object",
	}})
	got, skipped, err := Parse(mixed)
	if err != nil || len(got) != 1 || got["e"].Alg != "EdDSA" || len(skipped) != 3 {
		t.Fatalf("mixed JWK set: %v keys, skipped %v, %v", got, skipped, err)
	}
	if _, err := HMAC([]byte("short")); err == nil {
		t.Error("short HS256 secret accepted")
	}
}

func FuzzParseKeys(f *testing.F) {
	keys := newTestKeys(f)
	f.Add(keys.rsaPEM)
	f.Add([]byte(`{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}`))
	f.Add([]byte(`{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}`))
	f.Add([]byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"))
	f.Add([]byte(`{"keys":[{"kty":"oct","k":"c2VjcmV0"},{"kty":"OKP","crv":"Ed25519","kid":"ok","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},7]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		ks, _, err := Parse(data)
		if err != nil {
			return
		}
		if len(ks) == 0 {
			t.Fatal("no error and no keys")
		}
		for kid, k := range ks {
			switch k.Alg {
			case "EdDSA", "RS256", "ES256":
			default:
				t.Fatalf("key %q pinned to %q", kid, k.Alg)
			}
		}
	})
}
