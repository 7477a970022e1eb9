package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// devEnv makes sure the machine's PostgreSQL and Redis are running, starting
// them, or installing them with apt-get on Debian/Ubuntu as root, as needed.
type devEnv struct {
	log     *slog.Logger
	install bool
}

// pgStartWait is how long dev mode waits for a PostgreSQL it started.
const pgStartWait = 30 * time.Second

func (e devEnv) ensurePostgres(ctx context.Context, adminDSN string) error {
	cfg, err := pgx.ParseConfig(adminDSN)
	if err != nil {
		// pgx's parse errors may quote the DSN, password included.
		return errors.New("--pg-admin is not a valid PostgreSQL DSN")
	}
	local := isLocalHost(cfg.Host)
	err = pingPostgres(ctx, adminDSN)
	switch {
	case err == nil:
		return e.ensureLogicalWAL(ctx, adminDSN, local)
	case isAuthError(err):
		return loginRefused(adminDSN, err)
	case !isNoServer(err):
		return fmt.Errorf("connect to PostgreSQL at %s: %w", redactDSN(adminDSN), err)
	case !local:
		return fmt.Errorf("PostgreSQL at %s is not running, and dev mode only starts a local one: %w", redactDSN(adminDSN), err)
	}
	e.log.Info("PostgreSQL not running; trying to start it", "err", err)
	touched, err := e.startPostgres(ctx, strconv.Itoa(int(cfg.Port)))
	if err != nil {
		return err
	}
	err = waitForPostgres(ctx, adminDSN)
	if isAuthError(err) && touched != nil {
		// A cluster dev mode just installed or created has Debian's default
		// scram-sha-256 for TCP; make it match the documented dev setup.
		// Clusters it merely started keep the auth their owner chose.
		if ferr := e.trustLoopback(ctx, *touched); ferr != nil {
			e.log.Warn("cannot configure loopback trust auth", "cluster", touched.id(), "err", ferr)
		} else {
			// A reload applies asynchronously, so refusals may last a moment.
			err = waitFor(ctx, 5*time.Second, func() error { return pingPostgres(ctx, adminDSN) }, nil)
		}
	}
	switch {
	case isAuthError(err):
		return loginRefused(adminDSN, err)
	case err != nil:
		return fmt.Errorf("PostgreSQL did not come up: %w", err)
	}
	return e.ensureLogicalWAL(ctx, adminDSN, local)
}

func pingPostgres(ctx context.Context, dsn string) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// waitForPostgres waits for a starting server to accept the login. A
// refused login ends the wait: time does not fix it.
func waitForPostgres(ctx context.Context, dsn string) error {
	return waitFor(ctx, pgStartWait, func() error { return pingPostgres(ctx, dsn) }, isAuthError)
}

// isAuthError reports whether the server refused the login (SQLSTATE class
// 28: wrong or missing password, no such role, no pg_hba.conf entry).
func isAuthError(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && strings.HasPrefix(pgErr.Code, "28")
}

// isNoServer reports whether err means no server is running (yet) at the
// address: nothing listens, the socket file is missing, or it is starting.
func isNoServer(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code == "57P03" // cannot_connect_now: starting up
	}
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)
}

func loginRefused(dsn string, err error) error {
	return fmt.Errorf("PostgreSQL refused the login as %s: %w; pass --pg-admin (or SHARDGATE_DEV_PG) with a superuser DSN, password included, e.g. postgres://postgres:PASSWORD@127.0.0.1:5432/postgres?sslmode=disable", redactDSN(dsn), err)
}

