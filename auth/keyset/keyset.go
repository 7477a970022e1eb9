// Package keyset holds the keys JWTs are verified with: each pinned to one
// algorithm, found by "kid", read from PEM or a JWK set, fetched from a
// JWKS URL (refetched on rotation) or from a file (reloaded when it
// changes), or an explicitly chosen HS256 secret. It needs nothing but the
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
	"log/slog"
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
// otherwise) or from a JWK set (or one JWK) in JSON.
//
// A key Shardgate cannot use is skipped and reported in skipped, naming
// it, so that one odd key (another curve, a short RSA key, a symmetric
// "oct" JWK — HS256 is configured on its own, see HMAC) does not keep the
// others from loading. A block or set that does not decode at all, or one
// without a single usable key, is an error.
func Parse(data []byte) (keys Static, skipped []error, err error) {
	keys = Static{}
	if trimmed := trimSpace(data); len(trimmed) > 0 && trimmed[0] == '{' {
		return parseJWKS(trimmed)
	}
	for rest, i := data, 0; ; i++ {
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
				return nil, nil, fmt.Errorf("PEM block %d: public key: %w", i+1, err)
			}
			pub = k
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
			if err != nil {
				return nil, nil, fmt.Errorf("PEM block %d: private key: %w", i+1, err)
			}
			s, ok := k.(crypto.Signer)
			if !ok {
				return nil, nil, fmt.Errorf("PEM block %d: private key cannot sign", i+1)
			}
			pub = s.Public()
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, nil, fmt.Errorf("PEM block %d: certificate: %w", i+1, err)
			}
			pub = c.PublicKey
		default:
			continue
		}
		kid := block.Headers["kid"]
		k, err := publicKey(pub)
		if err != nil {
			skipped = append(skipped, fmt.Errorf("PEM block %d (kid %q): %w", i+1, kid, err))
			continue
		}
		if kid == "" {
			if kid, err = KeyID(pub); err != nil {
				return nil, nil, err
			}
		}
		keys[kid] = k
	}
	if len(keys) == 0 {
		if len(skipped) > 0 {
			return nil, skipped, fmt.Errorf("no usable keys: %w", errors.Join(skipped...))
		}
		return nil, nil, errors.New("no keys found (want PEM public keys, certificates, PKCS#8 private keys or a JWK set)")
	}
	return keys, skipped, nil
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

func parseJWKS(data []byte) (Static, []error, error) {
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(data, &set); err != nil {
		return nil, nil, fmt.Errorf("JWK set: %w", err)
	}
	if set.Keys == nil {
		set.Keys = []json.RawMessage{data}
	}
	keys := Static{}
	var skipped []error
	for i, raw := range set.Keys {
		var j jwk
		if err := json.Unmarshal(raw, &j); err != nil {
			skipped = append(skipped, fmt.Errorf("JWK %d: %w", i, err))
			continue
		}
		if j.Use == "enc" {
			continue
		}
		kid, k, err := j.key()
		if err != nil {
			skipped = append(skipped, fmt.Errorf("JWK %d (kid %q): %w", i, j.Kid, err))
			continue
		}
		keys[kid] = k
	}
	if len(keys) == 0 {
		if len(skipped) > 0 {
			return nil, skipped, fmt.Errorf("JWK set holds no usable signature keys: %w", errors.Join(skipped...))
		}
		return nil, nil, errors.New("JWK set holds no signature keys")
	}
	return keys, skipped, nil
}

