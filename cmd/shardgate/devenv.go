package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// devEnv makes sure the machine's PostgreSQL and Redis are running, starting
// them, or installing them with apt-get on Debian/Ubuntu as root, as needed.
type devEnv struct {
	log     *slog.Logger
	install bool
}

func (e devEnv) ensurePostgres(ctx context.Context, adminDSN string) error {
	if err := pingPostgres(ctx, adminDSN); err != nil {
		e.log.Info("PostgreSQL not reachable; trying to start it", "err", err)
		if err := e.startPostgres(ctx); err != nil {
			return err
		}
		if err := waitFor(ctx, 30*time.Second, func() error { return pingPostgres(ctx, adminDSN) }); err != nil {
			return fmt.Errorf("PostgreSQL did not come up: %w", err)
		}
	}
	return e.ensureLogicalWAL(ctx, adminDSN)
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

// startPostgres starts the local Debian cluster(s), installing the server
// first if there is none.
func (e devEnv) startPostgres(ctx context.Context) error {
	if _, err := exec.LookPath("pg_lsclusters"); err != nil {
		if err := e.aptInstall(ctx, "postgresql"); err != nil {
			return fmt.Errorf("PostgreSQL is not running and cannot be installed here: %w; install PostgreSQL 15+ and start it on 127.0.0.1:5432 with trust auth for user postgres", err)
		}
	}
	clusters, err := localClusters(ctx)
	if err != nil {
		return err
	}
	if len(clusters) == 0 {
		return errors.New("PostgreSQL is installed but has no cluster; create one with pg_createcluster")
	}
	for _, c := range clusters {
		if c.online {
			continue
		}
		if err := e.runCmd(ctx, "pg_ctlcluster", "--skip-systemctl-redirect", c.version, c.name, "start"); err != nil {
			return fmt.Errorf("start PostgreSQL %s/%s: %w", c.version, c.name, err)
		}
	}
	return nil
}

type pgCluster struct {
	version, name string
	port          string
	online        bool
}

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

// ensureLogicalWAL sets wal_level=logical, which online partition moves
// need, restarting the local cluster once. It only warns where it cannot.
func (e devEnv) ensureLogicalWAL(ctx context.Context, adminDSN string) error {
	conn, err := pgx.Connect(ctx, adminDSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
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
	clusters, _ := localClusters(ctx)
	for _, c := range clusters {
		if c.port == port {
			e.log.Info("restarting PostgreSQL once to apply wal_level=logical", "cluster", c.version+"/"+c.name)
			if err := e.runCmd(ctx, "pg_ctlcluster", "--skip-systemctl-redirect", c.version, c.name, "restart"); err != nil {
				return fmt.Errorf("restart PostgreSQL for wal_level=logical: %w", err)
			}
			return waitFor(ctx, 30*time.Second, func() error { return pingPostgres(ctx, adminDSN) })
		}
	}
	e.log.Warn("wal_level=logical is set but needs a PostgreSQL restart to apply; restart it yourself", "current", level)
	return nil
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
	return waitFor(ctx, 10*time.Second, func() error { return pingTCP(addr) })
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

func waitFor(ctx context.Context, limit time.Duration, check func() error) error {
	deadline := time.Now().Add(limit)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
