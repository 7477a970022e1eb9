package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/auth/keyset"
	"github.com/shardgate/shardgate/ratelimit"
	"github.com/shardgate/shardgate/tlsconfig"
)

// securityFlags configure TLS and token authentication (serve only: dev
// makes its own).
type securityFlags struct {
	TLSCert     string `name:"tls-cert" help:"PEM certificate chain to serve TLS 1.3 with; reloaded when the file changes." env:"SHARDGATE_TLS_CERT"`
	TLSKey      string `name:"tls-key" help:"PEM private key of --tls-cert." env:"SHARDGATE_TLS_KEY"`
	TLSClientCA string `name:"tls-client-ca" help:"PEM CA certificates; when set, clients must present a certificate they signed (mutual TLS)." env:"SHARDGATE_TLS_CLIENT_CA"`

	JWTKeys             string        `name:"jwt-keys" help:"File of JWT verification keys: PEM public keys/certificates or a JWK set (EdDSA, RS256, ES256); reloaded when the file changes." env:"SHARDGATE_JWT_KEYS"`
	JWKSURL             string        `name:"jwt-jwks-url" help:"URL of a JWK set to verify JWTs with; cached, refreshed every 10 minutes and when a token names an unknown kid." env:"SHARDGATE_JWT_JWKS_URL"`
	JWKSMaxAge          time.Duration `name:"jwt-jwks-max-age" help:"How long a JWK set that cannot be refreshed stays in use; past it every token is refused until a fetch succeeds." default:"24h" env:"SHARDGATE_JWT_JWKS_MAX_AGE"`
	JWTHS256File        string        `name:"jwt-hs256-secret-file" help:"File holding an HS256 shared secret (at least 32 bytes). Only if you must: anyone who can verify can also mint." env:"SHARDGATE_JWT_HS256_SECRET_FILE"`
	JWTIssuer           string        `name:"jwt-issuer" help:"Required \"iss\" of tokens (needed with a key source, unless --jwt-allow-any-issuer)." env:"SHARDGATE_JWT_ISSUER"`
	JWTAudience         string        `name:"jwt-audience" help:"Required \"aud\" of tokens (needed with a key source, unless --jwt-allow-any-audience)." env:"SHARDGATE_JWT_AUDIENCE"`
	JWTAllowAnyIssuer   bool          `name:"jwt-allow-any-issuer" help:"Accept tokens whatever their \"iss\" (logged as a warning)." env:"SHARDGATE_JWT_ALLOW_ANY_ISSUER"`
	JWTAllowAnyAudience bool          `name:"jwt-allow-any-audience" help:"Accept tokens whatever their \"aud\": a token the identity provider minted for another service works here too (logged as a warning)." env:"SHARDGATE_JWT_ALLOW_ANY_AUDIENCE"`
	JWTLeeway           time.Duration `name:"jwt-leeway" help:"Clock skew forgiven on exp, nbf and iat; 0s forgives none." default:"30s" env:"SHARDGATE_JWT_LEEWAY"`
	JWTMaxLifetime      time.Duration `name:"jwt-max-lifetime" help:"Longest token lifetime (exp - iat) accepted; tokens without iat are refused. 0 accepts any." default:"0s" env:"SHARDGATE_JWT_MAX_LIFETIME"`
	JWTFailures         string        `name:"jwt-failure-limit" help:"Failed token verifications allowed per client address, per-second[/burst]; past it, new tokens from that address are refused unchecked for a while. \"off\" turns it off." default:"50/500" env:"SHARDGATE_JWT_FAILURE_LIMIT"`
}

// tlsOn reports whether the flags configure TLS.
func (f securityFlags) tlsOn() bool { return f.TLSCert != "" || f.TLSKey != "" }

// authOn reports whether the flags name a JWT key source.
func (f securityFlags) authOn() bool {
	return f.JWTKeys != "" || f.JWKSURL != "" || f.JWTHS256File != ""
}

