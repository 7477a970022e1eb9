package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"

	"github.com/shardgate/shardgate/importer"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

type exportCmd struct {
	Out        string `required:"" help:"Directory to write (created; an unfinished export there is continued)."`
	Partitions string `help:"Partitions to export, e.g. 0-511,1024 (default: all)."`
	RangeSize  int    `name:"range-size" help:"Partitions per file." default:"512"`
}

// parsePartitions reads "0-511,1024" into partitions below count.
func parsePartitions(spec string, count int) ([]int32, error) {
	seen := make([]bool, count)
	var out []int32
	for _, part := range strings.Split(spec, ",") {
		lo, hi, isRange := strings.Cut(strings.TrimSpace(part), "-")
		a, err := strconv.Atoi(lo)
		b := a
		if err == nil && isRange {
			b, err = strconv.Atoi(hi)
		}
		if err != nil || a < 0 || b < a || b >= count {
			return nil, fmt.Errorf("--partitions %q: want N or N-M with 0 <= N <= M < %d", part, count)
		}
		for p := a; p <= b; p++ {
			if !seen[p] {
				seen[p] = true
				out = append(out, int32(p))
			}
		}
	}
	return out, nil
}

func (c exportCmd) Run(g *globals) error {
	if c.RangeSize < 1 {
		return fmt.Errorf("--range-size %d: want at least 1", c.RangeSize)
	}
	if err := os.MkdirAll(c.Out, 0o700); err != nil {
		return err
	}
	opts, err := g.dialOptions()
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(g.Addr, opts...)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := signalContext()
	defer cancel()
	admin := pb.NewAdminServiceClient(conn)
	topo, err := admin.GetTopology(ctx, &pb.GetTopologyRequest{})
	if err != nil {
		return err
	}
	count := int(topo.GetPartitionCount())
	m, err := importer.ReadManifest(c.Out)
	if err != nil {
		return err
	}
	if m.PartitionCount != 0 && m.PartitionCount != count {
		return fmt.Errorf("%s holds an export of a cluster of %d partitions, this one has %d", c.Out, m.PartitionCount, count)
	}
	m.PartitionCount = count
	all := make([]int32, count)
	for i := range all {
		all[i] = int32(i)
	}
	parts := all
	if c.Partitions != "" {
		if parts, err = parsePartitions(c.Partitions, count); err != nil {
			return err
		}
	}
	done := map[int32]bool{}
	for _, r := range m.Ranges {
		for p := r.First; p <= r.Last; p++ {
			done[p] = true
		}
	}
	start := time.Now()
	var users, items int64
	// Ranges of at most RangeSize consecutive partitions not yet exported.
	for i := 0; i < len(parts); {
		if done[parts[i]] {
			i++
			continue
		}
		j := i + 1
		for j < len(parts) && j-i < c.RangeSize && parts[j] == parts[j-1]+1 && !done[parts[j]] {
			j++
		}
		r, err := exportRange(ctx, admin, c.Out, parts[i:j])
		if err != nil {
			return err
		}
		users, items = users+r.Users.Lines, items+r.Items.Lines
		m.Ranges = append(m.Ranges, r)
		if err := importer.WriteManifest(c.Out, m); err != nil {
			return err
		}
		if !g.JSON {
			fmt.Fprintf(g.out, "partitions %d-%d: %d users, %d items\n", r.First, r.Last, r.Users.Lines, r.Items.Lines)
		}
		i = j
	}
	if m.Config == nil {
		cf, err := exportConfig(ctx, admin, c.Out)
		if err != nil {
			return err
		}
		m.Config = &cf
	}
	// Every partition asked for is in the manifest now.
	m.Complete = true
	if err := importer.WriteManifest(c.Out, m); err != nil {
		return err
	}
	if g.JSON {
		return printJSONValue(g, map[string]any{"users": users, "items": items, "config": m.Config.Lines, "seconds": time.Since(start).Seconds(), "complete": m.Complete})
	}
	fmt.Fprintf(g.out, "exported %d users, %d items, %d config values to %s in %s (manifest: %s)\n",
		users, items, m.Config.Lines, c.Out, time.Since(start).Round(time.Millisecond), importer.ManifestName)
	return nil
}

func exportRange(ctx contextT, admin pb.AdminServiceClient, dir string, parts []int32) (importer.ManifestRange, error) {
	r := importer.ManifestRange{First: parts[0], Last: parts[len(parts)-1]}
	name := fmt.Sprintf("%05d-%05d.ndjson", r.First, r.Last)
	uw, err := importer.NewNDJSONWriter(dir, "users-"+name)
	if err != nil {
		return r, err
	}
	defer uw.Abort()
	iw, err := importer.NewNDJSONWriter(dir, "items-"+name)
	if err != nil {
		return r, err
	}
	defer iw.Abort()
	req := &pb.ExportDataRequest{}
	for _, p := range parts {
		req.Partitions = append(req.Partitions, uint32(p))
	}
	st, err := admin.ExportData(ctx, req)
	if err != nil {
		return r, err
	}
	var users, items, seen int64
	for {
		msg, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return r, err
		}
		switch {
		case msg.GetUser() != nil:
			u := msg.GetUser()
			users++
			err = uw.Write(importer.UserLine{UserID: u.GetUserId(), Partition: u.GetPartition(), Profile: []byte(u.GetProfileJson()), Version: u.GetVersion()})
		case msg.GetItem() != nil:
			it := msg.GetItem()
			items++
			err = iw.Write(importer.ItemLine{UserID: it.GetUserId(), Partition: it.GetPartition(), Collection: it.GetCollection(),
				Key: it.GetKey(), Value: []byte(it.GetValueJson()), Version: it.GetVersion()})
		case msg.GetPartitionDone() != nil:
			seen++
		}
		if err != nil {
			return r, err
		}
	}
	if seen != int64(len(parts)) {
		return r, fmt.Errorf("partitions %d-%d: the stream ended after %d of %d partitions", r.First, r.Last, seen, len(parts))
	}
	if r.Users, err = uw.Finish(); err != nil {
		return r, err
	}
	if r.Items, err = iw.Finish(); err != nil {
		return r, err
	}
	return r, nil
}

func exportConfig(ctx contextT, admin pb.AdminServiceClient, dir string) (importer.ManifestFile, error) {
	w, err := importer.NewNDJSONWriter(dir, "config.ndjson")
	if err != nil {
		return importer.ManifestFile{}, err
	}
	defer w.Abort()
	st, err := admin.ExportData(ctx, &pb.ExportDataRequest{ConfigOnly: true})
	if err != nil {
		return importer.ManifestFile{}, err
	}
	for {
		msg, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return importer.ManifestFile{}, err
		}
		if c := msg.GetConfig(); c != nil {
			if err := w.Write(importer.ConfigLine{Namespace: c.GetNamespace(), Key: c.GetKey(), Value: []byte(c.GetValueJson()), Version: c.GetVersion()}); err != nil {
				return importer.ManifestFile{}, err
			}
		}
	}
	return w.Finish()
}

type contextT = context.Context

func printJSONValue(g *globals, v any) error {
	return json.NewEncoder(g.out).Encode(v)
}
