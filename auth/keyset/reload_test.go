package keyset

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
)

// fakeClock is a settable clock, read by fetches in the background too.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }
func edKey(t testing.TB) ed25519.PrivateKey  { _, k, _ := ed25519.GenerateKey(rand.Reader); return k }
func setOf(keys ...map[string]string) []byte {
	b, _ := json.Marshal(map[string]any{"keys": keys})
	return b
}

// countingTransport counts round trips that have returned.
type countingTransport struct{ done atomic.Int32 }

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	defer c.done.Add(1)
	return http.DefaultTransport.RoundTrip(r)
}

// waitIdle waits until no fetch runs.
func waitIdle(t testing.TB, j *JWKS) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		j.mu.Lock()
		idle := j.flight == nil
		j.mu.Unlock()
		if idle {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("a JWKS fetch never ended")
		}
	}
}

// blockingJWKS serves set(); once block is set, each request waits for
// release (or its client to give up) before answering.
type blockingJWKS struct {
	srv     *httptest.Server
	set     atomic.Pointer[[]byte]
	block   atomic.Bool
	entered chan struct{}
	release chan struct{}
	rt      countingTransport
}

func newBlockingJWKS(t *testing.T, set []byte) *blockingJWKS {
	b := &blockingJWKS{entered: make(chan struct{}, 100), release: make(chan struct{})}
	b.set.Store(&set)
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if b.block.Load() {
			b.entered <- struct{}{}
			select {
			case <-b.release:
			case <-r.Context().Done():
				return
			}
		}
		w.Write(*b.set.Load())
	}))
	t.Cleanup(b.srv.Close)
	return b
}

func (b *blockingJWKS) client() *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &b.rt}
}

// A token naming an unknown kid starts a refetch; while it runs, lookups
// of known keys answer at once from the current set, and the unknown
// kid's lookup waits for the fetch (or its own context).
func TestJWKSRefetchDoesNotStallKnownKeys(t *testing.T) {
	k1, k2 := edKey(t), edKey(t)
	b := newBlockingJWKS(t, setOf(jwkOf(t, "k1", k1.Public())))
	j := &JWKS{URL: b.srv.URL, Client: b.client(), MinRefetch: time.Nanosecond, Logger: slog.New(slog.DiscardHandler)}
	ctx := context.Background()
	if err := j.Fetch(ctx); err != nil {
		t.Fatal(err)
	}
	rotated := setOf(jwkOf(t, "k1", k1.Public()), jwkOf(t, "k2", k2.Public()))
	b.set.Store(&rotated)
	b.block.Store(true)

	unknown := make(chan error, 1)
	go func() {
		k, err := j.Key(ctx, "k2")
		if err == nil && !k.Equal(Key{Alg: "EdDSA", Verify: k2.Public()}) {
			err = errors.New("k2 resolved to another key")
		}
		unknown <- err
	}()
	<-b.entered // the refetch for k2 is in flight, held by the server

	for range 3 {
		k, err := j.Key(ctx, "k1")
		if err != nil || !k.Equal(Key{Alg: "EdDSA", Verify: k1.Public()}) {
			t.Fatalf("known key during a refetch: %v", err)
		}
	}
	if n := b.rt.done.Load(); n != 1 {
		t.Fatal("the lookup of a known key returned only after the refetch for an unknown kid ended")
	}
	// Another unknown kid joins the running fetch; its context still rules.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := j.Key(cctx, "k3"); !errors.Is(err, context.Canceled) {
		t.Fatalf("unknown kid with a cancelled context during a fetch: %v", err)
	}
	select {
	case err := <-unknown:
		t.Fatalf("the unknown kid's lookup did not wait for its fetch: %v", err)
	default:
	}
	close(b.release)
	if err := <-unknown; err != nil {
		t.Fatalf("the rotated-in key after the refetch: %v", err)
	}
	if n := b.rt.done.Load(); n != 2 {
		t.Fatalf("%d fetches, want 2", n)
	}
}

