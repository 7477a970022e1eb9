package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alecthomas/kong"
	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/ratelimit"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/server"
)

// testMACKeyFile writes a cache MAC key for serve.
func testMACKeyFile(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "cache-mac.key")
	if err := os.WriteFile(path, []byte("a test cache MAC key, 32 bytes or more"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// newCluster creates a one-shard cluster and returns its catalog DSN.
func newCluster(t *testing.T) string {
	t.Helper()
	catalogDSN := testenv.NewDatabase(t)
	if err := catalog.CreateCluster(context.Background(), catalogDSN, router.RingConfig{},
		[]catalog.ShardSpec{{Name: "shard-0", DSN: testenv.NewDatabase(t)}}); err != nil {
		t.Fatal(err)
	}
	return catalogDSN
}

// runServe runs serve with args until it returns (it fails to start) or
// a second passes (it serves; then it is stopped).
func runServe(t *testing.T, w io.Writer, args ...string) error {
	t.Helper()
	var c cli
	p, err := kong.New(&c, kong.Name("shardgate"), kong.Exit(func(int) { t.Fatal("kong exited") }))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Parse(append([]string{"serve", "--listen", "127.0.0.1:0", "--metrics-listen", "", "--grace", "0s", "--drain", "0s"}, args...)); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	return c.Serve.Run(ctx, slog.New(slog.NewTextHandler(w, nil)))
}

// With the cache on, serve wants a MAC key shared by the instances: with
// none it would have to trust whatever Redis holds.
func TestServeRefusesCacheWithoutMACKey(t *testing.T) {
	rs := testenv.NewRedisServer(t)
	err := runServe(t, io.Discard, "--no-auth", "--catalog", "postgres://127.0.0.1:1/none", "--redis", rs.Addr())
	if !errors.Is(err, errNoMACKey) {
		t.Fatalf("serve without --cache-mac-key-file: %v", err)
	}
	short := filepath.Join(t.TempDir(), "short.key")
	os.WriteFile(short, []byte("too short"), 0o600)
	err = runServe(t, io.Discard, "--no-auth", "--catalog", "postgres://127.0.0.1:1/none", "--redis", rs.Addr(), "--cache-mac-key-file", short)
	if err == nil || !strings.Contains(err.Error(), "at least 32") {
		t.Fatalf("serve with a short key: %v", err)
	}
}

const redisSecret = "s3cret-PW-7f1c"

// An ACL user and a database from --redis-url reach the cache, the events
// and the rate limits; the password shows in no log line and no error.
func TestRedisURLWithACLUser(t *testing.T) {
	rs := testenv.NewRedisServerWith(t, "--user", "default", "off", "--user", "sg", "on", ">"+redisSecret, "~*", "&*", "+@all")
	catalogDSN := newCluster(t)
	url := "redis://sg:" + redisSecret + "@" + rs.Addr() + "/3"
	var logs testenv.LogBuffer
	client := serveTo(t, &logs, "--catalog", catalogDSN, "--redis-url", url, "--limit-redis-url", url,
		"--limit-redis", "127.0.0.1:1") // the URL wins over the shorthand
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	waitServing(t, ctx, client)
	sess, err := client.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "alice", TtlSeconds: 60})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{rs.Addr()}, Username: "sg", Password: redisSecret, SelectDB: 3, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	for _, pattern := range []string{"shardgate:s:*", "shardgate:rl:*"} {
		waitTest(t, ctx, pattern+" in database 3", func() bool {
			getSession(t, ctx, client, sess.GetToken())
			keys, err := raw.Do(ctx, raw.B().Keys().Pattern(pattern).Build()).AsStrSlice()
			return err == nil && len(keys) > 0
		})
	}
	if strings.Contains(logs.String(), redisSecret) {
		t.Fatalf("the Redis password is in the log:\n%s", logs.String())
	}

	// A wrong password fails the start, and says so without the password.
	var logs2 testenv.LogBuffer
	wrong := "redis://sg:wrong-" + redisSecret + "@" + rs.Addr() + "/3"
	err = runServe(t, &logs2, "--no-auth", "--catalog", catalogDSN, "--redis-url", wrong, "--cache-mac-key-file", testMACKeyFile(t))
	if err == nil || strings.Contains(err.Error(), redisSecret) || strings.Contains(logs2.String(), redisSecret) {
		t.Fatalf("serve with a wrong password: %v\n%s", err, logs2.String())
	}
}

