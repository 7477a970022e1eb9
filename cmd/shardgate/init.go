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

func parseShardSpecs(list []string) ([]catalog.ShardSpec, error) {
	specs := make([]catalog.ShardSpec, 0, len(list))
	for _, s := range list {
		name, dsn, ok := strings.Cut(s, "=")
		if !ok || name == "" || dsn == "" {
			return nil, fmt.Errorf("--shard %q: want NAME=DSN", name)
		}
		if err := router.ValidateShardName(name); err != nil {
			return nil, fmt.Errorf("--shard: %w", err)
		}
		specs = append(specs, catalog.ShardSpec{Name: name, DSN: dsn})
	}
	return specs, nil
}
