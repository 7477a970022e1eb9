package pglock

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
)

// HolderConfig is the configuration of a connection that holds a session
// advisory lock for as long as it lives (a relay's, the rebalancing
// executor's), named appName in pg_stat_activity. A session lock is
// released only when PostgreSQL notices its session gone; a holder whose
// host dies sends no FIN, so the server's keepalives and user timeout end
// the session within about 30 s instead of the kernel's two hours, and
// another instance takes over. The error never repeats the DSN.
func HolderConfig(dsn, appName string) (*pgx.ConnConfig, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, errors.New("invalid DSN") // never repeat a DSN
	}
	cfg.RuntimeParams["application_name"] = appName
	cfg.RuntimeParams["tcp_keepalives_idle"] = "10"
	cfg.RuntimeParams["tcp_keepalives_interval"] = "5"
	cfg.RuntimeParams["tcp_keepalives_count"] = "3"
	cfg.RuntimeParams["tcp_user_timeout"] = "20000"
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	return cfg, nil
}

// AwaitSessionLock tries the session advisory lock (class, key) on conn
// until it holds it, pausing wait() between tries, or until ctx ends. A
// standby keeps its one connection and retries on it, rather than
// connecting anew each time (a backend start per try, per instance).
func AwaitSessionLock(ctx context.Context, conn *pgx.Conn, class, key int32, wait func() time.Duration) error {
	for {
		var got bool
		if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, $2)`, class, key).Scan(&got); err != nil {
			return err
		}
		if got {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait()):
		}
	}
}