// Bad Redis settings are refused with an error that names the flag and
// never quotes a password.
func TestRedisFlagErrors(t *testing.T) {
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "pw")
	os.WriteFile(pwFile, []byte(redisSecret+"\n"), 0o600)
	for _, c := range []struct {
		name string
		f    redisFlags
		url  string
		pw   string
		want string
	}{
		{"scheme", redisFlags{}, "http://u:" + redisSecret + "@h:6379", "", "scheme"},
		{"port", redisFlags{}, "redis://u:" + redisSecret + "@h:port", "", "not a URL"},
		{"db", redisFlags{}, "redis://u:" + redisSecret + "@h:6379/x", "", "database"},
		{"skip_verify", redisFlags{}, "rediss://u:" + redisSecret + "@h:6379?skip_verify=true", "", "skip_verify"},
		{"two passwords", redisFlags{}, "redis://u:" + redisSecret + "@h:6379", pwFile, "one"},
		{"missing CA", redisFlags{RedisTLSCA: filepath.Join(dir, "none.pem")}, "rediss://h:6379", "", "--redis-tls-ca"},
		{"cert without key", redisFlags{RedisTLSCert: filepath.Join(dir, "c.pem")}, "rediss://h:6379", "", "go together"},
	} {
		_, _, err := c.f.resolve("redis-url", c.url, "", c.pw)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "redis") {
			t.Errorf("%s: %v, want an error about %q", c.name, err, c.want)
		}
		if err != nil && strings.Contains(err.Error(), redisSecret) {
			t.Errorf("%s: the error shows the password: %v", c.name, err)
		}
	}
	rc, ok, err := redisFlags{}.resolve("redis-url", "", "127.0.0.1:6379", pwFile)
	if err != nil || !ok || rc.opt.Password != redisSecret || rc.name != "127.0.0.1:6379" {
		t.Fatalf("shorthand with a password file: %+v %v %v", rc, ok, err)
	}
	rc, _, _ = redisFlags{}.resolve("redis-url", "redis://u:"+redisSecret+"@h:6379/2", "127.0.0.1:6379", "")
	if rc.opt.InitAddress[0] != "h:6379" || rc.opt.SelectDB != 2 || strings.Contains(rc.name, redisSecret) {
		t.Fatalf("the URL must win over the shorthand and be named without its password: %+v", rc)
	}
	f := redisFlags{RedisTLSCA: "ca.pem"}
	if err := f.checkTLSUsed(rc, redisConn{}); err == nil {
		t.Fatal("TLS files with no rediss:// connection accepted")
	}
}

// rediss:// with --redis-tls-ca and a client certificate reaches a Redis
// that speaks only TLS and wants client certificates.
func TestRedisTLS(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t)
	ca.write(t, dir, "ca.pem", nil)
	ca.write(t, dir, "server", ca.issue(t, false))
	ca.write(t, dir, "client", ca.issue(t, true))
	rs := testenv.NewRedisServerWith(t, "--tls-port", "PORT", "--tls-cert-file", filepath.Join(dir, "server.pem"),
		"--tls-key-file", filepath.Join(dir, "server-key.pem"), "--tls-ca-cert-file", filepath.Join(dir, "ca.pem"),
		"--tls-auth-clients", "yes")
	catalogDSN := newCluster(t)
	_, port, _ := net.SplitHostPort(rs.Addr())
	client := serve(t, "--catalog", catalogDSN, "--redis-url", "rediss://localhost:"+port,
		"--redis-tls-ca", filepath.Join(dir, "ca.pem"), "--redis-tls-cert", filepath.Join(dir, "client.pem"),
		"--redis-tls-key", filepath.Join(dir, "client-key.pem"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	waitServing(t, ctx, client)
	sess, err := client.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "alice", TtlSeconds: 60})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{rs.Addr()}, DisableCache: true,
		TLSConfig: &tls.Config{RootCAs: ca.pool(), Certificates: []tls.Certificate{cert}, ServerName: "localhost"}})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	waitTest(t, ctx, "the session cached over TLS", func() bool {
		getSession(t, ctx, client, sess.GetToken())
		keys, err := raw.Do(ctx, raw.B().Keys().Pattern("shardgate:s:*").Build()).AsStrSlice()
		return err == nil && len(keys) > 0
	})
}

