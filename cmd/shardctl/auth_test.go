package main

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alecthomas/kong"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/auth/keyset"
	"github.com/shardgate/shardgate/internal/testcluster"
	"github.com/shardgate/shardgate/server"
)

// writeKey writes a fresh Ed25519 PKCS#8 key and returns its path.
func writeKey(t *testing.T) (string, ed25519.PublicKey) {
	t.Helper()
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, pub
}

// startAuthCluster serves a 1-shard cluster that requires tokens verified
// with pub.
func startAuthCluster(t *testing.T, pub ed25519.PublicKey) string {
	t.Helper()
	kid, _ := keyset.KeyID(pub)
	v, err := auth.NewVerifier(auth.Options{Keys: keyset.Static{kid: {Alg: "EdDSA", Verify: pub}}, AnyIssuer: true, AnyAudience: true})
	if err != nil {
		t.Fatal(err)
	}
	return testcluster.Start(t, 1, server.Options{}, server.GRPCOptions{Auth: v}).Addr
}

func TestTokenMintAndUse(t *testing.T) {
	keyPath, pub := writeKey(t)
	addr := startAuthCluster(t, pub)
	admin := strings.TrimSpace(run(t, globals{}, tokenMintCmd{Role: "admin", Sub: "ops", TTL: time.Minute, Key: keyPath}))
	if out := run(t, globals{Addr: addr, Token: admin}, topologyCmd{}); !strings.Contains(out, "shard-0") {
		t.Fatalf("topology with an admin token:\n%s", out)
	}
	var g globals
	g.Addr, g.Timeout, g.out = addr, 10*time.Second, io.Discard
	if err := (topologyCmd{}).Run(&g); err == nil || !strings.Contains(err.Error(), "Unauthenticated") {
		t.Fatalf("topology without a token: %v", err)
	}
	user := strings.TrimSpace(run(t, globals{}, tokenMintCmd{Role: "user", Sub: "alice", TTL: time.Minute, Key: keyPath}))
	g.Token = user
	if err := (topologyCmd{}).Run(&g); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Fatalf("topology with a user token: %v", err)
	}
}

func TestTokenNeedsTLSBeyondLoopback(t *testing.T) {
	g := globals{Addr: "10.1.2.3:7070", Token: "x.y.z"}
	if _, err := g.dialOptions(); err == nil || !strings.Contains(err.Error(), "plaintext") {
		t.Fatalf("token over plaintext to a remote address: %v", err)
	}
	for _, addr := range []string{"127.0.0.1:7070", "localhost:1", "[::1]:7070"} {
		g := globals{Addr: addr, Token: "x.y.z"}
		if _, err := g.dialOptions(); err != nil {
			t.Errorf("%s: %v", addr, err)
		}
	}
	g = globals{Addr: "10.1.2.3:7070", Token: "x.y.z", TLS: true}
	if _, err := g.dialOptions(); err != nil {
		t.Fatalf("token over TLS: %v", err)
	}
}

func TestMintRefusesBadInput(t *testing.T) {
	keyPath, _ := writeKey(t)
	b, _ := os.ReadFile(keyPath)
	if _, err := mintToken([]byte("nope"), "user", "a", "", "", time.Minute, time.Now()); err == nil {
		t.Error("non-PEM key accepted")
	}
	if _, err := mintToken(b, "user", "a", "", "", 0, time.Now()); err == nil {
		t.Error("zero TTL accepted")
	}
	tok, err := mintToken(b, "user", "a", "iss", "aud", time.Minute, time.Now())
	if err != nil || strings.Count(tok, ".") != 2 {
		t.Fatalf("mint: %q %v", tok, err)
	}
}

// The command line parses: kong panics at start on a clash of flag names.
func TestCLIParses(t *testing.T) {
	var c cli
	p, err := kong.New(&c, kong.Name("shardctl"), kong.Exit(func(int) {}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Parse([]string{"token", "mint", "--role", "user", "--sub", "a", "--key", "/dev/null", "--client-cert", "c", "--client-key", "k"}); err != nil {
		t.Fatal(err)
	}
}