// checkClaims checks the token flags that go with a key source.
func (f securityFlags) checkClaims() error {
	switch {
	case f.JWTIssuer == "" && !f.JWTAllowAnyIssuer:
		return errors.New("--jwt-issuer is required with a JWT key source: the \"iss\" your identity provider puts in Shardgate's tokens (or --jwt-allow-any-issuer to accept any)")
	case f.JWTAudience == "" && !f.JWTAllowAnyAudience:
		return errors.New("--jwt-audience is required with a JWT key source: the \"aud\" your identity provider puts in tokens meant for Shardgate, so tokens for its other services are refused (or --jwt-allow-any-audience to accept any)")
	case f.JWTIssuer != "" && f.JWTAllowAnyIssuer:
		return errors.New("give --jwt-issuer or --jwt-allow-any-issuer, not both")
	case f.JWTAudience != "" && f.JWTAllowAnyAudience:
		return errors.New("give --jwt-audience or --jwt-allow-any-audience, not both")
	case f.JWTLeeway < 0:
		return fmt.Errorf("--jwt-leeway %v: want 0 or more", f.JWTLeeway)
	case f.JWTMaxLifetime < 0:
		return fmt.Errorf("--jwt-max-lifetime %v: want 0 (any) or more", f.JWTMaxLifetime)
	case f.JWKSURL != "" && f.JWKSMaxAge < jwksRefresh:
		return fmt.Errorf("--jwt-jwks-max-age %v: want at least the %v refresh interval", f.JWKSMaxAge, jwksRefresh)
	}
	return nil
}

// jwksRefresh is how often a JWK set is fetched again.
const jwksRefresh = 10 * time.Minute

// guardFlags configure rate limits and deadlines (serve and dev).
type guardFlags struct {
	LimitRedis  string        `name:"limit-redis" help:"Redis address (host:port) holding rate-limit buckets, shared by all instances; empty turns rate limits off." env:"SHARDGATE_LIMIT_REDIS"`
	Limits      string        `name:"limits" help:"Rate per principal and method class: class=per-second[/burst], comma-separated; classes read, write, admin, watch." default:"read=1000/2000,write=200/400,admin=20/40,watch=10/20" env:"SHARDGATE_LIMITS"`
	LimitPrefix string        `name:"limit-prefix" help:"Prefix of rate-limit keys in Redis." default:"shardgate:rl:" env:"SHARDGATE_LIMIT_PREFIX"`
	MaxTimeout  time.Duration `name:"max-timeout" help:"Longest deadline a unary call may have; longer ones are shortened." default:"60s" env:"SHARDGATE_MAX_TIMEOUT"`
}

// security is what the flags build.
type security struct {
	tls  *tls.Config
	auth *auth.Verifier
	// cacheMACKey keys the MAC of cache entries (nil: none given).
	cacheMACKey []byte
	// allowPlaintext: --allow-plaintext, non-loopback addresses may go
	// without TLS (never without auth).
	allowPlaintext bool
}

func (f securityFlags) build(ctx context.Context, log *slog.Logger) (security, error) {
	var sec security
	switch {
	case f.TLSCert != "" || f.TLSKey != "":
		conf, err := tlsconfig.New(tlsconfig.Files{CertFile: f.TLSCert, KeyFile: f.TLSKey, ClientCAFile: f.TLSClientCA}, log)
		if err != nil {
			return sec, err
		}
		sec.tls = conf
	case f.TLSClientCA != "":
		return sec, errors.New("--tls-client-ca needs --tls-cert and --tls-key")
	}
	var failures ratelimit.Rate
	if f.JWTFailures != "off" {
		r, err := ratelimit.ParseRate(f.JWTFailures)
		if err != nil {
			return sec, fmt.Errorf("--jwt-failure-limit %q: %w", f.JWTFailures, err)
		}
		failures = r
	}
	if f.authOn() {
		if err := f.checkClaims(); err != nil {
			return sec, err
		}
	}
	var keys keyset.Source
	n := 0
	if f.JWTKeys != "" {
		k, err := keyset.LoadFile(f.JWTKeys, log)
		if err != nil {
			return sec, fmt.Errorf("--jwt-keys: %w", err)
		}
		keys, n = k, n+1
	}
	if f.JWKSURL != "" {
		if err := checkJWKSURL(f.JWKSURL); err != nil {
			return sec, err
		}
		j := &keyset.JWKS{URL: f.JWKSURL, Refresh: jwksRefresh, MaxAge: f.JWKSMaxAge, Logger: log}
		if err := j.Fetch(ctx); err != nil {
			return sec, fmt.Errorf("--jwt-jwks-url: %w", err)
		}
		keys, n = j, n+1
	}
	if f.JWTHS256File != "" {
		b, err := os.ReadFile(f.JWTHS256File)
		if err != nil {
			return sec, fmt.Errorf("--jwt-hs256-secret-file: %w", err)
		}
		k, err := keyset.HMAC([]byte(strings.TrimRight(string(b), "\r\n")))
		if err != nil {
			return sec, fmt.Errorf("--jwt-hs256-secret-file: %w", err)
		}
		keys, n = k, n+1
	}
	if n > 1 {
		return sec, errors.New("give one of --jwt-keys, --jwt-jwks-url and --jwt-hs256-secret-file")
	}
	if keys != nil {
		if f.JWTAllowAnyIssuer {
			log.Warn("--jwt-allow-any-issuer: tokens are accepted whatever their iss")
		}
		if f.JWTAllowAnyAudience {
			log.Warn("--jwt-allow-any-audience: tokens are accepted whatever their aud, including tokens the identity provider minted for other services")
		}
		o := auth.Options{Keys: keys, Issuer: f.JWTIssuer, Audience: f.JWTAudience,
			AnyIssuer: f.JWTAllowAnyIssuer, AnyAudience: f.JWTAllowAnyAudience,
			Leeway: f.JWTLeeway, MaxLifetime: f.JWTMaxLifetime,
			FailureRate: failures, NoFailureLimit: f.JWTFailures == "off"}
		v, err := auth.NewVerifier(o)
		if err != nil {
			return sec, err
		}
		sec.auth = v
	}
	return sec, nil
}