// getSession reads a session, which the cache then holds (until the relay
// invalidates it again after the session's event).
func getSession(t *testing.T, ctx context.Context, client pb.DataServiceClient, tok string) {
	t.Helper()
	if _, err := client.GetSession(ctx, &pb.GetSessionRequest{Token: tok}); err != nil {
		t.Fatal(err)
	}
}

// waitServing waits until serve answers and alice exists.
func waitServing(t *testing.T, ctx context.Context, client pb.DataServiceClient) {
	t.Helper()
	waitTest(t, ctx, "serve to answer", func() bool {
		_, err := client.PutUser(ctx, &pb.PutUserRequest{UserId: "alice"})
		return err == nil
	})
}

func waitTest(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		if ctx.Err() != nil {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	der  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, der: der}
}

type issued struct{ cert, key []byte }

// issue makes a leaf certificate for localhost and 127.0.0.1.
func (ca *testCA) issue(t *testing.T, client bool) *issued {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	usage := x509.ExtKeyUsageServerAuth
	if client {
		usage = x509.ExtKeyUsageClientAuth
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return &issued{cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		key: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})}
}

// write writes the CA (leaf nil) as name, or a leaf as name.pem and
// name-key.pem.
func (ca *testCA) write(t *testing.T, dir, name string, leaf *issued) {
	t.Helper()
	files := map[string][]byte{name: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.der})}
	if leaf != nil {
		files = map[string][]byte{name + ".pem": leaf.cert, name + "-key.pem": leaf.key}
	}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// The rate limiter of a serve started while its Redis was down shares its
// buckets in Redis once Redis is up.
func TestLimiterUsesRedisThatCameUpLater(t *testing.T) {
	rs := testenv.NewRedisServer(t)
	rs.Kill()
	f := serveFlags{guardFlags: guardFlags{LimitRedis: rs.Addr(), Limits: "write=100/100", LimitPrefix: "sgtest:rl:"}}
	rc, ok, err := f.limitRedis()
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	lim, stop, err := f.limiter(rc, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	lim.Allow(ctx, ratelimit.ClassWrite, "p")
	rs.Start()
	raw, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{rs.Addr()}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	waitTest(t, ctx, "a rate-limit bucket in Redis", func() bool {
		lim.Allow(ctx, ratelimit.ClassWrite, "p")
		n, err := raw.Do(ctx, raw.B().Exists().Key("sgtest:rl:write:p").Build()).AsInt64()
		return err == nil && n == 1
	})
}

func TestUserSessionFlags(t *testing.T) {
	schema := filepath.Join(t.TempDir(), "schema.json")
	os.WriteFile(schema, []byte(`{"type":"object"}`), 0o600)
	flags := serveAndDevFlags(t, []string{"--user-session-max-ttl", "2h", "--user-session-schema", schema})
	for cmd, f := range flags {
		var o server.Options
		if err := f.userSessionFlags.apply(&o); err != nil || o.UserSessionMaxTTL != 2*time.Hour || o.UserSessionSchema != `{"type":"object"}` {
			t.Errorf("%s: %+v, %v", cmd, o, err)
		}
	}
	for _, bad := range []userSessionFlags{{UserSessionMaxTTL: 0}, {UserSessionMaxTTL: 366 * 24 * time.Hour},
		{UserSessionMaxTTL: time.Hour, UserSessionSchema: filepath.Join(t.TempDir(), "none.json")}} {
		if err := bad.apply(new(server.Options)); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	var def cli
	p, _ := kong.New(&def, kong.Name("shardgate"))
	if _, err := p.Parse([]string{"serve", "--catalog", "x"}); err != nil || def.Serve.UserSessionMaxTTL != 24*time.Hour {
		t.Fatalf("default: %v %v", def.Serve.UserSessionMaxTTL, err)
	}
}
