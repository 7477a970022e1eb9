package server

import (
	"context"
	"sync"
	"time"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/migrations"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// AdminService implements shardgate.v1.AdminService.
type AdminService struct {
	pb.UnimplementedAdminServiceServer
	s *Server
}

// NewAdminService returns the AdminService of s.
func NewAdminService(s *Server) *AdminService { return &AdminService{s: s} }

// GetTopology describes the topology this server routes by.
func (a *AdminService) GetTopology(ctx context.Context, _ *pb.GetTopologyRequest) (*pb.GetTopologyResponse, error) {
	topo := a.s.watcher.Topology()
	if topo.Table == nil {
		return nil, errNoTable
	}
	counts := topo.Table.Counts()
	resp := &pb.GetTopologyResponse{Version: topo.Version, PartitionCount: int32(topo.PartitionCount)}
	for _, sh := range topo.Shards {
		resp.Shards = append(resp.Shards, &pb.ShardInfo{
			Name:           sh.Name,
			State:          shardState(sh.State),
			PartitionCount: int32(counts[sh.Name]),
			Weight:         int32(sh.Weight),
		})
	}
	return resp, nil
}

func shardState(s string) pb.ShardState {
	switch s {
	case catalog.ShardActive:
		return pb.ShardState_SHARD_STATE_ACTIVE
	case catalog.ShardDraining:
		return pb.ShardState_SHARD_STATE_DRAINING
	}
	return pb.ShardState_SHARD_STATE_UNSPECIFIED
}

// LocateUser names a user's partition and shard.
func (a *AdminService) LocateUser(ctx context.Context, req *pb.LocateUserRequest) (*pb.LocateUserResponse, error) {
	t := a.s.router.Table()
	if t == nil {
		return nil, errNoTable
	}
	p, shard, _ := a.s.router.Lookup(req.GetUserId())
	return &pb.LocateUserResponse{Partition: p, Shard: shard, TopologyVersion: t.Version()}, nil
}

// MigrationStatus reports the schema version of the catalog and every shard.
// Databases are asked in parallel; one that cannot be reached is reported
// with an error and does not fail the call.
func (a *AdminService) MigrationStatus(ctx context.Context, _ *pb.MigrationStatusRequest) (*pb.MigrationStatusResponse, error) {
	topo := a.s.watcher.Topology()
	resp := &pb.MigrationStatusResponse{Shards: make([]*pb.DatabaseMigration, len(topo.Shards))}
	var wg sync.WaitGroup
	wg.Go(func() {
		resp.Catalog = migrationStatus(ctx, "catalog", a.s.catalogDSN, migrations.Catalog)
	})
	for i, sh := range topo.Shards {
		wg.Go(func() {
			dsn, err := catalog.ExpandDSN(sh.DSN)
			if err != nil {
				resp.Shards[i] = &pb.DatabaseMigration{Name: sh.Name, Error: err.Error()}
				return
			}
			resp.Shards[i] = migrationStatus(ctx, sh.Name, dsn, migrations.Shard)
		})
	}
	wg.Wait()
	return resp, nil
}

func migrationStatus(ctx context.Context, name, dsn string, kind migrations.Kind) *pb.DatabaseMigration {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := migrations.GetStatus(ctx, dsn, kind)
	if err != nil {
		return &pb.DatabaseMigration{Name: name, Error: err.Error()}
	}
	return &pb.DatabaseMigration{Name: name, AppliedVersion: st.Applied, LatestVersion: st.Latest, PendingVersions: st.Pending}
}

// GetClusterStatus summarises the cluster for operators.
func (a *AdminService) GetClusterStatus(ctx context.Context, req *pb.GetClusterStatusRequest) (*pb.GetClusterStatusResponse, error) {
	return a.s.ClusterStatus(ctx, time.Duration(req.GetMaxBacklogAgeSeconds())*time.Second)
}