// isLocalHost reports whether a pgx host is this machine: a unix socket
// directory or a loopback address.
func isLocalHost(host string) bool {
	if strings.HasPrefix(host, "/") || host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// startPostgres makes sure the local Debian cluster on port runs, installing
// the server or creating a cluster first if needed. It returns that cluster
// if it installed or created it (so its auth is ours to set), nil otherwise.
func (e devEnv) startPostgres(ctx context.Context, port string) (*pgCluster, error) {
	installed := false
	if _, err := exec.LookPath("pg_lsclusters"); err != nil {
		if err := e.aptInstall(ctx, "postgresql"); err != nil {
			return nil, fmt.Errorf("PostgreSQL is not running and cannot be installed here: %w; install PostgreSQL 15+ and start it on 127.0.0.1:5432 with trust auth for user postgres", err)
		}
		installed = true
	}
	clusters, err := localClusters(ctx)
	if err != nil {
		return nil, err
	}
	i := slices.IndexFunc(clusters, func(c pgCluster) bool { return c.port == port })
	if i < 0 {
		if len(clusters) > 0 {
			return nil, fmt.Errorf("no local PostgreSQL cluster on port %s (pg_lsclusters lists others); start one there or point --pg-admin at yours", port)
		}
		c, err := e.createCluster(ctx, port)
		if err != nil {
			return nil, err
		}
		return &c, nil
	}
	c := clusters[i]
	if c.online {
		if installed {
			return &c, nil // the package started it
		}
		return nil, nil
	}
	e.log.Info("starting PostgreSQL", "cluster", c.id())
	if err := e.runCmd(ctx, "pg_ctlcluster", "--skip-systemctl-redirect", c.version, c.name, "start"); err != nil {
		return nil, fmt.Errorf("start PostgreSQL %s: %w", c.id(), err)
	}
	if installed {
		return &c, nil
	}
	return nil, nil // someone else's cluster: started, but its auth is theirs
}

// createCluster creates and starts cluster "main" of the newest installed
// PostgreSQL on port, as root only: like installing, it changes the system.
func (e devEnv) createCluster(ctx context.Context, port string) (pgCluster, error) {
	const hint = "create one with pg_createcluster and start it"
	if !e.install {
		return pgCluster{}, fmt.Errorf("PostgreSQL is installed but has no cluster, and --no-install is set; %s", hint)
	}
	if os.Geteuid() != 0 {
		return pgCluster{}, fmt.Errorf("PostgreSQL is installed but has no cluster, and creating one needs root; %s", hint)
	}
	version, err := newestPostgres()
	if err != nil {
		return pgCluster{}, fmt.Errorf("PostgreSQL has no cluster: %w; %s", err, hint)
	}
	c := pgCluster{version: version, name: "main", port: port}
	e.log.Info("creating PostgreSQL cluster", "cluster", c.id(), "port", port)
	if err := e.runCmd(ctx, "pg_createcluster", "--port", port, "--start", version, c.name); err != nil {
		return pgCluster{}, fmt.Errorf("create PostgreSQL cluster %s: %w", c.id(), err)
	}
	return c, nil
}

// newestPostgres returns the newest PostgreSQL major version installed the
// Debian way, under /usr/lib/postgresql.
func newestPostgres() (string, error) {
	paths, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	best := -1
	for _, p := range paths {
		if v, err := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(p)))); err == nil && v > best {
			best = v
		}
	}
	if best < 0 {
		return "", errors.New("no server under /usr/lib/postgresql")
	}
	return strconv.Itoa(best), nil
}

type pgCluster struct {
	version, name string
	port          string
	online        bool
}

func (c pgCluster) id() string { return c.version + "/" + c.name }

func localClusters(ctx context.Context) ([]pgCluster, error) {
	out, err := exec.CommandContext(ctx, "pg_lsclusters", "--no-header").Output()
	if err != nil {
		return nil, fmt.Errorf("pg_lsclusters: %w", err)
	}
	var list []pgCluster
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		list = append(list, pgCluster{version: f[0], name: f[1], port: f[2], online: strings.HasPrefix(f[3], "online")})
	}
	return list, nil
}

// loopbackTrust are the pg_hba.conf lines dev mode puts first in a cluster
// it set up, so the documented passwordless admin DSN works.
var loopbackTrust = []string{
	"host all all 127.0.0.1/32 trust",
	"host all all ::1/128 trust",
}

