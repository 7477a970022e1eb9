package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alecthomas/kong"
)

func TestIsLoopback(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want bool
		err  bool
	}{
		{"127.0.0.1:7070", true, false},
		{"127.9.9.9:1", true, false},
		{"[::1]:7070", true, false},
		{"localhost:7070", true, false},
		{":7070", false, false},
		{"0.0.0.0:7070", false, false},
		{"10.1.2.3:7070", false, false},
		{"example.com:7070", false, false},
		{"127.0.0.1", false, true},
	} {
		got, err := isLoopback(tc.addr)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("isLoopback(%q) = %v, %v; want %v, err=%v", tc.addr, got, err, tc.want, tc.err)
		}
	}
}

func TestParseShardSpecs(t *testing.T) {
	specs, err := parseShardSpecs([]string{"a=postgres://u:pw@h/db?x=1", "b-2=postgres://h/db2"})
	if err != nil || len(specs) != 2 || specs[0].Name != "a" || specs[0].DSN != "postgres://u:pw@h/db?x=1" {
		t.Fatalf("parseShardSpecs = %+v, %v", specs, err)
	}
	// Bad arguments, many with a password: none may appear in the error. A
	// DSN without "NAME=" is cut at an '=' of its query, if it has one.
	const pw = "s3cret-Pw"
	for _, bad := range []string{
		"",
		"a",
		"=dsn",
		"a=",
		"Bad=dsn",
		"postgres://u:" + pw + "@h/db",
		"postgres://u:" + pw + "@h/db?sslmode=disable",
		"postgresql://u:" + pw + "@h/db?x=1&password=" + pw,
		"u:" + pw + "@h/db?sslmode=disable",
		"=postgres://u:" + pw + "@h/db",
		"Shard-0=postgres://u:" + pw + "@h/db",
		"shard 0=postgres://u:" + pw + "@h/db",
		"a" + strings.Repeat("x", 63) + "=postgres://u:" + pw + "@h",
		pw + "=",
		pw,
	} {
		// The bad one second, so the error must say which.
		_, err := parseShardSpecs([]string{"ok=postgres://h/db", bad})
		switch {
		case err == nil:
			t.Errorf("parseShardSpecs(%q) accepted", bad)
		case strings.Contains(err.Error(), pw):
			t.Errorf("parseShardSpecs(%q): error echoes the argument: %v", bad, err)
		case !strings.Contains(err.Error(), "--shard argument 2 (of 2)"):
			t.Errorf("parseShardSpecs(%q): error does not say which argument: %v", bad, err)
		}
	}
}

func TestWithDatabase(t *testing.T) {
	got, err := withDatabase("postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable", "x_catalog")
	if err != nil || got != "postgres://postgres@127.0.0.1:5432/x_catalog?sslmode=disable" {
		t.Fatalf("withDatabase = %q, %v", got, err)
	}
	if _, err := withDatabase("host=localhost dbname=x", "y"); err == nil {
		t.Fatal("a keyword/value DSN was accepted")
	}
}

// Auth needs a key source unless --no-auth, which only loopback allows;
// beyond loopback TLS is needed unless --allow-plaintext. Neither opt-out
// lifts the other's check.
func TestCheckExposure(t *testing.T) {
	for _, c := range []struct {
		name                                        string
		loopback, tls, auth, allowPlaintext, noAuth bool
		ok                                          bool
	}{
		{"loopback, keys", true, false, true, false, false, true},
		{"loopback, nothing", true, false, false, false, false, false},
		{"loopback, --no-auth", true, false, false, false, true, true},
		{"loopback, keys and --no-auth", true, false, true, false, true, false},
		{"remote, TLS and keys", false, true, true, false, false, true},
		{"remote, nothing", false, false, false, false, false, false},
		{"remote, TLS only", false, true, false, false, false, false},
		{"remote, keys only", false, false, true, false, false, false},
		{"remote, keys, --allow-plaintext", false, false, true, true, false, true},
		{"remote, TLS, --no-auth", false, true, false, false, true, false},
		{"remote, --allow-plaintext --no-auth", false, false, false, true, true, false},
		{"remote, --allow-plaintext only", false, false, false, true, false, false},
	} {
		err := checkExposure("10.0.0.1:7070", c.loopback, c.tls, c.auth, c.allowPlaintext, c.noAuth)
		if (err == nil) != c.ok {
			t.Errorf("%s: %v", c.name, err)
		}
	}
}

func TestDevKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "dev.pem")
	k1, err := ensureDevKey(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("dev key file: %v %v", fi.Mode(), err)
	}
	k2, err := ensureDevKey(path)
	if err != nil || !k1.Equal(k2) {
		t.Fatalf("second run made another key: %v", err)
	}
	if _, err := devVerifier(k1); err != nil {
		t.Fatal(err)
	}
}

// The command line parses: kong panics at start on a clash of flag names.
func TestCLIParses(t *testing.T) {
	var c cli
	p, err := kong.New(&c, kong.Name("shardgate"), kong.Exit(func(int) {}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Parse([]string{"serve", "--catalog", "x", "--tls-cert", "c", "--tls-key", "k", "--jwt-keys", "j", "--jwt-issuer", "i", "--jwt-audience", "a", "--jwt-max-lifetime", "1h", "--jwt-jwks-max-age", "1h", "--allow-plaintext", "--limit-redis", "r"}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Parse([]string{"dev", "--dev-key", "k", "--limit-redis", "r"}); err != nil {
		t.Fatal(err)
	}
}

func TestCheckJWKSURL(t *testing.T) {
	for url, ok := range map[string]bool{
		"https://issuer.example/.well-known/jwks.json": true,
		"http://127.0.0.1:8080/jwks":                   true,
		"http://localhost/jwks":                        true,
		"http://issuer.example/jwks":                   false,
		"ftp://issuer.example/jwks":                    false,
		"issuer.example/jwks":                          false,
	} {
		if err := checkJWKSURL(url); (err == nil) != ok {
			t.Errorf("%s: %v", url, err)
		}
	}
}
