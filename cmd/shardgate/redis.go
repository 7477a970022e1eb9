package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/cache"
)

// redisFlags say how to reach Redis securely and how to check what is read
// back from it (serve and dev). A URL wins over the host:port shorthand
// (--redis, --limit-redis), which means plaintext and no ACL user.
type redisFlags struct {
	RedisURL          string `name:"redis-url" help:"Redis for the cache and the change events, as redis://[user[:password]@]host[:port][/db] (rediss:// for TLS); wins over --redis. Keep the password out of the command line: set this by SHARDGATE_REDIS_URL, or use --redis-password-file." env:"SHARDGATE_REDIS_URL"`
	RedisPasswordFile string `name:"redis-password-file" help:"File holding the password (AUTH; with a user in the URL, ACL AUTH) of the cache and events Redis." env:"SHARDGATE_REDIS_PASSWORD_FILE"`

	LimitRedisURL          string `name:"limit-redis-url" help:"Redis for the rate-limit buckets, as --redis-url; wins over --limit-redis." env:"SHARDGATE_LIMIT_REDIS_URL"`
	LimitRedisPasswordFile string `name:"limit-redis-password-file" help:"File holding the password of the rate-limit Redis." env:"SHARDGATE_LIMIT_REDIS_PASSWORD_FILE"`

	RedisTLSCA   string `name:"redis-tls-ca" help:"PEM CA certificates to verify every rediss:// Redis with (default: the system's)." env:"SHARDGATE_REDIS_TLS_CA"`
	RedisTLSCert string `name:"redis-tls-cert" help:"PEM client certificate to present to every rediss:// Redis (Redis's tls-auth-clients)." env:"SHARDGATE_REDIS_TLS_CERT"`
	RedisTLSKey  string `name:"redis-tls-key" help:"PEM private key of --redis-tls-cert." env:"SHARDGATE_REDIS_TLS_KEY"`

	CacheMACKeyFile string `name:"cache-mac-key-file" help:"File holding the key (at least 32 bytes; every instance the same) of the MAC each cache entry carries; entries that fail it are not served. serve requires it when the cache is on; dev makes one." env:"SHARDGATE_CACHE_MAC_KEY_FILE"`
}

// redisConn is how to reach one Redis: the client options to build on, and
// how to name it in logs (never with its password).
type redisConn struct {
	opt  rueidis.ClientOption
	name string
}

// resolve turns a URL or a host:port shorthand (the URL wins) and a
// password file into client options; ok is false when both are empty.
// urlFlag names the URL's flag in errors, which never quote the URL.
func (f redisFlags) resolve(urlFlag, rawURL, addr, passwordFile string) (c redisConn, ok bool, err error) {
	switch {
	case rawURL != "":
		u, perr := url.Parse(rawURL)
		if perr != nil {
			var ue *url.Error
			if errors.As(perr, &ue) {
				perr = ue.Err // url.Error quotes the URL, password and all
			}
			return c, false, fmt.Errorf("--%s is not a URL: %v", urlFlag, perr)
		}
		if u.Scheme != "redis" && u.Scheme != "rediss" && u.Scheme != "unix" {
			return c, false, fmt.Errorf("--%s: scheme %q; want redis://, rediss:// (TLS) or unix://", urlFlag, u.Scheme)
		}
		if u.Query().Has("skip_verify") {
			return c, false, fmt.Errorf("--%s: skip_verify is not allowed; give the CA with --redis-tls-ca", urlFlag)
		}
		if c.opt, err = rueidis.ParseURL(rawURL); err != nil {
			return c, false, fmt.Errorf("--%s: %v", urlFlag, err)
		}
		c.name = u.Redacted()
	case addr != "":
		c.opt = rueidis.ClientOption{InitAddress: []string{addr}}
		c.name = addr
	default:
		return c, false, nil
	}
	if passwordFile != "" {
		if c.opt.Password != "" {
			return c, false, fmt.Errorf("--%s holds a password and a password file is given too; give one", urlFlag)
		}
		b, err := os.ReadFile(passwordFile)
		if err != nil {
			return c, false, fmt.Errorf("Redis password file: %w", err)
		}
		if c.opt.Password = strings.TrimRight(string(b), "\r\n"); c.opt.Password == "" {
			return c, false, fmt.Errorf("Redis password file %s is empty", passwordFile)
		}
	}
	if c.opt.TLSConfig != nil {
		if err := f.tls(c.opt.TLSConfig); err != nil {
			return c, false, err
		}
	}
	return c, true, nil
}

// tls adds the CA and client certificate files to a rediss:// connection's
// TLS configuration.
func (f redisFlags) tls(conf *tls.Config) error {
	if f.RedisTLSCA != "" {
		b, err := os.ReadFile(f.RedisTLSCA)
		if err != nil {
			return fmt.Errorf("--redis-tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return fmt.Errorf("--redis-tls-ca %s: no PEM certificate in it", f.RedisTLSCA)
		}
		conf.RootCAs = pool
	}
	if (f.RedisTLSCert == "") != (f.RedisTLSKey == "") {
		return errors.New("--redis-tls-cert and --redis-tls-key go together")
	}
	if f.RedisTLSCert != "" {
		cert, err := tls.LoadX509KeyPair(f.RedisTLSCert, f.RedisTLSKey)
		if err != nil {
			return fmt.Errorf("--redis-tls-cert/--redis-tls-key: %w", err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return nil
}

// checkTLSUsed refuses TLS files that no connection would use: a user who
// gives them expects TLS, and a redis:// URL or a shorthand would not.
func (f redisFlags) checkTLSUsed(conns ...redisConn) error {
	if f.RedisTLSCA == "" && f.RedisTLSCert == "" && f.RedisTLSKey == "" {
		return nil
	}
	for _, c := range conns {
		if c.opt.TLSConfig != nil {
			return nil
		}
	}
	return errors.New("--redis-tls-ca/--redis-tls-cert/--redis-tls-key are given but no Redis is reached by TLS: use a rediss:// URL (--redis-url, --limit-redis-url)")
}

// cacheRedis is the Redis of the cache and events; ok is false when they
// are off (no --redis-url and an empty --redis).
func (f serveFlags) cacheRedis() (redisConn, bool, error) {
	return f.resolve("redis-url", f.RedisURL, f.Redis, f.RedisPasswordFile)
}

// limitRedis is the Redis of the rate limits; ok is false when they are
// off.
func (f serveFlags) limitRedis() (redisConn, bool, error) {
	return f.resolve("limit-redis-url", f.LimitRedisURL, f.LimitRedis, f.LimitRedisPasswordFile)
}

// readMACKey reads --cache-mac-key-file.
func readMACKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--cache-mac-key-file: %w", err)
	}
	if len(b) < cache.MACKeySize {
		return nil, fmt.Errorf("--cache-mac-key-file %s: %d bytes; want at least %d (e.g. head -c 32 /dev/urandom > %s)", path, len(b), cache.MACKeySize, path)
	}
	return b, nil
}

// errNoMACKey is serve's answer to a cache without a MAC key: with none,
// each instance would need a key of its own, and instances sharing Redis
// would reject each other's entries.
var errNoMACKey = errors.New("the cache needs --cache-mac-key-file (a key of at least 32 bytes shared by every instance, e.g. head -c 32 /dev/urandom > cache-mac.key), so that entries written to Redis by anyone else are not served; or run without the cache and events (--redis '' and no --redis-url)")