// Many lookups of a new kid at once share one fetch.
func TestJWKSOneFetchForManyLookups(t *testing.T) {
	k1, k2 := edKey(t), edKey(t)
	b := newBlockingJWKS(t, setOf(jwkOf(t, "k1", k1.Public())))
	j := &JWKS{URL: b.srv.URL, Client: b.client(), MinRefetch: time.Nanosecond, Logger: slog.New(slog.DiscardHandler)}
	ctx := context.Background()
	if err := j.Fetch(ctx); err != nil {
		t.Fatal(err)
	}
	rotated := setOf(jwkOf(t, "k2", k2.Public()))
	b.set.Store(&rotated)
	b.block.Store(true)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Go(func() {
			_, err := j.Key(ctx, "k2")
			errs <- err
		})
	}
	<-b.entered
	close(b.release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := b.rt.done.Load(); n != 2 {
		t.Fatalf("%d fetches for 20 concurrent lookups of one new kid, want 2 (start + one)", n)
	}
	// The withdrawn key is gone.
	if _, err := j.Key(ctx, "k1"); err == nil {
		t.Fatal("a key removed from the set still resolves")
	}
}

// Keys Shardgate cannot use are skipped and logged; the others load, at
// start and on refetch.
func TestJWKSSkipsUnusableKeys(t *testing.T) {
	k1, k2 := edKey(t), edKey(t)
	odd := []map[string]string{
		{"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
		{"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
		{"kty": "PQC", "kid": "future"},
	}
	b := newBlockingJWKS(t, setOf(append([]map[string]string{jwkOf(t, "k1", k1.Public())}, odd...)...))
	var logs testenv.LogBuffer
	j := &JWKS{URL: b.srv.URL, Client: b.client(), MinRefetch: time.Nanosecond, Logger: logs.Logger()}
	ctx := context.Background()
	if err := j.Fetch(ctx); err != nil {
		t.Fatalf("a set with one usable key among odd ones: %v", err)
	}
	if _, err := j.Key(ctx, "k1"); err != nil {
		t.Fatal(err)
	}
	for _, kid := range []string{"p384", "hmac", "future"} {
		if _, err := j.Key(ctx, kid); err == nil {
			t.Errorf("unusable key %q resolves", kid)
		}
		if !strings.Contains(logs.String(), kid) {
			t.Errorf("skipped key %q not logged:\n%s", kid, logs.String())
		}
	}
	// A rotation that publishes a new key next to an odd one loads it.
	rotated := setOf(append([]map[string]string{jwkOf(t, "k2", k2.Public())}, odd[0])...)
	b.set.Store(&rotated)
	if _, err := j.Key(ctx, "k2"); err != nil {
		t.Fatalf("new key published next to an unusable one: %v", err)
	}
	waitIdle(t, j)
}

// A set that cannot be refreshed is used up to MaxAge after it was
// fetched, then refused (fail closed), until a fetch succeeds again.
func TestJWKSFailsClosedPastMaxAge(t *testing.T) {
	k1 := edKey(t)
	var failing atomic.Bool
	var fetches atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		if failing.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Write(setOf(jwkOf(t, "k1", k1.Public())))
	}))
	defer srv.Close()
	clk := newFakeClock()
	var logs testenv.LogBuffer
	j := &JWKS{URL: srv.URL, Refresh: 10 * time.Minute, MinRefetch: 30 * time.Second, MaxAge: time.Hour, Logger: logs.Logger(), now: clk.Now}
	ctx := context.Background()
	if err := j.Fetch(ctx); err != nil {
		t.Fatal(err)
	}
	failing.Store(true)
	key := func() error {
		_, err := j.Key(ctx, "k1")
		waitIdle(t, j)
		return err
	}
	clk.Advance(30 * time.Minute) // due for refresh: the refetch fails, the set stays
	if err := key(); err != nil {
		t.Fatalf("30 min after the last fetch, refresh failing: %v", err)
	}
	if fetches.Load() != 2 {
		t.Fatalf("%d fetches, want a refresh", fetches.Load())
	}
	clk.Advance(29 * time.Minute)
	if err := key(); err != nil {
		t.Fatalf("59 min after the last fetch: %v", err)
	}
	clk.Advance(2 * time.Minute)
	if err := key(); !errors.Is(err, errTooOld) {
		t.Fatalf("61 min after the last fetch (max age 1h), fetches failing: %v, want refused", err)
	}
	if !strings.Contains(logs.String(), "maximum age") {
		t.Fatalf("refusing the set was not logged:\n%s", logs.String())
	}
	// Refused without a fetch per call.
	before := fetches.Load()
	for range 5 {
		if err := key(); !errors.Is(err, errTooOld) {
			t.Fatal(err)
		}
	}
	if fetches.Load() != before {
		t.Fatalf("%d fetches within a second", fetches.Load()-before)
	}
	failing.Store(false)
	clk.Advance(2 * time.Second)
	if err := key(); err != nil {
		t.Fatalf("after the issuer came back: %v", err)
	}
}