// trustLoopback puts loopbackTrust at the top of c's pg_hba.conf and reloads
// c. It needs root; it is for dev machines only, and says so loudly.
func (e devEnv) trustLoopback(ctx context.Context, c pgCluster) error {
	if os.Geteuid() != 0 {
		return errors.New("editing pg_hba.conf needs root")
	}
	path, err := hbaFile(ctx, c)
	if err != nil {
		return err
	}
	old, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	updated, changed := withLoopbackTrust(string(old))
	if !changed {
		return fmt.Errorf("%s already starts with loopback trust", path)
	}
	if err := replaceFile(path, []byte(updated)); err != nil {
		return err
	}
	e.log.Warn("DEV MACHINE ONLY: changed PostgreSQL authentication: every local user may now connect over TCP loopback as any role without a password; delete these lines to undo",
		"cluster", c.id(), "file", path, "added_at_top", strings.Join(loopbackTrust, "; "))
	if err := e.runCmd(ctx, "pg_ctlcluster", "--skip-systemctl-redirect", c.version, c.name, "reload"); err != nil {
		return fmt.Errorf("reload PostgreSQL %s: %w", c.id(), err)
	}
	return nil
}

// hbaFile asks the cluster for its pg_hba.conf over the unix socket (peer
// auth as postgres, which Debian allows), or falls back to Debian's layout.
func hbaFile(ctx context.Context, c pgCluster) (string, error) {
	out, err := exec.CommandContext(ctx, "runuser", "-u", "postgres", "--",
		"psql", "-X", "-w", "-p", c.port, "-d", "postgres", "-Atc", "SHOW hba_file").Output()
	if path := strings.TrimSpace(string(out)); err == nil && filepath.IsAbs(path) {
		return path, nil
	}
	path := filepath.Join("/etc/postgresql", c.version, c.name, "pg_hba.conf")
	if _, serr := os.Stat(path); serr != nil {
		return "", fmt.Errorf("find pg_hba.conf of %s: SHOW hba_file: %v; %w", c.id(), err, serr)
	}
	return path, nil
}

// withLoopbackTrust returns hba with loopbackTrust as its first rules, and
// whether that changed anything.
func withLoopbackTrust(hba string) (string, bool) {
	var rules []string
	for line := range strings.Lines(hba) {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			rules = append(rules, strings.Join(strings.Fields(line), " "))
		}
		if len(rules) == len(loopbackTrust) {
			break
		}
	}
	if slices.Equal(rules, loopbackTrust) {
		return hba, false
	}
	head := "# Added by `shardgate dev` (dev machines only): passwordless loopback logins.\n" +
		strings.Join(loopbackTrust, "\n") + "\n\n"
	return head + hba, true
}

// replaceFile atomically replaces path, keeping its mode and owner.
func replaceFile(path string, data []byte) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), fi.Mode().Perm()); err != nil {
		return err
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		if err := os.Chown(tmp.Name(), int(st.Uid), int(st.Gid)); err != nil {
			return err
		}
	}
	return os.Rename(tmp.Name(), path)
}