// key returns the JWK's kid (KeyID when it names none) and pinned key.
func (j jwk) key() (string, Key, error) {
	pub, err := j.public()
	if err != nil {
		return "", Key{}, err
	}
	k, err := publicKey(pub)
	if err != nil {
		return "", Key{}, err
	}
	if j.Alg != "" && j.Alg != k.Alg {
		return "", Key{}, fmt.Errorf("alg %q does not fit a %s key", j.Alg, j.Kty)
	}
	kid := j.Kid
	if kid == "" {
		if kid, err = KeyID(pub); err != nil {
			return "", Key{}, err
		}
	}
	return kid, k, nil
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

// JWKS fetches a JWK set from a URL and keeps it, fetching again every
// Refresh and when a token names a kid it does not know (at most every
// MinRefetch), so a key rotation at the issuer is picked up at once.
//
// Lookups never wait for a fetch they do not need: one fetch runs at a
// time, outside the lock, and lookups of known keys go on using the
// current set meanwhile; only a lookup of an unknown kid waits for the
// fetch it joined (or its own context). When a fetch fails the last good
// set stays in use, up to MaxAge after it was fetched: past that it is no
// longer trusted (a key the issuer withdrew must not stay valid because
// its endpoint is down), and every lookup fails until a fetch succeeds.
type JWKS struct {
	URL        string
	Client     *http.Client  // default: 10s timeout
	Refresh    time.Duration // default 10 minutes
	MinRefetch time.Duration // default 30s
	MaxAge     time.Duration // default 24 hours
	Logger     *slog.Logger  // default slog.Default()

	now func() time.Time // tests set a clock

	mu          sync.Mutex
	keys        Static
	fetchedAt   time.Time
	triedAt     time.Time
	flight      chan struct{} // non-nil while a fetch runs; closed when it ends
	lastSkipped string        // the skipped keys last logged as a warning
}

// errTooOld is a lookup's error once the set outlived MaxAge.
var errTooOld = errors.New("JWK set not refreshed within its maximum age; refusing its keys until a fetch succeeds")

// Algorithms implements Source: any asymmetric algorithm; each key pins
// its own.
func (j *JWKS) Algorithms() []string { return []string{"ES256", "EdDSA", "RS256"} }

func (j *JWKS) clock() time.Time {
	if j.now != nil {
		return j.now()
	}
	return time.Now()
}

func (j *JWKS) log() *slog.Logger {
	if j.Logger != nil {
		return j.Logger
	}
	return slog.Default()
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// Key implements Source.
func (j *JWKS) Key(ctx context.Context, kid string) (Key, error) {
	maxAge := orDefault(j.MaxAge, 24*time.Hour)
	j.mu.Lock()
	now := j.clock()
	usable := j.keys != nil && now.Sub(j.fetchedAt) <= maxAge
	k, err := j.keys.Key(ctx, kid)
	found := usable && err == nil
	var flight chan struct{}
	if !found || now.Sub(j.fetchedAt) > orDefault(j.Refresh, 10*time.Minute) {
		flight = j.startFetchLocked(now, usable)
	}
	j.mu.Unlock()
	if found {
		// A due refresh runs in the background.
		return k, nil
	}
	if flight != nil {
		select {
		case <-flight:
		case <-ctx.Done():
			return Key{}, ctx.Err()
		}
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.keys == nil {
		return Key{}, errUnknownKey
	}
	if j.clock().Sub(j.fetchedAt) > maxAge {
		return Key{}, errTooOld
	}
	return j.keys.Key(ctx, kid)
}

// startFetchLocked returns the channel of the running fetch, or starts
// one if the last began at least MinRefetch ago (a second, while the set
// is missing or too old), or returns nil.
func (j *JWKS) startFetchLocked(now time.Time, usable bool) chan struct{} {
	if j.flight != nil {
		return j.flight
	}
	wait := orDefault(j.MinRefetch, 30*time.Second)
	if !usable {
		wait = min(wait, time.Second)
	}
	if !j.triedAt.IsZero() && now.Sub(j.triedAt) < wait {
		return nil
	}
	j.triedAt = now
	flight := make(chan struct{})
	j.flight = flight
	go func() {
		defer close(flight)
		// Not the caller's context: the fetch serves every lookup, and
		// must not end because the call that started it did.
		keys, skipped, err := j.fetch(context.Background())
		j.mu.Lock()
		defer j.mu.Unlock()
		j.flight = nil
		if err != nil {
			maxAge := orDefault(j.MaxAge, 24*time.Hour)
			switch {
			case j.keys == nil:
				j.log().Warn("JWKS fetch failed; no keys yet", "url", j.URL, "err", err)
			case j.clock().Sub(j.fetchedAt) > maxAge:
				j.log().Error("JWKS fetch failed, and the last good set is older than its maximum age: every token is refused until a fetch succeeds",
					"url", j.URL, "fetched_at", j.fetchedAt, "max_age", maxAge, "err", err)
			default:
				j.log().Warn("JWKS fetch failed; keeping the last good set until its maximum age",
					"url", j.URL, "fetched_at", j.fetchedAt, "refused_after", j.fetchedAt.Add(maxAge), "err", err)
			}
			return
		}
		j.setLocked(keys, skipped, j.clock())
	}()
	return flight
}

// setLocked installs a fetched set and logs keys it skipped: as a warning
// when they differ from the last ones warned about, so a key the issuer
// keeps publishing does not warn every Refresh.
func (j *JWKS) setLocked(keys Static, skipped []error, now time.Time) {
	j.keys, j.fetchedAt = keys, now
	summary := errors.Join(skipped...)
	text := ""
	if summary != nil {
		text = summary.Error()
	}
	switch {
	case text == "":
	case text != j.lastSkipped:
		for _, err := range skipped {
			j.log().Warn("JWKS key skipped: not usable by Shardgate", "url", j.URL, "err", err)
		}
	default:
		j.log().Debug("JWKS keys skipped, as before", "url", j.URL, "skipped", len(skipped))
	}
	j.lastSkipped = text
}

// Fetch loads the key set now; serve calls it once at start so a wrong URL
// fails fast.
func (j *JWKS) Fetch(ctx context.Context) error {
	keys, skipped, err := j.fetch(ctx)
	if err != nil {
		return err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	now := j.clock()
	j.triedAt = now
	j.setLocked(keys, skipped, now)
	return nil
}

func (j *JWKS) fetch(ctx context.Context) (Static, []error, error) {
	c := j.Client
	if c == nil {
		c = &http.Client{Timeout: 10 * time.Second}
	}
	if c.Timeout <= 0 {
		// The fetch blocks lookups of unknown kids: never for ever.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, j.URL, nil)
	if err != nil {
		return nil, nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("fetch JWKS: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("fetch JWKS: HTTP %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, nil, fmt.Errorf("fetch JWKS: %w", err)
	}
	return parseJWKS(trimSpace(body))
}

// File is a key set read from a file in Parse's formats, and read again
// when the file's modification time or size changes (checked at most once
// a second, on lookups), so keys rotate without a restart, as TLS
// certificates do. A changed file that does not load keeps the previous
// keys and is logged (once per change); write the new file and rename it
// into place.
type File struct {
	path string
	log  *slog.Logger
	now  func() time.Time // tests set a clock

	mu       sync.Mutex
	keys     Static
	stamp    string // modification time and size of the file loaded
	badStamp string // of the last file that failed to load
	checked  time.Time
}

// LoadFile reads a key file and returns it as a Source that follows the
// file's changes. Keys it skips are logged (log nil: slog.Default()).
func LoadFile(path string, log *slog.Logger) (*File, error) {
	if log == nil {
		log = slog.Default()
	}
	f := &File{path: path, log: log}
	stamp, keys, skipped, err := f.load()
	if err != nil {
		return nil, err
	}
	for _, err := range skipped {
		log.Warn("JWT key skipped: not usable by Shardgate", "file", path, "err", err)
	}
	f.keys, f.stamp, f.checked = keys, stamp, f.clock()
	return f, nil
}

func (f *File) clock() time.Time {
	if f.now != nil {
		return f.now()
	}
	return time.Now()
}

// stampOf fingerprints the file by modification time and size.
func stampOf(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d/%d", fi.ModTime().UnixNano(), fi.Size()), nil
}

func (f *File) load() (stamp string, keys Static, skipped []error, err error) {
	if stamp, err = stampOf(f.path); err != nil {
		return "", nil, nil, err
	}
	data, err := os.ReadFile(f.path)
	if err != nil {
		return stamp, nil, nil, err
	}
	keys, skipped, err = Parse(data)
	if err != nil {
		return stamp, nil, skipped, fmt.Errorf("%s: %w", f.path, err)
	}
	return stamp, keys, skipped, nil
}

// Algorithms implements Source: any asymmetric algorithm, since a reload
// may bring keys of another type; each key pins its own.
func (f *File) Algorithms() []string { return []string{"ES256", "EdDSA", "RS256"} }

// Key implements Source.
func (f *File) Key(ctx context.Context, kid string) (Key, error) {
	f.mu.Lock()
	now := f.clock()
	check := now.Sub(f.checked) >= time.Second
	if check {
		f.checked = now
	}
	keys := f.keys
	f.mu.Unlock()
	if check {
		keys = f.reload()
	}
	return keys.Key(ctx, kid)
}

// reload loads the file if it changed since it was loaded (or last failed
// to), and returns the keys in use.
func (f *File) reload() Static {
	f.mu.Lock()
	stamp, bad, keys := f.stamp, f.badStamp, f.keys
	f.mu.Unlock()
	now, err := stampOf(f.path)
	if err != nil {
		now = "error: " + err.Error()
	}
	if now == stamp || now == bad {
		return keys
	}
	newStamp, newKeys, skipped, err := f.load()
	f.mu.Lock()
	defer f.mu.Unlock()
	if err != nil {
		f.badStamp = now
		f.log.Warn("JWT key file changed but cannot be loaded; keeping the previous keys", "file", f.path, "err", err)
		return f.keys
	}
	for _, err := range skipped {
		f.log.Warn("JWT key skipped: not usable by Shardgate", "file", f.path, "err", err)
	}
	f.keys, f.stamp, f.badStamp = newKeys, newStamp, ""
	f.log.Info("JWT key file reloaded", "file", f.path, "keys", len(newKeys))
	return newKeys
}
