package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/auth/authtest"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/ratelimit"
)

// The security layer (auth, ratelimit, tlsconfig) as the server wires it
// in: every RPC under every kind of principal, Watch scoped to the caller,
// limits per principal, and TLS from GRPCOptions. The packages test their
// own logic; these tests need the real handlers.

// outcome is what a principal should get from an RPC.
type outcome int

const (
	allowed outcome = iota // any code but the refusals below
	unauthenticated
	denied   // PermissionDenied
	notFound // NotFound: another user's session looks absent
)

func TestAuthMatrix(t *testing.T) {
	keys := authtest.NewKeys(t)
	ts := newTestCluster(t, 2).startWith(t, false, GRPCOptions{Auth: keys.Verifier(t)}, nil)
	ctx := ctxT(t)
	admin := authtest.Bearer(ctx, keys.Token(t, "admin", "ops"))
	if _, err := ts.data.PutUser(admin, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{}`}); err != nil {
		t.Fatal(err)
	}
	sess, err := ts.data.CreateSession(admin, &pb.CreateSessionRequest{UserId: "alice", TtlSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.data.PutItem(admin, &pb.PutItemRequest{UserId: "alice", Collection: "c", Key: "k", ValueJson: "1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.data.SetConfig(admin, &pb.SetConfigRequest{Namespace: "ns", Key: "k", ValueJson: "1"}); err != nil {
		t.Fatal(err)
	}
	v999 := int64(999)
	absentToken := "0.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

	type rpc struct {
		name string
		kind string // "user", "session", "config-read", "config-write", "admin", "schema-read"
		call func(ctx context.Context) error
	}
	d, a := ts.data, ts.admin
	rpcs := []rpc{
		{"PutUser", "user", func(ctx context.Context) error {
			_, err := d.PutUser(ctx, &pb.PutUserRequest{UserId: "alice", ExpectedVersion: &v999})
			return err
		}},
		{"GetUser", "user", func(ctx context.Context) error {
			_, err := d.GetUser(ctx, &pb.GetUserRequest{UserId: "alice"})
			return err
		}},
		{"DeleteUser", "user", func(ctx context.Context) error {
			_, err := d.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: "alice", ExpectedVersion: &v999})
			return err
		}},
		{"CreateSession", "user", func(ctx context.Context) error {
			_, err := d.CreateSession(ctx, &pb.CreateSessionRequest{UserId: "alice", TtlSeconds: 60})
			return err
		}},
		{"GetSession", "session", func(ctx context.Context) error {
			_, err := d.GetSession(ctx, &pb.GetSessionRequest{Token: sess.GetToken()})
			return err
		}},
		{"TouchSession", "session", func(ctx context.Context) error {
			_, err := d.TouchSession(ctx, &pb.TouchSessionRequest{Token: sess.GetToken(), TtlSeconds: 3600})
			return err
		}},
		{"RevokeSession", "session-absent", func(ctx context.Context) error {
			_, err := d.RevokeSession(ctx, &pb.RevokeSessionRequest{Token: absentToken})
			return err
		}},
		{"ListSessions", "user", func(ctx context.Context) error {
			_, err := d.ListSessions(ctx, &pb.ListSessionsRequest{UserId: "alice"})
			return err
		}},
		{"PutItem", "user", func(ctx context.Context) error {
			_, err := d.PutItem(ctx, &pb.PutItemRequest{UserId: "alice", Collection: "c", Key: "k2", ValueJson: "2"})
			return err
		}},
		{"GetItem", "user", func(ctx context.Context) error {
			_, err := d.GetItem(ctx, &pb.GetItemRequest{UserId: "alice", Collection: "c", Key: "k"})
			return err
		}},
		{"DeleteItem", "user", func(ctx context.Context) error {
			_, err := d.DeleteItem(ctx, &pb.DeleteItemRequest{UserId: "alice", Collection: "c", Key: "k", ExpectedVersion: &v999})
			return err
		}},
		{"ListItems", "user", func(ctx context.Context) error {
			_, err := d.ListItems(ctx, &pb.ListItemsRequest{UserId: "alice", Collection: "c"})
			return err
		}},
		{"GetConfig", "config-read", func(ctx context.Context) error {
			_, err := d.GetConfig(ctx, &pb.GetConfigRequest{Namespace: "ns", Key: "k"})
			return err
		}},
		{"ListConfig", "config-read", func(ctx context.Context) error {
			_, err := d.ListConfig(ctx, &pb.ListConfigRequest{Namespace: "ns"})
			return err
		}},
		{"SetConfig", "config-write", func(ctx context.Context) error {
			_, err := d.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "ns", Key: "k", ValueJson: "2"})
			return err
		}},
		{"DeleteConfig", "config-write", func(ctx context.Context) error {
			_, err := d.DeleteConfig(ctx, &pb.DeleteConfigRequest{Namespace: "ns", Key: "k", ExpectedVersion: &v999})
			return err
		}},
		{"GetTopology", "admin", func(ctx context.Context) error { _, err := a.GetTopology(ctx, &pb.GetTopologyRequest{}); return err }},
		{"LocateUser", "admin", func(ctx context.Context) error {
			_, err := a.LocateUser(ctx, &pb.LocateUserRequest{UserId: "alice"})
			return err
		}},
		{"MigrationStatus", "admin", func(ctx context.Context) error {
			_, err := a.MigrationStatus(ctx, &pb.MigrationStatusRequest{})
			return err
		}},
		{"SetConfigSchema", "admin", func(ctx context.Context) error {
			_, err := a.SetConfigSchema(ctx, &pb.SetConfigSchemaRequest{Namespace: "other"})
			return err
		}},
		{"GetConfigSchema", "schema-read", func(ctx context.Context) error {
			_, err := a.GetConfigSchema(ctx, &pb.GetConfigSchemaRequest{Namespace: "ns"})
			return err
		}},
	}

	type principal struct {
		name   string
		token  string
		expect func(kind string) outcome
	}
	refuse := func(string) outcome { return unauthenticated }
	principals := []principal{{"none", "", refuse}}
	for name, tok := range keys.BadTokens(t) {
		principals = append(principals, principal{name, tok, refuse})
	}
	principals = append(principals,
		principal{"user for another user", keys.Token(t, "user", "bob"), func(kind string) outcome {
			switch kind {
			case "session", "session-absent":
				return notFound
			case "config-read":
				return allowed
			}
			return denied
		}},
		principal{"user itself", keys.Token(t, "user", "alice"), func(kind string) outcome {
			switch kind {
			case "user", "session", "session-absent", "config-read":
				return allowed
			}
			return denied
		}},
		principal{"service", keys.Token(t, "service", "backend"), func(kind string) outcome {
			if kind == "admin" {
				return denied
			}
			return allowed
		}},
		principal{"admin", keys.Token(t, "admin", "ops"), func(string) outcome { return allowed }},
	)
	for _, p := range principals {
		for _, r := range rpcs {
			err := r.call(authtest.Bearer(ctx, p.token))
			got := status.Code(err)
			switch want := p.expect(r.kind); want {
			case allowed:
				switch got {
				case codes.Unauthenticated, codes.PermissionDenied, codes.InvalidArgument, codes.Internal, codes.Unknown:
					t.Errorf("%s / %s: got %v (%v), want the call to be allowed", p.name, r.name, got, err)
				}
			case unauthenticated, denied, notFound:
				wantCode := map[outcome]codes.Code{unauthenticated: codes.Unauthenticated, denied: codes.PermissionDenied, notFound: codes.NotFound}[want]
				if got != wantCode {
					t.Errorf("%s / %s: got %v (%v), want %v", p.name, r.name, got, err, wantCode)
				}
			}
		}
	}

	// Another user's session is untouched by its failed calls.
	bob := authtest.Bearer(ctx, keys.Token(t, "user", "bob"))
	_, err = ts.data.RevokeSession(bob, &pb.RevokeSessionRequest{Token: sess.GetToken()})
	wantCode(t, err, codes.NotFound)
	if _, err := ts.data.GetSession(authtest.Bearer(ctx, keys.Token(t, "user", "alice")), &pb.GetSessionRequest{Token: sess.GetToken()}); err != nil {
		t.Fatalf("alice's session after bob's revoke: %v", err)
	}
}

// TestAuthWatchEndToEnd: over a real server with events on, a user token
// follows its own changes and is refused another user's.
func TestAuthWatchEndToEnd(t *testing.T) {
	keys := authtest.NewKeys(t)
	ts := newTestCluster(t, 2).startWith(t, false, GRPCOptions{Auth: keys.Verifier(t)}, nil, withEvents(t, 0))
	ctx := ctxT(t)
	alice := authtest.Bearer(ctx, keys.Token(t, "user", "alice"))

	st, err := ts.data.Watch(authtest.Bearer(ctx, keys.Token(t, "user", "alice")), &pb.WatchRequest{UserIds: []string{"bob"}})
	if err == nil {
		_, err = st.Recv()
	}
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("alice watching bob: %v, want PermissionDenied", err)
	}

	st, err = ts.data.Watch(alice, &pb.WatchRequest{UserIds: []string{"alice"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.data.PutUser(alice, &pb.PutUserRequest{UserId: "alice", ProfileJson: `{"n":1}`}); err != nil {
		t.Fatal(err)
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("alice watching herself: %v", err)
		}
		if ev := resp.GetEvent(); ev != nil {
			if ev.GetUserId() != "alice" || ev.GetEntity() != "user" {
				t.Fatalf("event %v", ev)
			}
			break
		}
	}
}

// A user token holds at most maxWatchesPerUser watches on an instance, so it
// cannot take the slots pushers need; another user is unaffected.
func TestUserWatchCap(t *testing.T) {
	keys := authtest.NewKeys(t)
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{Auth: keys.Verifier(t)}, nil, withEvents(t, 0))
	open := func(user string) (context.CancelFunc, error) {
		ctx, cancel := context.WithCancel(authtest.Bearer(ctxT(t), keys.Token(t, "user", user)))
		st, err := ts.data.Watch(ctx, &pb.WatchRequest{UserIds: []string{user}})
		if err == nil {
			_, err = st.Recv() // the first heartbeat: the watch is open
		}
		return cancel, err
	}
	var cancels []context.CancelFunc
	defer func() {
		for _, c := range cancels {
			c()
		}
	}()
	for i := range maxWatchesPerUser {
		cancel, err := open("alice")
		cancels = append(cancels, cancel)
		if err != nil {
			t.Fatalf("alice's watch %d: %v", i+1, err)
		}
	}
	cancel, err := open("alice")
	cancel()
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("alice's watch %d: %v, want ResourceExhausted", maxWatchesPerUser+1, err)
	}
	cancel, err = open("bob")
	cancel()
	if err != nil {
		t.Fatalf("bob's first watch: %v", err)
	}
	cancels[0]()
	waitUntil(t, "alice's closed watch to release its slot", func() bool {
		cancel, err := open("alice")
		cancel()
		return err == nil
	})
}

// startRedis runs a redis-server of the test's own on a free port, so the
// test can kill it. It returns the address and a kill function.
func startRedis(t testing.TB) (string, func()) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, port, _ := strings.Cut(addr, ":")
	cmd := exec.Command("redis-server", "--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	kill := func() {
		cmd.Process.Kill()
		<-done
	}
	t.Cleanup(kill)
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if i == 100 {
			t.Fatalf("redis-server on %s did not come up: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return addr, kill
}

func newRedisClient(t testing.TB, addr string) rueidis.Client {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// burst makes n GetUser calls as tok and returns how many were allowed,
// how long they took, and the retry-after-ms of a refused one.
func burst(t *testing.T, data pb.DataServiceClient, tok string, n int) (allowed int, took time.Duration, retryAfter string) {
	t.Helper()
	ctx := authtest.Bearer(ctxT(t), tok)
	start := time.Now()
	for range n {
		var hdr metadata.MD
		_, err := data.GetUser(ctx, &pb.GetUserRequest{UserId: "alice"}, grpc.Header(&hdr))
		switch status.Code(err) {
		case codes.OK, codes.NotFound:
			allowed++
		case codes.ResourceExhausted:
			if v := hdr.Get(ratelimit.RetryAfterKey); len(v) == 1 {
				retryAfter = v[0]
			}
		default:
			t.Fatalf("GetUser: %v", err)
		}
	}
	return allowed, time.Since(start), retryAfter
}

// maxAllowed is what a bucket of rate r and burst b may allow in d.
func maxAllowed(r ratelimit.Rate, d time.Duration) int {
	return r.Burst + int(r.PerSecond*d.Seconds()) + 1
}

func TestRateLimitBurstAndFallback(t *testing.T) {
	addr, kill := startRedis(t)
	keys := authtest.NewKeys(t)
	rate := ratelimit.Rate{PerSecond: 2, Burst: 5}
	var logs strings.Builder
	lim := ratelimit.New(ratelimit.Options{
		Redis:  newRedisClient(t, addr),
		Prefix: "sgtest:" + testenv.RandomHex(6) + ":",
		Rates:  map[ratelimit.Class]ratelimit.Rate{ratelimit.ClassRead: rate},
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{Auth: keys.Verifier(t), Limiter: lim}, nil)

	// 10× the bucket from one principal.
	n := 10 * rate.Burst
	got, took, retry := burst(t, ts.data, keys.Token(t, "service", "noisy"), n)
	if got > maxAllowed(rate, took) || got < rate.Burst {
		t.Fatalf("noisy principal: %d of %d calls allowed in %v; want %d..%d", got, n, took, rate.Burst, maxAllowed(rate, took))
	}
	if ms, err := strconv.Atoi(retry); err != nil || ms <= 0 {
		t.Fatalf("refused call carried retry-after-ms %q", retry)
	}
	// Another principal is not affected, nor are writes of the same one.
	if got, _, _ := burst(t, ts.data, keys.Token(t, "service", "quiet"), rate.Burst); got != rate.Burst {
		t.Fatalf("quiet principal: %d of %d allowed", got, rate.Burst)
	}
	if _, err := ts.data.PutUser(authtest.Bearer(ctxT(t), keys.Token(t, "service", "noisy")), &pb.PutUserRequest{UserId: "alice"}); err != nil {
		t.Fatalf("write of the noisy principal (no write limit): %v", err)
	}

	// Redis dies: the limiter keeps limiting, in memory, and says so.
	kill()
	got, took, _ = burst(t, ts.data, keys.Token(t, "service", "after-redis"), n)
	if got > maxAllowed(rate, took) || got < 1 {
		t.Fatalf("without Redis: %d of %d calls allowed in %v; want 1..%d", got, n, took, maxAllowed(rate, took))
	}
	if c := strings.Count(logs.String(), "Redis unavailable"); c != 1 {
		t.Fatalf("logged the switch to memory %d times, want once:\n%s", c, logs.String())
	}
	metrics := scrape(t, ts.srv)
	if !strings.Contains(metrics, "shardgate_ratelimit_degraded 1") {
		t.Fatal("shardgate_ratelimit_degraded is not 1")
	}
}

func scrape(t testing.TB, s *Server) string {
	t.Helper()
	mfs, err := s.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+"="+l.GetValue())
			}
			v := m.GetGauge().GetValue() + m.GetCounter().GetValue()
			fmt.Fprintf(&b, "%s%v %v\n", mf.GetName(), labels, v)
		}
	}
	return strings.ReplaceAll(b.String(), "[]", "")
}

// selfSigned returns a certificate for 127.0.0.1 and a pool that trusts it.
func selfSigned(t testing.TB) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "server"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// GRPCOptions.TLS is what the server serves with (the configuration itself,
// TLS 1.3 only and reloading, is tested in tlsconfig).
func TestServesTLSFromOptions(t *testing.T) {
	cert, pool := selfSigned(t)
	conf := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}}
	dial := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool}))}
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{TLS: conf}, dial)
	if _, err := ts.admin.GetTopology(ctxT(t), &pb.GetTopologyRequest{}); err != nil {
		t.Fatalf("call over TLS: %v", err)
	}
	plain, err := grpc.NewClient(ts.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if _, err := pb.NewAdminServiceClient(plain).GetTopology(ctxT(t), &pb.GetTopologyRequest{}); err == nil {
		t.Fatal("plaintext call to a TLS server succeeded")
	}
}
