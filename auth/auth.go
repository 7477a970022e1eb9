// Package auth decides who is calling and what they may do: it verifies
// JWT bearer tokens (keys from keyset), throttles addresses that send
// failing tokens, puts the caller's Principal in the request context, and
// provides the gRPC interceptors that authenticate and authorize every
// call. The server wires the interceptors in; handlers read the caller
// with PrincipalFrom.
package auth

import (
	"context"
	"crypto/sha256"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shardgate/shardgate/auth/keyset"
	"github.com/shardgate/shardgate/ratelimit"
)

// Role is what a principal may do.
type Role string

// The roles a token's "role" claim may carry.
const (
	// RoleService acts for any user: the backends that call Shardgate.
	RoleService Role = "service"
	// RoleUser acts only for the user named by the token's subject.
	RoleUser Role = "user"
	// RoleAdmin may call everything, AdminService included.
	RoleAdmin Role = "admin"
)

// Principal is the authenticated caller of a request.
type Principal struct {
	Role Role
	// Subject is the token's "sub": for RoleUser, the only user_id it may
	// touch.
	Subject string
	// Anonymous is set on calls without a token where the server allows
	// them (no verifier, or dev mode); such calls act as RoleAdmin.
	Anonymous bool
	// Expires is the token's exp (zero for anonymous calls): a stream
	// opened with the token ends then.
	Expires time.Time
	// key names the principal in rate-limit keys.
	key string
}

type principalKey struct{}

// PrincipalFrom returns the caller of the request ctx belongs to.
func PrincipalFrom(ctx context.Context) (*Principal, bool) {
	p, ok := ctx.Value(principalKey{}).(*Principal)
	return p, ok
}

func withPrincipal(ctx context.Context, p *Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// Claims are the JWT claims Shardgate reads.
type Claims struct {
	jwt.RegisteredClaims
	Role string `json:"role"`
}

// maxSubject bounds "sub": for users it is a user_id (the API allows 128
// bytes); services and admins get the same bound so limiter keys stay small.
const maxSubject = 128

// validSubject reports whether sub is 1-128 bytes of [A-Za-z0-9._:@-]: the
// API's rule for a user_id, which a user principal's subject is.
func validSubject(sub string) bool {
	if sub == "" || len(sub) > maxSubject {
		return false
	}
	for i := 0; i < len(sub); i++ {
		c := sub[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '.' || c == '_' || c == ':' || c == '@' || c == '-') {
			return false
		}
	}
	return true
}

// principalFromClaims turns verified claims into a principal. A user's
// subject must be a valid user_id; every role needs a subject.
func principalFromClaims(c *Claims) (*Principal, error) {
	role := Role(c.Role)
	switch role {
	case RoleService, RoleUser, RoleAdmin:
	case "":
		return nil, errors.New("no role claim")
	default:
		return nil, errors.New("unknown role")
	}
	if c.Subject == "" {
		return nil, errors.New("no sub claim")
	}
	if !validSubject(c.Subject) {
		// Non-user subjects follow the same alphabet: they end up in
		// Redis keys and logs.
		return nil, errors.New("sub is not 1-128 bytes of [A-Za-z0-9._:@-]")
	}
	return &Principal{Role: role, Subject: c.Subject, key: string(role) + ":" + c.Subject}, nil
}

// maxBearer bounds the authorization header Shardgate reads.
const maxBearer = 8 << 10

// parseBearer returns the token of an "authorization: Bearer <token>"
// value. The scheme is case-insensitive (RFC 7235); the token must be
// non-empty and printable ASCII without spaces.
func parseBearer(h string) (string, bool) {
	if len(h) > maxBearer {
		return "", false
	}
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return "", false
	}
	tok = strings.TrimLeft(tok, " ")
	if tok == "" {
		return "", false
	}
	for i := 0; i < len(tok); i++ {
		if tok[i] <= ' ' || tok[i] >= 0x7f {
			return "", false
		}
	}
	return tok, true
}

