package tlsconfig

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// serve serves the gRPC health service with conf on a free loopback port
// until the test ends, and returns its address.
func serve(t testing.TB, conf *tls.Config) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(conf)))
	healthpb.RegisterHealthServer(g, health.NewServer())
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	return lis.Addr().String()
}

// check makes one health call to addr with the client's TLS settings.
func check(t testing.TB, addr string, client *tls.Config) error {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(client)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

// testCA issues certificates for TLS tests.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue returns a PEM certificate and key for name, for a server (with
// 127.0.0.1 as an IP SAN) or a client.
func (ca *testCA) issue(t testing.TB, name string, serial int64, client bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature,
	}
	if client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
}

func writeFile(t testing.TB, path string, b []byte) {
	t.Helper()
	// Write beside and rename, as certificate tools do, so a handshake
	// never reads half a file.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// tlsFixture writes a server identity (and, for mTLS, a client CA) and
// returns the files.
func tlsFixture(t testing.TB, ca *testCA, mtls bool) Files {
	dir := t.TempDir()
	f := Files{CertFile: filepath.Join(dir, "server.pem"), KeyFile: filepath.Join(dir, "server.key")}
	c, k := ca.issue(t, "server-1", 10, false)
	writeFile(t, f.CertFile, c)
	writeFile(t, f.KeyFile, k)
	if mtls {
		f.ClientCAFile = filepath.Join(dir, "clients.pem")
		writeFile(t, f.ClientCAFile, ca.pem)
	}
	return f
}

func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

func TestTLSVersionsAndReload(t *testing.T) {
	ca := newTestCA(t)
	files := tlsFixture(t, ca, false)
	conf, err := New(files, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, conf)
	if err := check(t, addr, &tls.Config{RootCAs: ca.pool(), MinVersion: tls.VersionTLS13}); err != nil {
		t.Fatalf("TLS 1.3 call: %v", err)
	}
	if _, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.pool(), MaxVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}); err == nil {
		t.Fatal("TLS 1.2 handshake succeeded")
	}
	serving := func() string {
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.pool(), NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if v := c.ConnectionState().Version; v != tls.VersionTLS13 {
			t.Fatalf("negotiated %x, want TLS 1.3", v)
		}
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if got := serving(); got != "server-1" {
		t.Fatalf("serving %q", got)
	}
	// Rotate: the next handshakes pick up the new certificate.
	c, k := ca.issue(t, "server-2", 11, false)
	writeFile(t, files.KeyFile, k)
	writeFile(t, files.CertFile, c)
	deadline := time.Now().Add(10 * time.Second)
	for serving() != "server-2" {
		if time.Now().After(deadline) {
			t.Fatal("new certificate not served after 10s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestMutualTLS(t *testing.T) {
	ca := newTestCA(t)
	conf, err := New(tlsFixture(t, ca, true), nil)
	if err != nil {
		t.Fatal(err)
	}
	cc, ck := ca.issue(t, "client", 20, true)
	clientCert, err := tls.X509KeyPair(cc, ck)
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, conf)
	if err := check(t, addr, &tls.Config{RootCAs: ca.pool(), Certificates: []tls.Certificate{clientCert}}); err != nil {
		t.Fatalf("mTLS call with a client certificate: %v", err)
	}
	if err := check(t, addr, &tls.Config{RootCAs: ca.pool()}); err == nil {
		t.Fatal("mTLS call without a client certificate succeeded")
	}
}
