package server

import (
	"context"
	"log/slog"
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
// with a generic error and does not fail the call. The error names no
// host, port or database (connection errors do): those go to the log.
func (a *AdminService) MigrationStatus(ctx context.Context, _ *pb.MigrationStatusRequest) (*pb.MigrationStatusResponse, error) {
	topo := a.s.watcher.Topology()
	resp := &pb.MigrationStatusResponse{Shards: make([]*pb.DatabaseMigration, len(topo.Shards))}
	log := a.s.opts.Logger
	var wg sync.WaitGroup
	wg.Go(func() {
		resp.Catalog = migrationStatus(ctx, log, "catalog", a.s.catalogDSN, migrations.Catalog)
	})
	for i, sh := range topo.Shards {
		wg.Go(func() {
			dsn, err := catalog.ExpandDSN(sh.DSN)
			if err != nil {
				log.Warn("migration status: cannot expand the shard's DSN", "shard", sh.Name, "err", err)
				resp.Shards[i] = &pb.DatabaseMigration{Name: sh.Name, Error: errMigrationDSN}
				return
			}
			resp.Shards[i] = migrationStatus(ctx, log, sh.Name, dsn, migrations.Shard)
		})
	}
	wg.Wait()
	return resp, nil
}

// The errors MigrationStatus reports: what an operator needs to look in
// the log, nothing about where the database is.
const (
	errMigrationDSN     = "its DSN references an environment variable that is not set on this server (details in the server log)"
	errMigrationUnread  = "cannot read its migration state: unreachable or refused (details in the server log)"
	errMigrationTimeout = "timed out reading its migration state (details in the server log)"
)

func migrationStatus(ctx context.Context, log *slog.Logger, name, dsn string, kind migrations.Kind) *pb.DatabaseMigration {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := migrations.GetStatus(ctx, dsn, kind)
	if err != nil {
		log.Warn("migration status: cannot read the database's migration state", "database", name, "err", err)
		reason := errMigrationUnread
		if ctx.Err() != nil {
			reason = errMigrationTimeout
		}
		return &pb.DatabaseMigration{Name: name, Error: reason}
	}
	return &pb.DatabaseMigration{Name: name, AppliedVersion: st.Applied, LatestVersion: st.Latest, PendingVersions: st.Pending}
}

// GetClusterStatus summarises the cluster for operators.
func (a *AdminService) GetClusterStatus(ctx context.Context, req *pb.GetClusterStatusRequest) (*pb.GetClusterStatusResponse, error) {
	return a.s.ClusterStatus(ctx, time.Duration(req.GetMaxBacklogAgeSeconds())*time.Second)
}
