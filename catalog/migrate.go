package catalog

import (
	"context"
	"errors"
	"fmt"

	"github.com/shardgate/shardgate/migrations"
)

// MigrationResult is what MigrateAll applied to one database.
type MigrationResult struct {
	Name    string  // "catalog" or a shard name
	Applied []int64 // versions applied now; empty if it was current
	Err     error
}

// MigrateAll applies pending migrations to the catalog, then to every shard
// it lists. A shard that fails is reported and the others still migrate;
// the returned error is non-nil if any database failed.
func MigrateAll(ctx context.Context, catalogDSN string) ([]MigrationResult, error) {
	applied, err := migrations.Up(ctx, catalogDSN, migrations.Catalog)
	results := []MigrationResult{{Name: "catalog", Applied: applied, Err: err}}
	if err != nil {
		return results, err
	}
	cat, err := Open(ctx, catalogDSN)
	if err != nil {
		return results, err
	}
	defer cat.Close()
	topo, err := cat.LoadTopology(ctx)
	if err != nil {
		return results, err
	}
	var errs []error
	for _, sh := range topo.Shards {
		r := MigrationResult{Name: sh.Name}
		dsn, err := ExpandDSN(sh.DSN)
		if err == nil {
			r.Applied, err = migrations.Up(ctx, dsn, migrations.Shard)
		}
		if err != nil {
			r.Err = err
			errs = append(errs, fmt.Errorf("shard %s: %w", sh.Name, err))
		}
		results = append(results, r)
	}
	return results, errors.Join(errs...)
}
