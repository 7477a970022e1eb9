package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alecthomas/kong"
	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// parseServe parses `shardgate serve` args.
func parseServe(t *testing.T, args ...string) (*serveCmd, error) {
	t.Helper()
	var c cli
	p, err := kong.New(&c, kong.Name("shardgate"), kong.Exit(func(int) { t.Fatal("kong exited") }))
	if err != nil {
		t.Fatal(err)
	}
	_, err = p.Parse(append([]string{"serve"}, args...))
	return &c.Serve, err
}

// writePublicKey writes pub as a PEM public key named kid and returns the
// file's path.
func writePublicKey(t *testing.T, kid string, pub ed25519.PublicKey) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "keys.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Headers: map[string]string{"kid": kid}, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// serve without a key source refuses to start unless --no-auth, which a
// non-loopback address refuses; a key source needs an issuer and an
// audience; a non-loopback address needs TLS unless --allow-plaintext.
// Each refusal names what to give. The catalog is unreachable: a check
// that let the server through would fail there, with another error.
func TestServeRefusesUnsafeStarts(t *testing.T) {
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	keys := writePublicKey(t, "k", pub)
	const deadCatalog = "postgres://postgres@127.0.0.1:1/none?connect_timeout=1"
	for _, c := range []struct {
		args []string
		want []string
	}{
		{nil, []string{"no JWT key source", "--jwt-keys", "--no-auth"}},
		{[]string{"--no-auth", "--listen", "0.0.0.0:7070"}, []string{"refusing --no-auth", "not a loopback"}},
		{[]string{"--no-auth", "--allow-plaintext", "--listen", "0.0.0.0:7070"}, []string{"refusing --no-auth"}},
		{[]string{"--no-auth", "--jwt-keys", keys}, []string{"contradict"}},
		{[]string{"--jwt-keys", keys}, []string{"--jwt-issuer is required", "--jwt-allow-any-issuer"}},
		{[]string{"--jwt-keys", keys, "--jwt-issuer", "https://id.test"}, []string{"--jwt-audience is required", "--jwt-allow-any-audience"}},
		{[]string{"--jwt-keys", keys, "--jwt-issuer", "i", "--jwt-allow-any-issuer", "--jwt-audience", "a"}, []string{"not both"}},
		{[]string{"--jwt-keys", keys, "--jwt-issuer", "i", "--jwt-audience", "a", "--jwt-leeway=-1s"}, []string{"--jwt-leeway"}},
		{[]string{"--jwt-keys", keys, "--jwt-issuer", "i", "--jwt-audience", "a", "--listen", "0.0.0.0:7070"}, []string{"without TLS", "--allow-plaintext"}},
		{[]string{"--jwt-keys", keys, "--jwt-issuer", "i", "--jwt-audience", "a", "--listen", "0.0.0.0:7070", "--no-auth"}, []string{"contradict"}},
		{[]string{"--jwt-jwks-url", "http://127.0.0.1:1/jwks", "--jwt-issuer", "i", "--jwt-audience", "a", "--jwt-jwks-max-age", "5m"}, []string{"--jwt-jwks-max-age"}},
	} {
		cmd, err := parseServe(t, append([]string{"--catalog", deadCatalog, "--metrics-listen", ""}, c.args...)...)
		if err != nil {
			t.Fatalf("%v: %v", c.args, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = cmd.Run(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)))
		cancel()
		for _, w := range c.want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("serve %v: %v; want an error saying %q", c.args, err, w)
			}
		}
	}
	// One switch no longer turns off every check.
	if _, err := parseServe(t, "--catalog", deadCatalog, "--insecure"); err == nil {
		t.Error("--insecure is still accepted")
	}
}

