// Package migrations carries the catalog and shard schemas, embedded into the
// binary, and applies them with goose under a Postgres advisory lock so that
// several instances starting at once migrate each database exactly once.
package migrations

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

//go:embed catalog/*.sql shard/*.sql
var files embed.FS

// Kind names a schema: the catalog database or a shard database.
type Kind string

const (
	Catalog Kind = "catalog"
	Shard   Kind = "shard"
)

// Status is the schema state of one database against this binary's migrations.
type Status struct {
	Applied int64   // highest applied version, 0 if none
	Latest  int64   // highest version this binary carries
	Pending []int64 // versions carried but not applied, ascending
}

// Up applies every pending migration of kind to the database at dsn and
// returns the versions it applied.
func Up(ctx context.Context, dsn string, kind Kind) ([]int64, error) {
	var applied []int64
	err := withProvider(dsn, kind, func(p *goose.Provider) error {
		res, err := p.Up(ctx)
		for _, r := range res {
			applied = append(applied, r.Source.Version)
		}
		return err
	})
	if err != nil {
		return applied, fmt.Errorf("migrate %s: %w", kind, err)
	}
	return applied, nil
}

// GetStatus reports which migrations of kind are applied at dsn.
func GetStatus(ctx context.Context, dsn string, kind Kind) (Status, error) {
	var st Status
	err := withProvider(dsn, kind, func(p *goose.Provider) error {
		list, err := p.Status(ctx)
		if err != nil {
			return err
		}
		for _, m := range list {
			v := m.Source.Version
			st.Latest = max(st.Latest, v)
			if m.State == goose.StateApplied {
				st.Applied = max(st.Applied, v)
			} else {
				st.Pending = append(st.Pending, v)
			}
		}
		return nil
	})
	if err != nil {
		return Status{}, fmt.Errorf("migration status of %s: %w", kind, err)
	}
	return st, nil
}

func withProvider(dsn string, kind Kind, fn func(*goose.Provider) error) error {
	sub, err := fs.Sub(files, string(kind))
	if err != nil {
		return err
	}
	// pgxpool's parser takes the pool's own parameters (pool_max_conns and
	// the like) out of the DSN; pgx's would send them to the server, which
	// refuses unknown settings.
	pcfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return errors.New("parse DSN: invalid (parser details withheld: they may quote a password)")
	}
	db := stdlib.OpenDB(*pcfg.ConnConfig)
	defer db.Close()
	db.SetMaxOpenConns(2)
	// Waiters retry every second (goose's default is 5s) for up to 5 minutes.
	locker, err := lock.NewPostgresSessionLocker(lock.WithLockTimeout(1, 300))
	if err != nil {
		return err
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, sub,
		goose.WithSessionLocker(locker),
		goose.WithDisableGlobalRegistry(true),
	)
	if err != nil {
		return err
	}
	return fn(p)
}
