package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
)

type initCmd struct {
	Catalog           string   `help:"Catalog database DSN (the database must exist)." required:"" env:"SHARDGATE_CATALOG"`
	Shard             []string `help:"A shard as NAME=DSN; repeat for each. The databases must exist. DSNs may reference environment variables as $${NAME} for passwords." required:"" name:"shard" sep:"none"`
	Partitions        int      `help:"Partition count, fixed for the cluster's life." default:"4096" env:"SHARDGATE_PARTITIONS"`
	ReplicationFactor int      `help:"Virtual nodes per shard on the ring." default:"512"`
	Load              float64  `help:"Most partitions a shard may get, as a multiple of the average." default:"1.05"`
}

func (c *initCmd) Run(ctx context.Context, log *slog.Logger) error {
	specs, err := parseShardSpecs(c.Shard)
	if err != nil {
		return err
	}
	cfg := router.RingConfig{PartitionCount: c.Partitions, ReplicationFactor: c.ReplicationFactor, Load: c.Load}
	if err := catalog.CreateCluster(ctx, c.Catalog, cfg, specs); err != nil {
		return err
	}
	log.Info("cluster created", "shards", len(specs), "partitions", c.Partitions)
	return nil
}

// parseShardSpecs parses --shard NAME=DSN arguments. Its errors never quote
// an argument: the DSN may hold a password, and without "NAME=" the part
// before the first '=' may be a DSN too.
func parseShardSpecs(list []string) ([]catalog.ShardSpec, error) {
	specs := make([]catalog.ShardSpec, 0, len(list))
	for i, s := range list {
		arg := fmt.Sprintf("--shard argument %d (of %d)", i+1, len(list))
		name, dsn, ok := strings.Cut(s, "=")
		switch {
		case strings.Contains(name, "://"):
			return nil, fmt.Errorf("%s: want NAME=DSN; it starts with a DSN, not a NAME", arg)
		case !ok || name == "" || dsn == "":
			return nil, fmt.Errorf("%s: want NAME=DSN, both non-empty", arg)
		case router.ValidateShardName(name) != nil:
			return nil, fmt.Errorf("%s: the NAME before '=' is not a shard name: want 1-63 characters of [a-z0-9_-] starting with a letter or digit", arg)
		}
		specs = append(specs, catalog.ShardSpec{Name: name, DSN: dsn})
	}
	return specs, nil
}
