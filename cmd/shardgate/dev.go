package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
)

type devCmd struct {
	Listen    string        `help:"Loopback address to serve gRPC on." default:"127.0.0.1:7070" env:"SHARDGATE_LISTEN"`
	PGAdmin   string        `name:"pg-admin" help:"Superuser DSN of the local PostgreSQL." default:"postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable" env:"SHARDGATE_DEV_PG"`
	Shards    int           `help:"Number of shard databases." default:"4"`
	DBPrefix  string        `name:"db-prefix" help:"Prefix of the databases dev mode creates." default:"shardgate_dev"`
	NoInstall bool          `name:"no-install" help:"Never install PostgreSQL or Redis; only start them."`
	DevKey    string        `name:"dev-key" help:"Ed25519 key dev mode signs and verifies tokens with; created if missing (default: <user config dir>/shardgate/dev-signing-key.pem)." env:"SHARDGATE_DEV_KEY"`
	Drain     time.Duration `help:"How long health reports NOT_SERVING after SIGTERM before the server stops taking calls." default:"0s" env:"SHARDGATE_DRAIN"`
	serveFlags
}

func (c *devCmd) Run(ctx context.Context, log *slog.Logger) error {
	loopback, err := isLoopback(c.Listen)
	if err != nil {
		return err
	}
	if !loopback {
		return fmt.Errorf("dev mode serves on loopback only; %s is not", c.Listen)
	}
	if c.Shards < 1 || c.Shards > 64 {
		return fmt.Errorf("--shards %d: want 1..64", c.Shards)
	}
	env := devEnv{log: log, install: !c.NoInstall}
	if err := env.ensurePostgres(ctx, c.PGAdmin); err != nil {
		return err
	}
	if c.Redis != "" && c.RedisURL == "" { // --redis '' runs without the cache; a URL's Redis is the user's
		if err := env.ensureRedis(ctx, c.Redis); err != nil {
			return err
		}
	}
	catalogDSN, specs, err := c.createDatabases(ctx)
	if err != nil {
		return err
	}
	err = catalog.CreateCluster(ctx, catalogDSN, router.RingConfig{}, specs)
	switch {
	case err == nil:
		log.Info("dev cluster created", "shards", len(specs), "partitions", router.DefaultPartitions)
	case errors.Is(err, catalog.ErrClusterExists):
		// Keep the data of an earlier run; bring its schemas up to date.
		if _, err := catalog.MigrateAll(ctx, catalogDSN); err != nil {
			return err
		}
		log.Info("dev cluster exists; reusing it", "catalog", redactDSN(catalogDSN))
	default:
		return err
	}
	if c.DevKey == "" {
		c.DevKey = devKeyPath()
	}
	key, err := ensureDevKey(c.DevKey)
	if err != nil {
		return fmt.Errorf("dev signing key: %w", err)
	}
	auth, err := devVerifier(key)
	if err != nil {
		return err
	}
	macKey, err := devMACKey(c.CacheMACKeyFile)
	if err != nil {
		return err
	}
	// Rate limits stay off unless --limit-redis is given: load tests run
	// against dev mode, and anonymous calls share one bucket per IP.
	log.Warn("dev mode: loopback only, no TLS; calls without a token act as admin, tokens that are sent are verified and enforced", "listen", c.Listen)
	log.Info("try it", "list", "grpcurl -plaintext "+c.Listen+" list", "topology", "go run ./cmd/shardctl --addr "+c.Listen+" topology")
	log.Info("mint a token", "user", "go run ./cmd/shardctl token mint --key "+c.DevKey+" --role user --sub alice",
		"use", "SHARDGATE_TOKEN=<token> go run ./cmd/shardctl topology")
	return run(ctx, log, c.Listen, catalogDSN, c.serveFlags, security{auth: auth, cacheMACKey: macKey}, c.Drain)
}

// devMACKey reads the cache MAC key from path or, if none is given, from
// the dev key directory, creating it (0600) on first use: kept across runs
// so entries cached by an earlier run are not rejected as forged.
func devMACKey(path string) ([]byte, error) {
	if path != "" {
		return readMACKey(path)
	}
	path = filepath.Join(filepath.Dir(devKeyPath()), "dev-cache-mac.key")
	if b, err := os.ReadFile(path); err == nil && len(b) >= cache.MACKeySize {
		return b, nil
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("dev cache MAC key: %w", err)
	}
	b := make([]byte, cache.MACKeySize)
	rand.Read(b)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return nil, fmt.Errorf("dev cache MAC key: %w", err)
	}
	return b, nil
}

// createDatabases creates the catalog and shard databases if missing and
// returns their DSNs.
func (c *devCmd) createDatabases(ctx context.Context) (string, []catalog.ShardSpec, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.PGAdmin)
	if err != nil {
		return "", nil, fmt.Errorf("connect to PostgreSQL: %w", err)
	}
	defer conn.Close(context.Background())
	names := []string{c.DBPrefix + "_catalog"}
	for i := range c.Shards {
		names = append(names, fmt.Sprintf("%s_shard_%d", c.DBPrefix, i))
	}
	dsns := make([]string, len(names))
	for i, name := range names {
		var encoding string
		err := conn.QueryRow(ctx, `SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = $1`, name).Scan(&encoding)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			// template0, not template1: template1 may be SQL_ASCII, which
			// rejects non-ASCII characters in JSON.
			if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()+" ENCODING 'UTF8' TEMPLATE template0"); err != nil {
				return "", nil, fmt.Errorf("create database %s: %w", name, err)
			}
		case err != nil:
			return "", nil, err
		case encoding != "UTF8":
			return "", nil, fmt.Errorf("database %s exists with encoding %s, and Shardgate needs UTF8; drop the %s_* databases (they hold only dev data) or pass another --db-prefix", name, encoding, c.DBPrefix)
		}
		if dsns[i], err = withDatabase(c.PGAdmin, name); err != nil {
			return "", nil, err
		}
	}
	specs := make([]catalog.ShardSpec, c.Shards)
	for i := range specs {
		specs[i] = catalog.ShardSpec{Name: fmt.Sprintf("shard-%d", i), DSN: dsns[i+1]}
	}
	return dsns[0], specs, nil
}

func withDatabase(dsn, name string) (string, error) {
	u, err := url.Parse(dsn)
	if err != nil || u.Scheme == "" {
		return "", fmt.Errorf("--pg-admin must be a postgres:// URL")
	}
	u.Path = "/" + name
	return u.String(), nil
}

// redactDSN returns a postgres:// URL without its password, for logs and
// errors; anything else it hides whole, since it cannot tell where a
// password would be.
func redactDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") || u.Opaque != "" {
		return "(DSN not shown)"
	}
	if q := u.Query(); q.Has("password") {
		q.Set("password", "xxxxx")
		u.RawQuery = q.Encode()
	}
	return u.Redacted()
}
