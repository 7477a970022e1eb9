package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"testing"

	"github.com/shardgate/shardgate/internal/testenv"
)

func TestPingErrorKinds(t *testing.T) {
	ctx := context.Background()
	admin := testenv.AdminDSN(t)

	u, _ := url.Parse(admin)
	u.User = url.UserPassword("sg_no_such_role_"+testenv.RandomHex(4), "pw")
	noRole := u.String()
	err := pingPostgres(ctx, noRole)
	if !isAuthError(err) || isNoServer(err) {
		t.Errorf("unknown role: isAuthError=%v isNoServer=%v for %v", isAuthError(err), isNoServer(err), err)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "postgres://postgres@" + l.Addr().String() + "/postgres?sslmode=disable"
	l.Close()
	err = pingPostgres(ctx, closed)
	if !isNoServer(err) || isAuthError(err) {
		t.Errorf("closed port: isAuthError=%v isNoServer=%v for %v", isAuthError(err), isNoServer(err), err)
	}

	err = pingPostgres(ctx, "host=/nonexistent/sgdir user=postgres dbname=postgres")
	if !isNoServer(err) {
		t.Errorf("missing unix socket: isNoServer=false for %v", err)
	}
}

// A refused login on a server dev mode did not set up fails at once, says
// what to do and does not show the password.
func TestEnsurePostgresLoginRefused(t *testing.T) {
	u, _ := url.Parse(testenv.AdminDSN(t))
	u.User = url.UserPassword("sg_no_such_role_"+testenv.RandomHex(4), "s3cret-Pw")
	env := devEnv{log: slog.New(slog.NewTextHandler(io.Discard, nil)), install: false}
	err := env.ensurePostgres(context.Background(), u.String())
	if err == nil {
		t.Fatal("ensurePostgres accepted an unknown role")
	}
	for _, want := range []string{"refused the login", "--pg-admin", "SHARDGATE_DEV_PG"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
	if strings.Contains(err.Error(), "s3cret-Pw") {
		t.Errorf("error shows the password: %v", err)
	}
}

func TestWithLoopbackTrust(t *testing.T) {
	debian := "# comment\nlocal   all   postgres   peer\nhost all all 127.0.0.1/32 scram-sha-256\n"
	got, changed := withLoopbackTrust(debian)
	if !changed || !strings.HasSuffix(got, debian) {
		t.Fatalf("withLoopbackTrust did not prepend:\n%s", got)
	}
	rules := 0
	for line := range strings.Lines(got) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if rules < len(loopbackTrust) && line != loopbackTrust[rules] {
			t.Errorf("rule %d = %q, want %q", rules, line, loopbackTrust[rules])
		}
		rules++
	}
	if again, changed := withLoopbackTrust(got); changed || again != got {
		t.Errorf("withLoopbackTrust changed a file that already starts with loopback trust:\n%s", again)
	}
	spaced := "# x\n\nhost  all\tall 127.0.0.1/32   trust\nhost all all ::1/128 trust\nlocal all all peer\n"
	if _, changed := withLoopbackTrust(spaced); changed {
		t.Error("withLoopbackTrust did not recognise its rules with other spacing")
	}
}

func TestRedactDSN(t *testing.T) {
	for _, dsn := range []string{
		"postgres://u:s3cret@h/db",
		"postgresql://u@h/db?password=s3cret",
		"host=h user=u password=s3cret dbname=db",
		"u:s3cret@h/db",
		"%zz s3cret",
	} {
		if got := redactDSN(dsn); strings.Contains(got, "s3cret") {
			t.Errorf("redactDSN(%q) = %q", dsn, got)
		}
	}
	if got := redactDSN("postgres://u:pw@h:5432/db?sslmode=disable"); got != "postgres://u:xxxxx@h:5432/db?sslmode=disable" {
		t.Errorf("redactDSN = %q", got)
	}
}

func TestIsLocalHost(t *testing.T) {
	for host, want := range map[string]bool{
		"127.0.0.1": true, "::1": true, "localhost": true, "/var/run/postgresql": true,
		"10.0.0.1": false, "db.example.com": false, "": false,
	} {
		if got := isLocalHost(host); got != want {
			t.Errorf("isLocalHost(%q) = %v", host, got)
		}
	}
}