// Options configure a Verifier.
type Options struct {
	// Keys resolves a token's key by its "kid" and pins its algorithm.
	Keys keyset.Source
	// Issuer and Audience must match "iss" and one of "aud". Each is
	// required unless AnyIssuer or AnyAudience says, explicitly, that any
	// value (or none) will do: otherwise a token the same identity
	// provider minted for another service would be accepted here.
	Issuer      string
	Audience    string
	AnyIssuer   bool
	AnyAudience bool
	// Leeway forgives clock skew on exp, nbf and iat; 0 forgives none.
	Leeway time.Duration
	// MaxLifetime, when positive, refuses tokens whose exp - iat is
	// longer, and tokens without iat: a stolen long-lived token cannot
	// be used here even though its issuer signed it.
	MaxLifetime time.Duration
	// AllowAnonymous lets calls without a token through as an anonymous
	// admin (dev mode on loopback). A token that is present is still
	// verified and enforced.
	AllowAnonymous bool
	// CacheSize bounds the verified-token cache (default 10000 entries;
	// negative: no cache, every call verifies its signature).
	CacheSize int
	// FailureRate bounds, per peer address, the tokens that fail
	// verification (default DefaultFailureRate). Past it, tokens that
	// are not already verified and cached are refused with
	// RESOURCE_EXHAUSTED before their signature is checked, so a flood of
	// forged tokens costs no more than this many checks. A zero PerSecond
	// turns it off.
	FailureRate ratelimit.Rate
	// NoFailureLimit turns FailureRate off.
	NoFailureLimit bool
}

// DefaultFailureRate is FailureRate's default: generous, because every
// client behind one proxy shares the proxy's address.
var DefaultFailureRate = ratelimit.Rate{PerSecond: 50, Burst: 500}

// Verifier checks bearer tokens and caches the ones it verified until they
// expire, so a client reusing its token pays one signature check.
type Verifier struct {
	opts   Options
	parser *jwt.Parser
	now    func() time.Time

	mu    sync.Mutex
	cache map[[32]byte]cachedPrincipal

	throttle *authThrottle // nil: failures are not limited

	peers peerCache
}

type cachedPrincipal struct {
	p   *Principal
	exp time.Time
	kid string
	key keyset.Key // the key that verified it: a rotated-out key ends the entry
}

// NewVerifier returns a Verifier. Tokens must carry exp. It refuses
// options that leave the issuer or the audience unchecked without saying
// so (AnyIssuer, AnyAudience).
func NewVerifier(o Options) (*Verifier, error) {
	if o.Keys == nil {
		return nil, errors.New("auth: no keys")
	}
	switch {
	case o.Issuer == "" && !o.AnyIssuer:
		return nil, errors.New("auth: no issuer (set Issuer, or AnyIssuer to accept any)")
	case o.Audience == "" && !o.AnyAudience:
		return nil, errors.New("auth: no audience (set Audience, or AnyAudience to accept any)")
	case o.Issuer != "" && o.AnyIssuer:
		return nil, errors.New("auth: Issuer and AnyIssuer both set")
	case o.Audience != "" && o.AnyAudience:
		return nil, errors.New("auth: Audience and AnyAudience both set")
	case o.Leeway < 0:
		return nil, errors.New("auth: negative leeway")
	case o.MaxLifetime < 0:
		return nil, errors.New("auth: negative maximum lifetime")
	}
	if o.CacheSize == 0 {
		o.CacheSize = 10000
	}
	popts := []jwt.ParserOption{
		jwt.WithValidMethods(o.Keys.Algorithms()),
		jwt.WithLeeway(o.Leeway),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
	}
	if o.Issuer != "" {
		popts = append(popts, jwt.WithIssuer(o.Issuer))
	}
	if o.Audience != "" {
		popts = append(popts, jwt.WithAudience(o.Audience))
	}
	v := &Verifier{opts: o, parser: jwt.NewParser(popts...), now: time.Now, cache: map[[32]byte]cachedPrincipal{}}
	if !o.NoFailureLimit {
		r := o.FailureRate
		if r.PerSecond <= 0 {
			r = DefaultFailureRate
		}
		v.throttle = newAuthThrottle(r)
	}
	return v, nil
}

// errBadToken is what callers learn about a token that fails: never the
// token, never which check failed beyond a short reason.
var errBadToken = errors.New("invalid token")

// cached returns the principal of a token verified before, if it is still
// valid and its key is still in the key set, unchanged: a token signed
// with a key the issuer withdrew stops working at once.
func (v *Verifier) cached(ctx context.Context, sum [32]byte, now time.Time) (*Principal, bool) {
	v.mu.Lock()
	c, ok := v.cache[sum]
	v.mu.Unlock()
	if !ok || !now.Before(c.exp) {
		return nil, false
	}
	if k, err := v.opts.Keys.Key(ctx, c.kid); err == nil && k.Equal(c.key) {
		return c.p, true
	}
	v.mu.Lock()
	delete(v.cache, sum)
	v.mu.Unlock()
	return nil, false
}

