package importer

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// Cluster is the Shardgate side of an import: the catalog and a pool per
// shard, routed by the catalog's partition map, reloaded when a shard says
// a partition moved.
type Cluster struct {
	Catalog *catalog.Catalog
	pool    shards.PoolOptions

	mu     sync.Mutex
	table  *router.Table
	shards map[string]*shards.Shard
}

// OpenCluster connects to the catalog at dsn and loads its map. Shard
// connections are opened as they are needed, each pool up to maxConns.
func OpenCluster(ctx context.Context, dsn string, maxConns int32) (*Cluster, error) {
	cat, err := catalog.Open(ctx, dsn)
	if err != nil {
		return nil, err
	}
	c := &Cluster{Catalog: cat, pool: shards.PoolOptions{MaxConns: maxConns}, shards: map[string]*shards.Shard{}}
	if err := c.Reload(ctx); err != nil {
		cat.Close()
		return nil, err
	}
	return c, nil
}

// Reload reads the partition map again and opens pools for new shards.
func (c *Cluster) Reload(ctx context.Context) error {
	topo, err := c.Catalog.LoadTopology(ctx)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rec := range topo.Shards {
		if _, ok := c.shards[rec.Name]; ok {
			continue
		}
		dsn, err := catalog.ExpandDSN(rec.DSN)
		if err != nil {
			return fmt.Errorf("shard %s: %w", rec.Name, err)
		}
		sh, err := shards.Open(ctx, rec.Name, dsn, c.pool)
		if err != nil {
			return err
		}
		c.shards[rec.Name] = sh
	}
	c.table = topo.Table
	return nil
}

// Table returns the partition map in use.
func (c *Cluster) Table() *router.Table {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.table
}

// Partitions is the cluster's partition count.
func (c *Cluster) Partitions() int { return c.Table().PartitionCount() }

// Shard returns the shard named name.
func (c *Cluster) Shard(name string) *shards.Shard {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.shards[name]
}

// Owner returns partition p's shard by the map in use.
func (c *Cluster) Owner(p int32) *shards.Shard {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.shards[c.table.Owner(p)]
}

// Shards returns every shard of the cluster.
func (c *Cluster) Shards() []*shards.Shard {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*shards.Shard, 0, len(c.shards))
	for _, name := range c.table.Shards() {
		out = append(out, c.shards[name])
	}
	return out
}

// Close closes the shard pools and the catalog.
func (c *Cluster) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, sh := range c.shards {
		sh.Close()
	}
	c.Catalog.Close()
}

// route calls fn with the records of recs grouped by the shard that owns
// their partitions now; records a shard refuses because a partition moved
// are routed again by the reloaded map.
func (c *Cluster) route(ctx context.Context, recs []Record, fn func(*shards.Shard, []Record) error) error {
	for attempt := 0; ; attempt++ {
		groups := map[*shards.Shard][]Record{}
		if sh, ok := c.soleOwner(recs); ok {
			groups[sh] = recs // the bulk phase's batches: grouped by shard already
		} else {
			for _, rec := range recs {
				sh := c.Owner(rec.Partition)
				groups[sh] = append(groups[sh], rec)
			}
		}
		var moved []Record
		for sh, batch := range groups {
			err := fn(sh, batch)
			if _, ok := shards.IsWrongShardBatch(err); ok && attempt < 20 {
				moved = append(moved, batch...)
				continue
			}
			if err != nil {
				return err
			}
		}
		if len(moved) == 0 {
			return nil
		}
		select {
		case <-time.After(time.Duration(attempt+1) * 20 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
		if err := c.Reload(ctx); err != nil {
			return err
		}
		recs = moved
	}
}

// soleOwner returns the shard that owns every partition of recs, if one
// does (and recs is not empty).
func (c *Cluster) soleOwner(recs []Record) (*shards.Shard, bool) {
	if len(recs) == 0 {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	owner := c.table.Owner(recs[0].Partition)
	for i := range recs {
		if c.table.Owner(recs[i].Partition) != owner {
			return nil, false
		}
	}
	return c.shards[owner], true
}

// routeUsers is route for bulk user rows.
func (c *Cluster) routeUsers(ctx context.Context, rows []shards.ImportUser, fn func(*shards.Shard, []shards.ImportUser) error) error {
	recs := make([]Record, len(rows))
	for i, r := range rows {
		recs[i] = Record{Partition: r.Partition, UserID: r.UserID, JSON: string(r.Profile), Version: r.Version}
	}
	return c.route(ctx, recs, func(sh *shards.Shard, batch []Record) error {
		out := make([]shards.ImportUser, len(batch))
		for i, r := range batch {
			out[i] = shards.ImportUser{Partition: r.Partition, UserID: r.UserID, Profile: []byte(r.JSON), Version: r.Version}
		}
		return fn(sh, out)
	})
}

// routeItems is route for bulk item rows.
func (c *Cluster) routeItems(ctx context.Context, rows []shards.ImportItem, fn func(*shards.Shard, []shards.ImportItem) error) error {
	recs := make([]Record, len(rows))
	for i, r := range rows {
		recs[i] = Record{Partition: r.Partition, UserID: r.UserID, Collection: r.Collection, ItemKey: r.Key, JSON: string(r.Value), Version: r.Version}
	}
	return c.route(ctx, recs, func(sh *shards.Shard, batch []Record) error {
		out := make([]shards.ImportItem, len(batch))
		for i, r := range batch {
			out[i] = shards.ImportItem{Partition: r.Partition, UserID: r.UserID, Collection: r.Collection, Key: r.ItemKey, Value: []byte(r.JSON), Version: r.Version}
		}
		return fn(sh, out)
	})
}
