package server

import (
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

	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/ratelimit"
)

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
	ctx := bearer(ctxT(t), tok)
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
	keys := newTestKeys(t)
	rate := ratelimit.Rate{PerSecond: 2, Burst: 5}
	var logs strings.Builder
	lim := ratelimit.New(ratelimit.Options{
		Redis:  newRedisClient(t, addr),
		Prefix: "sgtest:" + testenv.RandomHex(6) + ":",
		Rates:  map[ratelimit.Class]ratelimit.Rate{ratelimit.ClassRead: rate},
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	ts := newTestCluster(t, 1).startWith(t, false, GRPCOptions{Auth: keys.verifier(t), Limiter: lim}, nil)

	// 10× the bucket from one principal.
	n := 10 * rate.Burst
	got, took, retry := burst(t, ts.data, keys.token(t, "service", "noisy"), n)
	if got > maxAllowed(rate, took) || got < rate.Burst {
		t.Fatalf("noisy principal: %d of %d calls allowed in %v; want %d..%d", got, n, took, rate.Burst, maxAllowed(rate, took))
	}
	if ms, err := strconv.Atoi(retry); err != nil || ms <= 0 {
		t.Fatalf("refused call carried retry-after-ms %q", retry)
	}
	// Another principal is not affected, nor are writes of the same one.
	if got, _, _ := burst(t, ts.data, keys.token(t, "service", "quiet"), rate.Burst); got != rate.Burst {
		t.Fatalf("quiet principal: %d of %d allowed", got, rate.Burst)
	}
	if _, err := ts.data.PutUser(bearer(ctxT(t), keys.token(t, "service", "noisy")), &pb.PutUserRequest{UserId: "alice"}); err != nil {
		t.Fatalf("write of the noisy principal (no write limit): %v", err)
	}

	// Redis dies: the limiter keeps limiting, in memory, and says so.
	kill()
	got, took, _ = burst(t, ts.data, keys.token(t, "service", "after-redis"), n)
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