// ensureLogicalWAL sets wal_level=logical, which online partition moves
// need, restarting a local cluster once, and lets subscriptions start
// within a moment (see setRetryInterval). It only warns where it cannot:
// only rebalancing needs them.
func (e devEnv) ensureLogicalWAL(ctx context.Context, adminDSN string, local bool) error {
	conn, err := pgx.Connect(ctx, adminDSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	e.setRetryInterval(ctx, conn)
	var level, port string
	if err := conn.QueryRow(ctx, `SELECT current_setting('wal_level'), current_setting('port')`).Scan(&level, &port); err != nil {
		return err
	}
	if level == "logical" {
		return nil
	}
	if _, err := conn.Exec(ctx, `ALTER SYSTEM SET wal_level = logical`); err != nil {
		e.log.Warn("cannot set wal_level=logical; online moves will not work until it is", "err", err)
		return nil
	}
	var clusters []pgCluster
	if local {
		clusters, _ = localClusters(ctx)
	}
	for _, c := range clusters {
		if c.port != port {
			continue
		}
		e.log.Info("restarting PostgreSQL once to apply wal_level=logical", "cluster", c.id())
		if err := e.runCmd(ctx, "pg_ctlcluster", "--skip-systemctl-redirect", c.version, c.name, "restart"); err != nil {
			e.log.Warn("cannot restart PostgreSQL to apply wal_level=logical; online moves will not work until it is restarted", "cluster", c.id(), "err", err)
		}
		// Whether or not the restart worked, the server must answer.
		if err := waitForPostgres(ctx, adminDSN); err != nil {
			return fmt.Errorf("PostgreSQL not reachable after restarting %s for wal_level=logical: %w", c.id(), err)
		}
		return nil
	}
	e.log.Warn("wal_level=logical is set but needs a PostgreSQL restart to apply; restart it yourself", "current", level)
	return nil
}

// setRetryInterval lowers wal_retrieve_retry_interval to 200ms when it is
// longer than a second (PostgreSQL's default is 5s). The logical
// replication launcher starts at most one apply worker per interval, so
// with the default every move's subscription but the first waits up to 5 s
// to start (measured: adding a fifth shard to the dev cluster took 14 s
// instead of 4). A reload applies it.
func (e devEnv) setRetryInterval(ctx context.Context, conn *pgx.Conn) {
	var ms int
	if err := conn.QueryRow(ctx, `SELECT setting::int FROM pg_settings WHERE name = 'wal_retrieve_retry_interval'`).Scan(&ms); err != nil || ms <= 1000 {
		return
	}
	if _, err := conn.Exec(ctx, `ALTER SYSTEM SET wal_retrieve_retry_interval = '200ms'`); err != nil {
		e.log.Warn("cannot lower wal_retrieve_retry_interval; each partition move's subscription may take up to 5 s to start", "err", err)
		return
	}
	if _, err := conn.Exec(ctx, `SELECT pg_reload_conf()`); err != nil {
		e.log.Warn("cannot reload PostgreSQL's configuration", "err", err)
		return
	}
	e.log.Info("set wal_retrieve_retry_interval=200ms, so partition moves' subscriptions start at once")
}

func (e devEnv) ensureRedis(ctx context.Context, addr string) error {
	if pingTCP(addr) == nil {
		return nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--redis %q: %w", addr, err)
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		if err := e.aptInstall(ctx, "redis-server"); err != nil {
			return fmt.Errorf("Redis is not running at %s and cannot be installed here: %w; install Redis 7 and start it", addr, err)
		}
		if pingTCP(addr) == nil { // the package may have started it
			return nil
		}
	}
	e.log.Info("starting redis-server", "addr", addr)
	if err := e.runCmd(ctx, "redis-server", "--daemonize", "yes", "--bind", host, "--port", port, "--save", "", "--appendonly", "no"); err != nil {
		return fmt.Errorf("start Redis: %w", err)
	}
	return waitFor(ctx, 10*time.Second, func() error { return pingTCP(addr) }, nil)
}

func pingTCP(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}

// aptInstall installs Debian packages when this is a Debian-like system and
// we are root; otherwise it says why it cannot.
func (e devEnv) aptInstall(ctx context.Context, pkgs ...string) error {
	if !e.install {
		return errors.New("installing is disabled (--no-install)")
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return errors.New("no apt-get on this system")
	}
	if os.Geteuid() != 0 {
		return errors.New("installing packages needs root")
	}
	e.log.Info("installing with apt-get", "packages", pkgs)
	if err := e.runCmd(ctx, "apt-get", "update"); err != nil {
		return err
	}
	return e.runCmd(ctx, "apt-get", append([]string{"install", "-y", "--no-install-recommends"}, pkgs...)...)
}

func (e devEnv) runCmd(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// waitFor calls check until it succeeds, fails with an error stop reports
// as final (stop may be nil), or limit passes; it returns check's last error.
func waitFor(ctx context.Context, limit time.Duration, check func() error, stop func(error) bool) error {
	deadline := time.Now().Add(limit)
	for {
		err := check()
		if err == nil || (stop != nil && stop(err)) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
