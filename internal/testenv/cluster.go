package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// PGBinDir holds initdb and pg_ctl; SHARDGATE_TEST_PG_BIN overrides it.
const PGBinDir = "/usr/lib/postgresql/15/bin"

// PGCluster is a PostgreSQL server of a test's own, for fault tests that
// stop and start a shard. It listens on a free loopback port with trust
// auth and wal_level=logical, and is removed when the test ends. It skips
// fsync (a killed server loses nothing the OS has) but keeps synchronous
// commit, so a crash never loses an acknowledged write.
type PGCluster struct {
	t    testing.TB
	dir  string
	port int
	bin  string
	run  []string // command prefix: runuser as postgres when we are root
}

// NewPGCluster initialises and starts a throwaway cluster. It fails the
// test (never skips) if the PostgreSQL binaries are missing.
func NewPGCluster(t testing.TB) *PGCluster {
	t.Helper()
	bin := os.Getenv("SHARDGATE_TEST_PG_BIN")
	if bin == "" {
		bin = PGBinDir
	}
	if _, err := os.Stat(filepath.Join(bin, "initdb")); err != nil {
		t.Fatalf("testenv: PostgreSQL server binaries are required in %s (set SHARDGATE_TEST_PG_BIN): %v", bin, err)
	}
	c := &PGCluster{t: t, bin: bin, port: freePort(t)}
	parent := os.TempDir()
	if os.Geteuid() == 0 {
		// PostgreSQL refuses to run as root: run it as the postgres user,
		// in a directory that user owns.
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("testenv: running as root needs a postgres user for extra clusters: %v", err)
		}
		c.run = []string{"runuser", "-u", "postgres", "--"}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		// A fresh, unpredictable directory straight in the sticky temp
		// dir: nothing another user made can be followed into.
		dir, err := os.MkdirTemp(parent, "shardgate-pg-")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
		c.dir = dir
	} else {
		c.dir = t.TempDir()
	}
	t.Cleanup(func() {
		c.pgctl("stop", "-m", "immediate") // may already be stopped
		os.RemoveAll(c.dir)
	})
	data := filepath.Join(c.dir, "data")
	if out, err := c.cmd("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("testenv: initdb: %v: %s", err, out)
	}
	conf := fmt.Sprintf("\nport = %d\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n"+
		"wal_level = logical\nfsync = off\nfull_page_writes = off\nmax_connections = 50\n"+
		// Subscriptions start at once, not one per 5 s (see docs/rebalancing.md).
		"wal_retrieve_retry_interval = 200ms\n", c.port, c.dir)
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteString(conf)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	return c
}

// DSN returns a DSN for database name on this cluster.
func (c *PGCluster) DSN(name string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable&connect_timeout=2", c.port, name)
}

// CreateDatabase creates a UTF-8 database and returns its DSN.
func (c *PGCluster) CreateDatabase(name string) string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.DSN("postgres"))
	if err != nil {
		c.t.Fatalf("testenv: connect to extra cluster: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()+" ENCODING 'UTF8' TEMPLATE template0"); err != nil {
		c.t.Fatalf("testenv: create database %s: %v", name, err)
	}
	return c.DSN(name)
}

// Stop kills the server at once, as a crash would (no shutdown checkpoint).
func (c *PGCluster) Stop() {
	c.t.Helper()
	if out, err := c.pgctl("stop", "-m", "immediate"); err != nil {
		c.t.Fatalf("testenv: stop cluster: %v: %s", err, out)
	}
}

// Start starts the server and waits until it accepts connections.
func (c *PGCluster) Start() {
	c.t.Helper()
	if out, err := c.pgctl("start", "-w", "-t", "60", "-l", filepath.Join(c.dir, "log")); err != nil {
		log, _ := os.ReadFile(filepath.Join(c.dir, "log"))
		c.t.Fatalf("testenv: start cluster: %v: %s\n%s", err, out, log)
	}
}

func (c *PGCluster) pgctl(args ...string) ([]byte, error) {
	return c.cmd("pg_ctl", append([]string{"-D", filepath.Join(c.dir, "data")}, args...)...).CombinedOutput()
}

func (c *PGCluster) cmd(name string, args ...string) *exec.Cmd {
	argv := append(append(append([]string{}, c.run...), filepath.Join(c.bin, name)), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = c.dir
	cmd.Env = append(os.Environ(), "LC_ALL=C.UTF-8")
	return cmd
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := strings.Cut(l.Addr().String(), ":")
	n, _ := strconv.Atoi(port)
	return n
}
