// Package keyset holds the keys JWTs are verified with: each pinned to one
// algorithm, found by "kid", read from PEM or a JWK set, fetched from a
// JWKS URL, or an explicitly chosen HS256 secret. It needs nothing but the
// standard library, so a command that only names or reads keys stays small.
package keyset

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"
)

// Key is one JWT verification key, pinned to one algorithm.
type Key struct {
	// Alg is the only "alg" a token signed with this key may name.
	Alg string
	// Verify is what golang-jwt verifies with: ed25519.PublicKey,
	// *rsa.PublicKey, *ecdsa.PublicKey, or []byte for HS256.
	Verify any
}

// Source finds the key a token names by its "kid".
type Source interface {
	Key(ctx context.Context, kid string) (Key, error)
	// Algorithms lists every algorithm a key of this source may pin.
	Algorithms() []string
}

// Equal reports whether k and o are the same key for the same algorithm.
func (k Key) Equal(o Key) bool {
	if k.Alg != o.Alg {
		return false
	}
	if pub, ok := k.Verify.(interface{ Equal(crypto.PublicKey) bool }); ok {
		return pub.Equal(o.Verify)
	}
	a, ok1 := k.Verify.([]byte)
	b, ok2 := o.Verify.([]byte)
	return ok1 && ok2 && hmac.Equal(a, b)
}

var errUnknownKey = errors.New("unknown key")

// Static is a fixed set of keys by kid. A token without a kid uses the
// only key when there is exactly one.
type Static map[string]Key

// Key implements Source.
func (s Static) Key(_ context.Context, kid string) (Key, error) {
	if k, ok := s[kid]; ok {
		return k, nil
	}
	if kid == "" && len(s) == 1 {
		for _, k := range s {
			return k, nil
		}
	}
	return Key{}, errUnknownKey
}

// Algorithms implements Source.
func (s Static) Algorithms() []string {
	var algs []string
	for _, k := range s {
		if !slices.Contains(algs, k.Alg) {
			algs = append(algs, k.Alg)
		}
	}
	slices.Sort(algs)
	return algs
}

// KeyID names a public key: the first 16 characters of the base64url
// SHA-256 of its PKIX encoding. PEM keys without a "kid" header get it,
// and `shardctl token mint` puts it in the tokens it signs.
func KeyID(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	return base64.RawURLEncoding.EncodeToString(sum[:])[:16], nil
}

// publicKey turns a verification key into a pinned Key: Ed25519 → EdDSA,
// RSA (≥ 2048 bits) → RS256, ECDSA P-256 → ES256.
func publicKey(pub any) (Key, error) {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		return Key{Alg: "EdDSA", Verify: k}, nil
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return Key{}, fmt.Errorf("RSA key of %d bits; want at least 2048", k.N.BitLen())
		}
		return Key{Alg: "RS256", Verify: k}, nil
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return Key{}, errors.New("ECDSA key not on P-256 (only ES256 is accepted)")
		}
		return Key{Alg: "ES256", Verify: k}, nil
	}
	return Key{}, fmt.Errorf("unsupported key type %T", pub)
}

// Parse reads verification keys from PEM (PUBLIC KEY, PRIVATE KEY in
// PKCS#8, or CERTIFICATE blocks; a "kid" PEM header names a key, KeyID
// otherwise) or from a JWK set (or one JWK) in JSON. Symmetric ("oct")
// JWKs are refused: HS256 is configured on its own (HMAC).
func Parse(data []byte) (Static, error) {
	keys := Static{}
	if trimmed := trimSpace(data); len(trimmed) > 0 && trimmed[0] == '{' {
		return parseJWKS(trimmed)
	}
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		var pub any
		switch block.Type {
		case "PUBLIC KEY":
			k, err := x509.ParsePKIXPublicKey(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("PEM public key: %w", err)
			}
			pub = k
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("PEM private key: %w", err)
			}
			s, ok := k.(crypto.Signer)
			if !ok {
				return nil, errors.New("PEM private key cannot sign")
			}
			pub = s.Public()
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("PEM certificate: %w", err)
			}
			pub = c.PublicKey
		default:
			continue
		}
		k, err := publicKey(pub)
		if err != nil {
			return nil, err
		}
		kid := block.Headers["kid"]
		if kid == "" {
			if kid, err = KeyID(pub); err != nil {
				return nil, err
			}
		}
		keys[kid] = k
	}
	if len(keys) == 0 {
		return nil, errors.New("no keys found (want PEM public keys, certificates, PKCS#8 private keys or a JWK set)")
	}
	return keys, nil
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\n' || b[0] == '\r' || b[0] == '\t') {
		b = b[1:]
	}
	return b
}