// writeKeys writes PEM public keys named by kid to path, with the given
// modification time, so the change is visible whatever the file system's
// time granularity.
func writeKeys(t *testing.T, path string, mtime time.Time, keys map[string]any) {
	t.Helper()
	var out []byte
	for kid, pub := range keys {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Headers: map[string]string{"kid": kid}, Bytes: der})...)
	}
	writeFile(t, path, mtime, out)
}

func writeFile(t *testing.T, path string, mtime time.Time, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, mtime, mtime); err != nil {
		t.Fatal(err)
	}
}

// The key file is read again when it changes (checked at most once a
// second); a new file that does not load keeps the old keys, logged once.
func TestFileReloadsOnChange(t *testing.T) {
	a, b := edKey(t), edKey(t)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	path := filepath.Join(t.TempDir(), "keys.pem")
	mtime := time.Now().Add(-time.Hour)
	writeKeys(t, path, mtime, map[string]any{"a": a.Public()})
	var logs testenv.LogBuffer
	f, err := LoadFile(path, logs.Logger())
	if err != nil {
		t.Fatal(err)
	}
	clk := newFakeClock()
	f.now = clk.Now
	ctx := context.Background()
	has := func(kid string) bool { _, err := f.Key(ctx, kid); return err == nil }
	if !has("a") || has("b") {
		t.Fatal("initial keys")
	}

	writeKeys(t, path, mtime.Add(time.Minute), map[string]any{"b": b.Public()})
	clk.Advance(time.Second)
	if !has("b") || has("a") {
		t.Fatalf("after the file changed: a=%v b=%v; want only b", has("a"), has("b"))
	}

	writeFile(t, path, mtime.Add(2*time.Minute), []byte("-----BEGIN PUBLIC KEY-----\nhalf a ke"))
	clk.Advance(time.Second)
	if !has("b") {
		t.Fatal("a broken file replaced the keys")
	}
	clk.Advance(time.Second)
	has("b")
	if n := strings.Count(logs.String(), "cannot be loaded"); n != 1 {
		t.Fatalf("the broken file logged %d times, want once:\n%s", n, logs.String())
	}

	// A key of an unusable type next to a good one: skipped and logged.
	writeKeys(t, path, mtime.Add(3*time.Minute), map[string]any{"a": a.Public(), "p384": &p384.PublicKey})
	clk.Advance(time.Second)
	if !has("a") || has("b") || has("p384") {
		t.Fatalf("after a file with a P-384 key: a=%v b=%v p384=%v", has("a"), has("b"), has("p384"))
	}
	if !strings.Contains(logs.String(), `kid \"p384\"`) {
		t.Fatalf("the skipped key was not logged:\n%s", logs.String())
	}

	// Removed: the keys stay.
	os.Remove(path)
	clk.Advance(time.Second)
	if !has("a") {
		t.Fatal("a removed file dropped the keys")
	}
}