// Verify checks a raw JWT and returns its principal.
func (v *Verifier) Verify(ctx context.Context, raw string) (*Principal, error) {
	sum := sha256.Sum256([]byte(raw))
	now := v.now()
	if p, ok := v.cached(ctx, sum, now); ok {
		return p, nil
	}
	var claims Claims
	var kid string
	var key keyset.Key
	tok, err := v.parser.ParseWithClaims(raw, &claims, func(t *jwt.Token) (any, error) {
		kid, _ = t.Header["kid"].(string)
		k, err := v.opts.Keys.Key(ctx, kid)
		if err != nil {
			return nil, err
		}
		key = k
		// Pin the algorithm to the key: an RSA public key offered as an
		// HMAC secret, or "none", never verifies.
		if t.Method.Alg() != k.Alg {
			return nil, errors.New("algorithm does not match the key")
		}
		return k.Verify, nil
	})
	if err != nil {
		return nil, reasonOf(err)
	}
	if !acceptedType(tok.Header["typ"]) {
		return nil, errors.New("typ header is not JWT or at+jwt")
	}
	if err := v.checkLifetime(&claims); err != nil {
		return nil, err
	}
	p, err := principalFromClaims(&claims)
	if err != nil {
		return nil, err
	}
	exp := claims.ExpiresAt.Time
	p.Expires = exp
	if nbf := claims.NotBefore; nbf != nil && nbf.After(now) {
		// Valid only thanks to leeway: do not cache.
		return p, nil
	}
	if v.opts.CacheSize < 0 {
		return p, nil
	}
	v.mu.Lock()
	if len(v.cache) >= v.opts.CacheSize {
		for k, e := range v.cache {
			if !now.Before(e.exp) || len(v.cache) >= v.opts.CacheSize {
				delete(v.cache, k)
			}
		}
	}
	v.cache[sum] = cachedPrincipal{p: p, exp: exp, kid: kid, key: key}
	v.mu.Unlock()
	return p, nil
}

// acceptedType reports whether a "typ" header names an access token or a
// plain JWT: absent, or "JWT" or "at+jwt" (RFC 9068), case-insensitive,
// with or without the "application/" prefix media types may carry (RFC
// 7515, 4.1.9). Anything else (an ID token's "id+jwt", a logout token's
// "logout+jwt", a non-string) was minted for another purpose (RFC 8725,
// 3.11).
func acceptedType(typ any) bool {
	if typ == nil {
		return true
	}
	s, ok := typ.(string)
	if !ok {
		return false
	}
	if len(s) > len("application/") && strings.EqualFold(s[:len("application/")], "application/") {
		s = s[len("application/"):]
	}
	return strings.EqualFold(s, "JWT") || strings.EqualFold(s, "at+jwt")
}

// checkLifetime enforces MaxLifetime on exp - iat. No leeway applies:
// both are the issuer's own clock.
func (v *Verifier) checkLifetime(c *Claims) error {
	if v.opts.MaxLifetime <= 0 {
		return nil
	}
	if c.IssuedAt == nil {
		return errors.New("no iat claim (required with a maximum token lifetime)")
	}
	if c.ExpiresAt.Sub(c.IssuedAt.Time) > v.opts.MaxLifetime {
		return errors.New("token lifetime (exp - iat) is longer than allowed")
	}
	return nil
}

// reasonOf keeps a short, secret-free reason for a failed parse.
func reasonOf(err error) error {
	switch {
	case errors.Is(err, jwt.ErrTokenExpired):
		return errors.New("token expired")
	case errors.Is(err, jwt.ErrTokenNotValidYet), errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return errors.New("token not valid yet")
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return errors.New("wrong audience")
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return errors.New("wrong issuer")
	case errors.Is(err, jwt.ErrTokenSignatureInvalid), errors.Is(err, jwt.ErrTokenUnverifiable):
		return errors.New("bad signature or unknown key")
	}
	return errBadToken
}

// Collectors are the verifier's metrics.
func (v *Verifier) Collectors() []prometheus.Collector {
	if v == nil || v.throttle == nil {
		return nil
	}
	return []prometheus.Collector{v.throttle.failures, v.throttle.refused}
}
