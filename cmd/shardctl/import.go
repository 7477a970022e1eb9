package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/importer"
)

// Import commands talk to the source, the catalog and the shards directly
// (like 'migrate up'): a bulk copy should not squeeze through gRPC.

type importSource struct {
	Mapping string `required:"" type:"existingfile" help:"Mapping file (YAML): which source table becomes which entity, and how."`
	From    string `required:"" help:"Source database DSN (the unsharded PostgreSQL)." env:"SHARDGATE_IMPORT_FROM"`
}

func (s importSource) load() (*importer.Mapping, error) {
	b, err := os.ReadFile(s.Mapping)
	if err != nil {
		return nil, err
	}
	m, err := importer.ParseMapping(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.Mapping, err)
	}
	return m, nil
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

type importCheckCmd struct {
	importSource
	Catalog      string `help:"Catalog database DSN: report the spread per shard of this cluster (default: partitions of a default cluster)." env:"SHARDGATE_CATALOG"`
	MaxJSONBytes int    `name:"max-json-bytes" help:"Largest JSON value accepted (the servers' --max-json-bytes)." default:"65536"`
}

func (c importCheckCmd) Run(g *globals) error {
	m, err := c.load()
	if err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	opts := importer.CheckOptions{MaxJSONBytes: c.MaxJSONBytes}
	if c.Catalog != "" {
		cat, err := catalog.Open(ctx, c.Catalog)
		if err != nil {
			return err
		}
		defer cat.Close()
		topo, err := cat.LoadTopology(ctx)
		if err != nil {
			return err
		}
		opts.Partitions, opts.Owner = topo.PartitionCount, topo.Table.Owner
	}
	src, err := pgx.Connect(ctx, c.From)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	defer src.Close(context.Background())
	rep, err := importer.Check(ctx, src, m, opts)
	if err != nil {
		return err
	}
	if g.JSON {
		enc := json.NewEncoder(g.out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		printCheck(g, rep)
	}
	if !rep.OK {
		return errors.New("the mapping does not import cleanly (see above); nothing was written")
	}
	return nil
}

func printCheck(g *globals, rep *importer.CheckReport) {
	w := g.table("TABLE", "SOURCE", "ENTITY", "ROWS", "INVALID", "DUPLICATES", "PARTITIONS", "ROWS/PARTITION")
	for _, t := range rep.Tables {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d-%d\n", t.Name, t.Source, t.Entity, t.Rows, t.Invalid,
			t.Duplicates, t.Partitions, t.MinPartitionRows, t.MaxPartitionRows)
	}
	w.Flush()
	for _, t := range rep.Tables {
		if len(t.PerShard) > 0 {
			var parts []string
			for _, s := range importer.SortedShards(t.PerShard) {
				parts = append(parts, fmt.Sprintf("%s %d", s, t.PerShard[s]))
			}
			fmt.Fprintf(g.out, "%s per shard: %s\n", t.Name, strings.Join(parts, ", "))
		}
		for _, e := range t.Errors {
			fmt.Fprintf(g.out, "error: %s\n", e)
		}
		for _, e := range t.Warnings {
			fmt.Fprintf(g.out, "warning: %s: %s\n", t.Name, e)
		}
	}
	if rep.OK {
		fmt.Fprintln(g.out, "\nthe mapping imports cleanly (dry run: nothing was written)")
	}
}