// --no-auth, here from its environment variable, is logged at WARN naming
// the variable, at start, and again while serving; calls act as an
// anonymous admin.
func TestNoAuthWarnsWhileServing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	catalogDSN := testenv.NewDatabase(t)
	if err := catalog.CreateCluster(ctx, catalogDSN, router.RingConfig{},
		[]catalog.ShardSpec{{Name: "shard-0", DSN: testenv.NewDatabase(t)}}); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SHARDGATE_NO_AUTH", "true")
	var logs testenv.LogBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	client := startServe(t, log, func(c *serveCmd) { c.noAuthEvery = 20 * time.Millisecond }, "--catalog", catalogDSN, "--redis", "")
	for {
		_, err := client.PutUser(ctx, &pb.PutUserRequest{UserId: "alice"})
		if err == nil {
			break
		}
		if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
			t.Fatalf("anonymous PutUser under --no-auth: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for strings.Count(logs.String(), "NO AUTH") < 3 {
		if ctx.Err() != nil {
			t.Fatalf("--no-auth was not logged again while serving:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "level=WARN msg=\"NO AUTH") {
		t.Fatalf("--no-auth not logged at WARN:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "variable=SHARDGATE_NO_AUTH") {
		t.Fatalf("the variable that turned auth off is not named:\n%s", logs.String())
	}
}

// The token flags reach the verifier: --jwt-leeway 0s forgives no skew
// (the default forgives 30s), --jwt-max-lifetime caps exp - iat, issuer
// and audience are enforced, and the allow-any opt-outs waive them with a
// warning.
func TestTokenFlagsReachTheVerifier(t *testing.T) {
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	keys := writePublicKey(t, "k", pub)
	now := time.Now()
	sign := func(typ string, mod func(jwt.MapClaims)) string {
		c := jwt.MapClaims{"role": "service", "sub": "svc", "iss": "https://id.test", "aud": "shardgate",
			"iat": now.Unix(), "exp": now.Add(30 * time.Minute).Unix()}
		if mod != nil {
			mod(c)
		}
		tok := jwt.NewWithClaims(jwt.SigningMethodEdDSA, c)
		tok.Header["kid"], tok.Header["typ"] = "k", typ
		s, err := tok.SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	good := sign("JWT", nil)
	expired := sign("JWT", func(c jwt.MapClaims) { c["exp"] = now.Add(-3 * time.Second).Unix() })
	long := sign("at+jwt", func(c jwt.MapClaims) { c["exp"] = now.Add(2 * time.Hour).Unix() })
	otherAud := sign("JWT", func(c jwt.MapClaims) { c["aud"] = "another-service" })
	otherIss := sign("JWT", func(c jwt.MapClaims) { c["iss"] = "https://elsewhere.test" })
	idToken := sign("id+jwt", nil)

	base := []string{"--catalog", "x", "--jwt-keys", keys}
	claims := []string{"--jwt-issuer", "https://id.test", "--jwt-audience", "shardgate"}
	for _, c := range []struct {
		name     string
		args     []string
		accepted map[string]bool
		warns    []string
	}{
		{"defaults", claims, map[string]bool{"good": true, "expired 3s ago": true, "2h lifetime": true, "other audience": false, "other issuer": false, "typ id+jwt": false}, nil},
		{"leeway 0s, max lifetime 1h", append([]string{"--jwt-leeway", "0s", "--jwt-max-lifetime", "1h"}, claims...),
			map[string]bool{"good": true, "expired 3s ago": false, "2h lifetime": false}, nil},
		{"any audience", []string{"--jwt-issuer", "https://id.test", "--jwt-allow-any-audience"},
			map[string]bool{"good": true, "other audience": true, "other issuer": false}, []string{"--jwt-allow-any-audience"}},
		{"any issuer", []string{"--jwt-allow-any-issuer", "--jwt-audience", "shardgate"},
			map[string]bool{"good": true, "other audience": false, "other issuer": true}, []string{"--jwt-allow-any-issuer"}},
	} {
		cmd, err := parseServe(t, append(base, c.args...)...)
		if err != nil {
			t.Fatal(err)
		}
		var logs testenv.LogBuffer
		sec, err := cmd.securityFlags.build(context.Background(), slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil || sec.auth == nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		toks := map[string]string{"good": good, "expired 3s ago": expired, "2h lifetime": long, "other audience": otherAud, "other issuer": otherIss, "typ id+jwt": idToken}
		for name, ok := range c.accepted {
			if _, err := sec.auth.Verify(context.Background(), toks[name]); (err == nil) != ok {
				t.Errorf("%s: token %s: %v, want accepted=%v", c.name, name, err, ok)
			}
		}
		for _, w := range c.warns {
			if !strings.Contains(logs.String(), "level=WARN msg="+w) && !strings.Contains(logs.String(), "level=WARN msg=\""+w) {
				t.Errorf("%s: no warning about %s:\n%s", c.name, w, logs.String())
			}
		}
	}
}