// checkJWKSURL wants https: keys fetched in the clear could be swapped by
// anyone on the path. Plain http is allowed to a loopback host only.
func checkJWKSURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("--jwt-jwks-url %q is not a URL", raw)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		host := u.Hostname()
		if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
			return nil
		}
	}
	return fmt.Errorf("--jwt-jwks-url must be https (http only to a loopback host): %s", u.Redacted())
}

// limiter builds the rate limiter on the Redis rc, or nil when no Redis
// is given for it. A Redis that is down at start is not fatal: the limiter
// starts in memory and connects once Redis answers.
func (f guardFlags) limiter(rc redisConn, log *slog.Logger) (*ratelimit.Limiter, func(), error) {
	if rc.name == "" {
		log.Info("rate limits off (no --limit-redis or --limit-redis-url)")
		return nil, func() {}, nil
	}
	rates, err := ratelimit.ParseRates(f.Limits)
	if err != nil {
		return nil, nil, fmt.Errorf("--limits: %w", err)
	}
	opt := rc.opt
	opt.DisableCache = true
	lim := ratelimit.New(ratelimit.Options{
		Connect: func() (rueidis.Client, error) { return rueidis.NewClient(opt) },
		Prefix:  f.LimitPrefix, Rates: rates, Logger: log,
	})
	log.Info("rate limits on", "limits", f.Limits, "redis", rc.name, "tls", opt.TLSConfig != nil, "auth", opt.Password != "")
	return lim, lim.Close, nil
}

// devKeyPath is where dev mode keeps its token signing key unless told.
func devKeyPath() string {
	dir, err := os.UserConfigDir()
	if err != nil {
		dir = os.TempDir()
	}
	return filepath.Join(dir, "shardgate", "dev-signing-key.pem")
}

// ensureDevKey returns the Ed25519 dev signing key at path, creating it
// (0600) on first use.
func ensureDevKey(path string) (ed25519.PrivateKey, error) {
	if b, err := os.ReadFile(path); err == nil {
		block, _ := pem.Decode(b)
		if block == nil {
			return nil, fmt.Errorf("%s: not PEM", path)
		}
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		ek, ok := k.(ed25519.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%s: not an Ed25519 key", path)
		}
		return ek, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return nil, err
	}
	return key, nil
}

// devVerifier verifies tokens signed with the dev key, and lets calls
// without a token through (dev stays usable with plain grpcurl).
func devVerifier(key ed25519.PrivateKey) (*auth.Verifier, error) {
	pub := key.Public()
	kid, err := keyset.KeyID(pub)
	if err != nil {
		return nil, err
	}
	// Tokens from `shardctl token mint` carry no iss or aud unless asked.
	return auth.NewVerifier(auth.Options{
		Keys:           keyset.Static{kid: {Alg: "EdDSA", Verify: pub}},
		AllowAnonymous: true,
		AnyIssuer:      true,
		AnyAudience:    true,
		Leeway:         30 * time.Second,
	})
}
