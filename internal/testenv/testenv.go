// Package testenv gives integration tests throwaway resources on the real
// PostgreSQL and Redis of the machine: a fresh database per call, a unique
// Redis key prefix, all removed when the test ends. Names are random, so
// packages and tests may run in parallel.
//
// A missing service fails the test; it is never skipped. Addresses come from
// SHARDGATE_TEST_PG (an admin DSN, default postgres://postgres@127.0.0.1:5432/postgres)
// and SHARDGATE_TEST_REDIS (default 127.0.0.1:6379).
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	defaultPG    = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	defaultRedis = "127.0.0.1:6379"
)

// AdminDSN is the DSN of a superuser connection to the test Postgres.
func AdminDSN(t testing.TB) string {
	t.Helper()
	dsn := os.Getenv("SHARDGATE_TEST_PG")
	if dsn == "" {
		dsn = defaultPG
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("testenv: PostgreSQL is required and not reachable at %s: %v (start it: pg_ctlcluster --skip-systemctl-redirect 15 main start)", redact(dsn), err)
	}
	conn.Close(ctx)
	return dsn
}

// NewDatabase creates an empty UTF8 database and returns a DSN for it. The
// database is dropped (with its connections) when the test ends.
func NewDatabase(t testing.TB) string {
	t.Helper()
	admin := AdminDSN(t)
	name := "sgtest_" + RandomHex(6)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatalf("testenv: connect: %v", err)
	}
	defer conn.Close(ctx)
	// template0: template1 may be SQL_ASCII, which rejects non-ASCII JSON.
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name+" ENCODING 'UTF8' TEMPLATE template0"); err != nil {
		t.Fatalf("testenv: create database %s: %v", name, err)
	}
	// Tests need no durability; skipping the commit flush makes write-heavy
	// tests CPU-bound instead of fsync-bound.
	if _, err := conn.Exec(ctx, "ALTER DATABASE "+name+" SET synchronous_commit = off"); err != nil {
		t.Fatalf("testenv: configure database %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, admin)
		if err != nil {
			t.Errorf("testenv: drop database %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		dropReplication(ctx, conn, WithDatabase(t, admin, name), name)
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("testenv: drop database %s: %v", name, err)
		}
	})
	return WithDatabase(t, admin, name)
}

// dropReplication removes what keeps a database from being dropped: its
// subscriptions (detached from their slots, which may live anywhere) and
// the replication slots of the database. A test that failed mid-move
// leaves them; Postgres refuses to drop a database that has them.
func dropReplication(ctx context.Context, admin *pgx.Conn, dsn, name string) {
	if db, err := pgx.Connect(ctx, dsn); err == nil {
		rows, err := db.Query(ctx, `SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())`)
		if err == nil {
			subs, _ := pgx.CollectRows(rows, pgx.RowTo[string])
			for _, sub := range subs {
				id := pgx.Identifier{sub}.Sanitize()
				db.Exec(ctx, "ALTER SUBSCRIPTION "+id+" DISABLE")
				db.Exec(ctx, "ALTER SUBSCRIPTION "+id+" SET (slot_name = NONE)")
				db.Exec(ctx, "DROP SUBSCRIPTION "+id)
			}
		}
		db.Close(ctx)
	}
	for range 50 {
		var left int
		err := admin.QueryRow(ctx, `
			WITH t AS (SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL),
			     d AS (SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active)
			SELECT (SELECT count(*) FROM t) + (SELECT count(*) FROM d)`, name).Scan(&left)
		if err != nil || left == 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// WithDatabase returns dsn pointing at database name instead.
func WithDatabase(t testing.TB, dsn, name string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatalf("testenv: SHARDGATE_TEST_PG must be a URL DSN: %v", err)
	}
	u.Path = "/" + name
	return u.String()
}

// Redis returns the address of the test Redis and a key prefix unique to this
// call. Keys under the prefix are deleted when the test ends.
func Redis(t testing.TB) (addr, prefix string) {
	t.Helper()
	addr = os.Getenv("SHARDGATE_TEST_REDIS")
	if addr == "" {
		addr = defaultRedis
	}
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("testenv: Redis is required and not reachable at %s: %v (start it: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no)", addr, err)
	}
	c.Close()
	prefix = "sgtest:" + RandomHex(6) + ":"
	t.Cleanup(func() { deleteRedisPrefix(t, addr, prefix) })
	return addr, prefix
}

// RandomHex returns 2n random hex characters.
func RandomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err)) // never fails on Linux
	}
	return hex.EncodeToString(b)
}

func redact(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "(unparsable DSN)"
	}
	return u.Redacted()
}

// WaitForLockWaiters waits until at least n statements in db's database are
// waiting on a lock (pg_stat_activity), so a test can line up concurrent
// transactions in a known order. It fails the test after 10 s.
func WaitForLockWaiters(t testing.TB, ctx context.Context, db interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var got int
		if err := db.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d statements waiting on locks, want %d", got, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