type jwk struct {
	Kty string `json:"kty"`
	Crv string `json:"crv"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Use string `json:"use"`
	X   string `json:"x"`
	Y   string `json:"y"`
	N   string `json:"n"`
	E   string `json:"e"`
}

func parseJWKS(data []byte) (Static, error) {
	var set struct {
		Keys []jwk `json:"keys"`
	}
	if err := json.Unmarshal(data, &set); err != nil {
		return nil, fmt.Errorf("JWK set: %w", err)
	}
	if set.Keys == nil {
		var one jwk
		if err := json.Unmarshal(data, &one); err != nil {
			return nil, fmt.Errorf("JWK: %w", err)
		}
		set.Keys = []jwk{one}
	}
	keys := Static{}
	for i, j := range set.Keys {
		if j.Use == "enc" {
			continue
		}
		pub, err := j.public()
		if err != nil {
			return nil, fmt.Errorf("JWK %d (kid %q): %w", i, j.Kid, err)
		}
		k, err := publicKey(pub)
		if err != nil {
			return nil, fmt.Errorf("JWK %d (kid %q): %w", i, j.Kid, err)
		}
		if j.Alg != "" && j.Alg != k.Alg {
			return nil, fmt.Errorf("JWK %d (kid %q): alg %q does not fit a %s key", i, j.Kid, j.Alg, j.Kty)
		}
		kid := j.Kid
		if kid == "" {
			if kid, err = KeyID(pub); err != nil {
				return nil, err
			}
		}
		keys[kid] = k
	}
	if len(keys) == 0 {
		return nil, errors.New("JWK set holds no signature keys")
	}
	return keys, nil
}

func (j jwk) public() (any, error) {
	b64 := func(s string) ([]byte, error) { return base64.RawURLEncoding.DecodeString(s) }
	switch j.Kty {
	case "OKP":
		x, err := b64(j.X)
		if err != nil || j.Crv != "Ed25519" || len(x) != ed25519.PublicKeySize {
			return nil, errors.New("OKP key is not a valid Ed25519 key")
		}
		return ed25519.PublicKey(x), nil
	case "RSA":
		n, err1 := b64(j.N)
		e, err2 := b64(j.E)
		if err1 != nil || err2 != nil || len(e) == 0 || len(e) > 4 {
			return nil, errors.New("RSA key has a bad n or e")
		}
		return &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}, nil
	case "EC":
		x, err1 := b64(j.X)
		y, err2 := b64(j.Y)
		if err1 != nil || err2 != nil || j.Crv != "P-256" || len(x) != 32 || len(y) != 32 {
			return nil, errors.New("EC key is not a valid P-256 key")
		}
		// Uncompressed point form, which ecdsa.ParseUncompressedPublicKey
		// checks is on the curve.
		pt := append(append([]byte{4}, x...), y...)
		return ecdsa.ParseUncompressedPublicKey(elliptic.P256(), pt)
	case "oct":
		return nil, errors.New("symmetric keys are not accepted in a key set; configure HS256 explicitly")
	}
	return nil, fmt.Errorf("unsupported kty %q", j.Kty)
}

// HMAC returns an HS256 key source from a shared secret (at least 32
// bytes). Only for deployments that explicitly choose HS256.
func HMAC(secret []byte) (Static, error) {
	if len(secret) < 32 {
		return nil, fmt.Errorf("HS256 secret of %d bytes; want at least 32", len(secret))
	}
	return Static{"": {Alg: "HS256", Verify: secret}}, nil
}

// JWKS fetches a JWK set from a URL, keeps it for Refresh, and fetches
// again (at most every MinRefetch) when a token names a kid it does not
// know, so a key rotation at the issuer is picked up at once. When a fetch
// fails the last good set stays in use.
type JWKS struct {
	URL        string
	Client     *http.Client  // default: 10s timeout
	Refresh    time.Duration // default 10 minutes
	MinRefetch time.Duration // default 30s

	mu        sync.Mutex
	keys      Static
	fetchedAt time.Time
	triedAt   time.Time
}

// Algorithms implements Source: any asymmetric algorithm; each key pins
// its own.
func (j *JWKS) Algorithms() []string { return []string{"ES256", "EdDSA", "RS256"} }

// Key implements Source.
func (j *JWKS) Key(ctx context.Context, kid string) (Key, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	refresh := j.Refresh
	if refresh <= 0 {
		refresh = 10 * time.Minute
	}
	minRefetch := j.MinRefetch
	if minRefetch <= 0 {
		minRefetch = 30 * time.Second
	}
	now := time.Now()
	stale := j.keys == nil || now.Sub(j.fetchedAt) > refresh
	if k, err := j.keys.Key(ctx, kid); err == nil && !stale {
		return k, nil
	}
	if now.Sub(j.triedAt) >= minRefetch || j.keys == nil && now.Sub(j.triedAt) >= time.Second {
		j.triedAt = now
		if keys, err := j.fetch(ctx); err == nil {
			j.keys, j.fetchedAt = keys, now
		}
	}
	if j.keys == nil {
		return Key{}, errUnknownKey
	}
	return j.keys.Key(ctx, kid)
}

// Fetch loads the key set now; serve calls it once at start so a wrong URL
// fails fast.
func (j *JWKS) Fetch(ctx context.Context) error {
	keys, err := j.fetch(ctx)
	if err != nil {
		return err
	}
	j.mu.Lock()
	j.keys, j.fetchedAt, j.triedAt = keys, time.Now(), time.Now()
	j.mu.Unlock()
	return nil
}

func (j *JWKS) fetch(ctx context.Context) (Static, error) {
	c := j.Client
	if c == nil {
		c = &http.Client{Timeout: 10 * time.Second}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, j.URL, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch JWKS: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch JWKS: HTTP %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("fetch JWKS: %w", err)
	}
	return parseJWKS(trimSpace(body))
}

// LoadFile reads Parse input from a file.
func LoadFile(path string) (Static, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	keys, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return keys, nil
}
