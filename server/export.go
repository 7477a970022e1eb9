package server

import (
	"context"

	"google.golang.org/grpc"

	"github.com/shardgate/shardgate/catalog"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/shards"
)

// ExportData streams the requested partitions' users and items, each
// partition from one fenced snapshot on its owner, then config.
func (a *AdminService) ExportData(req *pb.ExportDataRequest, stream grpc.ServerStreamingServer[pb.ExportDataResponse]) error {
	ctx := stream.Context()
	fail := func(err error) error {
		return toStatus(ctx, a.s.opts.Logger, pb.AdminService_ExportData_FullMethodName, err)
	}
	var parts []int32
	for _, p := range req.GetPartitions() {
		parts = append(parts, int32(p))
	}
	if req.GetConfigOnly() {
		parts = nil
	} else if len(parts) == 0 {
		n := a.s.partitionCount()
		parts = make([]int32, n)
		for i := range parts {
			parts[i] = int32(i)
		}
	}
	// A few partitions are read ahead, each into memory, and sent in order:
	// one partition per round trip alone left the shards idle.
	const readAhead = 4
	results := make([]chan partitionExport, len(parts))
	for i := range results {
		results[i] = make(chan partitionExport, 1)
	}
	sem := make(chan struct{}, readAhead)
	go func() {
		for i, p := range parts {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			go func() { results[i] <- a.readPartition(ctx, p) }()
		}
	}()
	for i := range parts {
		var r partitionExport
		select {
		case r = <-results[i]:
		case <-ctx.Done():
			return fail(ctx.Err())
		}
		<-sem
		if r.err != nil {
			return fail(r.err)
		}
		for _, m := range r.msgs {
			if err := stream.Send(m); err != nil {
				return err
			}
		}
	}
	if !req.GetIncludeConfig() && !req.GetConfigOnly() {
		return nil
	}
	err := a.s.catalog.ExportConfig(ctx, func(e catalog.ConfigEntry) error {
		return stream.Send(&pb.ExportDataResponse{Record: &pb.ExportDataResponse_Config{Config: &pb.ExportedConfig{
			Namespace: e.Namespace, Key: e.Key, ValueJson: string(e.Value), Version: e.Version}}})
	})
	if err != nil {
		return fail(err)
	}
	return nil
}

// partitionExport is one partition's records, ending with its PartitionDone.
type partitionExport struct {
	msgs []*pb.ExportDataResponse
	err  error
}

func (a *AdminService) readPartition(ctx context.Context, p int32) partitionExport {
	var r partitionExport
	done := &pb.PartitionDone{Partition: p}
	r.err = a.s.onPartition(ctx, p, func(sh *shards.Shard) error {
		// A retry on the new owner starts the partition over; the refused
		// attempt read nothing (the fence is checked first).
		r.msgs, done.Users, done.Items = r.msgs[:0], 0, 0
		return sh.ExportPartition(ctx, p, shards.ExportSink{
			User: func(u shards.User) error {
				done.Users++
				r.msgs = append(r.msgs, &pb.ExportDataResponse{Record: &pb.ExportDataResponse_User{User: &pb.ExportedUser{
					UserId: u.UserID, Partition: p, ProfileJson: string(u.Profile), Version: u.Version}}})
				return nil
			},
			Item: func(it shards.Item) error {
				done.Items++
				r.msgs = append(r.msgs, &pb.ExportDataResponse{Record: &pb.ExportDataResponse_Item{Item: &pb.ExportedItem{
					UserId: it.UserID, Partition: p, Collection: it.Collection, Key: it.Key, ValueJson: string(it.Value), Version: it.Version}}})
				return nil
			},
		})
	})
	r.msgs = append(r.msgs, &pb.ExportDataResponse{Record: &pb.ExportDataResponse_PartitionDone{PartitionDone: done}})
	return r
}
