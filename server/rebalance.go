package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/shards"
)

// The AdminService calls that change the cluster's shape: shards in and
// out, and rebalances, which the executor (package mover) runs.

// errPlan marks an error of the planner about the cluster's shape (no
// active shard, an unknown owner): the caller can fix it.
type errPlan struct{ err error }

func (e errPlan) Error() string { return e.err.Error() }
func (e errPlan) Unwrap() error { return e.err }

// Copy rate and per-move fixed cost for plan estimates, as measured on the
// reference machine (2 cores, shards on one PostgreSQL); see docs.
const (
	estimateRowsPerSecond = 100_000
	estimatePerMove       = 2 * time.Second
)

// AddShard registers a new, empty shard.
func (a *AdminService) AddShard(ctx context.Context, req *pb.AddShardRequest) (*pb.AddShardResponse, error) {
	weight := max(int(req.GetWeight()), 1)
	if err := a.s.catalog.AddShard(ctx, req.GetName(), req.GetDsn(), weight); err != nil {
		return nil, err
	}
	a.refresh(ctx)
	return &pb.AddShardResponse{Shard: &pb.ShardInfo{
		Name: req.GetName(), State: pb.ShardState_SHARD_STATE_ACTIVE, Weight: int32(weight),
	}}, nil
}

// DrainShard marks a shard draining.
func (a *AdminService) DrainShard(ctx context.Context, req *pb.DrainShardRequest) (*pb.DrainShardResponse, error) {
	if err := a.s.catalog.DrainShard(ctx, req.GetName()); err != nil {
		return nil, err
	}
	a.refresh(ctx)
	return &pb.DrainShardResponse{}, nil
}

// ActivateShard marks a draining shard active again.
func (a *AdminService) ActivateShard(ctx context.Context, req *pb.ActivateShardRequest) (*pb.ActivateShardResponse, error) {
	if err := a.s.catalog.ActivateShard(ctx, req.GetName()); err != nil {
		return nil, err
	}
	a.refresh(ctx)
	return &pb.ActivateShardResponse{}, nil
}

// RemoveShard unregisters a shard that owns and holds nothing.
func (a *AdminService) RemoveShard(ctx context.Context, req *pb.RemoveShardRequest) (*pb.RemoveShardResponse, error) {
	if err := a.s.catalog.RemoveShard(ctx, req.GetName(), req.GetForce()); err != nil {
		return nil, err
	}
	a.refresh(ctx)
	return &pb.RemoveShardResponse{}, nil
}

// refresh brings this server's map up to the change it just made, so its
// next answers show it; other servers hear of it by notification.
func (a *AdminService) refresh(ctx context.Context) {
	if err := a.s.watcher.Refresh(ctx); err != nil {
		a.s.opts.Logger.Warn("topology refresh after an admin change failed", "err", err)
	}
}

// PlanRebalance shows what a rebalance would move now.
func (a *AdminService) PlanRebalance(ctx context.Context, req *pb.PlanRebalanceRequest) (*pb.PlanRebalanceResponse, error) {
	plan, err := a.plan(ctx)
	if err != nil {
		return nil, err
	}
	return planResponse(plan, defaulted(int(req.GetMaxParallel()), mover.DefaultMaxParallel)), nil
}

// StartRebalance plans and records a rebalance for the executor to run.
func (a *AdminService) StartRebalance(ctx context.Context, req *pb.StartRebalanceRequest) (*pb.StartRebalanceResponse, error) {
	maxParallel := defaulted(int(req.GetMaxParallel()), mover.DefaultMaxParallel)
	budget := time.Duration(req.GetFreezeBudgetMs()) * time.Millisecond
	if budget == 0 {
		budget = mover.DefaultFreezeBudget
	}
	plan, err := a.plan(ctx)
	if err != nil {
		return nil, err
	}
	specs := make([]catalog.MoveSpec, len(plan.Moves))
	for i, m := range plan.Moves {
		specs[i] = catalog.MoveSpec{Source: m.Source, Target: m.Target, Partitions: m.Partitions, Rows: m.Size.Rows, Bytes: m.Size.Bytes}
	}
	id, err := a.s.catalog.StartRebalance(ctx, plan.Version, maxParallel, budget, specs)
	if err != nil {
		return nil, err
	}
	a.s.opts.Logger.Info("rebalance started", "rebalance", id, "moves", len(specs), "max_parallel", maxParallel, "freeze_budget", budget)
	return &pb.StartRebalanceResponse{RebalanceId: id, Plan: planResponse(plan, maxParallel)}, nil
}

func defaulted(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// plan diffs the catalog's current map against the placement of its
// active shards, sized by what the shards hold.
func (a *AdminService) plan(ctx context.Context) (mover.Plan, error) {
	topo, err := a.s.catalog.LoadTopology(ctx)
	if err != nil {
		return mover.Plan{}, err
	}
	shape, err := a.s.catalog.Shape(ctx)
	if err != nil {
		return mover.Plan{}, err
	}
	// Make sure this server has pools for every shard, a new one included.
	if err := a.s.watcher.Refresh(ctx); err != nil {
		return mover.Plan{}, err
	}
	infos := make([]mover.ShardInfo, len(topo.Shards))
	sizes := map[int32]mover.Size{}
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		errs []error
	)
	for i, rec := range topo.Shards {
		infos[i] = mover.ShardInfo{Name: rec.Name, Weight: rec.Weight, Draining: rec.State == catalog.ShardDraining}
		if topo.Table.Counts()[rec.Name] == 0 {
			continue // owns nothing: nothing of it moves
		}
		wg.Go(func() {
			sh, ok := a.s.shard(rec.Name)
			if !ok {
				mu.Lock()
				errs = append(errs, fmt.Errorf("shard %s: %w", rec.Name, errShardNotOpen))
				mu.Unlock()
				return
			}
			sz, err := sh.PartitionSizes(ctx)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			for p, s := range sz {
				if topo.Table.Owner(p) == rec.Name { // a leftover elsewhere is not what moves
					sizes[p] = mover.Size{Rows: s.Rows, Bytes: s.Bytes}
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return mover.Plan{}, err
	}
	plan, err := mover.MakePlan(topo.Table.Owners(), topo.Version, infos, shape.Ring, sizes, mover.PlanOptions{})
	if err != nil {
		return mover.Plan{}, errPlan{err}
	}
	return plan, nil
}

func planResponse(plan mover.Plan, maxParallel int) *pb.PlanRebalanceResponse {
	n, size := plan.Size()
	resp := &pb.PlanRebalanceResponse{
		TopologyVersion:  plan.Version,
		PartitionsMoving: int32(n),
		Rows:             size.Rows,
		Bytes:            size.Bytes,
		Estimate:         durationpb.New(mover.Estimate(size, len(plan.Moves), maxParallel, estimateRowsPerSecond, estimatePerMove)),
	}
	for _, m := range plan.Moves {
		resp.Moves = append(resp.Moves, &pb.PlannedMove{Source: m.Source, Target: m.Target, Partitions: m.Partitions, Rows: m.Size.Rows, Bytes: m.Size.Bytes})
	}
	for _, s := range plan.Shards {
		st := pb.ShardState_SHARD_STATE_ACTIVE
		if s.Draining {
			st = pb.ShardState_SHARD_STATE_DRAINING
		}
		resp.Shards = append(resp.Shards, &pb.ShardPlan{Name: s.Name, State: st, Weight: int32(s.Weight),
			PartitionsBefore: int32(s.Before), PartitionsAfter: int32(s.After), Share: s.Share})
	}
	return resp
}

// GetRebalance returns the running or last rebalance.
func (a *AdminService) GetRebalance(ctx context.Context, _ *pb.GetRebalanceRequest) (*pb.GetRebalanceResponse, error) {
	r, moves, err := a.s.catalog.LatestRebalance(ctx)
	if err != nil {
		return nil, err
	}
	return &pb.GetRebalanceResponse{Rebalance: rebalanceProto(r, moves, time.Now())}, nil
}

// rebalancePoll is how often WatchRebalance rereads the catalog, and
// rebalanceHeartbeat the longest it stays silent while a rebalance runs.
const (
	rebalancePoll      = 250 * time.Millisecond
	rebalanceHeartbeat = time.Second
)

// WatchRebalance streams the rebalance as it changes until it ends.
func (a *AdminService) WatchRebalance(_ *pb.WatchRebalanceRequest, stream grpc.ServerStreamingServer[pb.WatchRebalanceResponse]) error {
	ctx := stream.Context()
	var (
		last     *pb.Rebalance
		lastSent time.Time
	)
	for {
		r, moves, err := a.s.catalog.LatestRebalance(ctx)
		if err != nil {
			return toStatus(ctx, a.s.opts.Logger, pb.AdminService_WatchRebalance_FullMethodName, err)
		}
		cur := rebalanceProto(r, moves, time.Now())
		if last == nil || !proto.Equal(withoutClock(cur), withoutClock(last)) || time.Since(lastSent) >= rebalanceHeartbeat {
			if err := stream.Send(&pb.WatchRebalanceResponse{Rebalance: cur}); err != nil {
				return err
			}
			last, lastSent = cur, time.Now()
		}
		if r.State != catalog.RebalanceRunning {
			return nil
		}
		select {
		case <-ctx.Done():
			return toStatus(ctx, a.s.opts.Logger, pb.AdminService_WatchRebalance_FullMethodName, ctx.Err())
		case <-a.s.watchesCtx.Done():
			return toStatus(ctx, a.s.opts.Logger, pb.AdminService_WatchRebalance_FullMethodName, context.Cause(a.s.watchesCtx))
		case <-time.After(rebalancePoll):
		}
	}
}

// withoutClock drops what changes with time alone (rates, ETAs), so a
// watch sends only real changes between heartbeats.
func withoutClock(r *pb.Rebalance) *pb.Rebalance {
	c := proto.Clone(r).(*pb.Rebalance)
	for _, m := range c.Moves {
		m.RowsPerSecond, m.Eta = 0, nil
	}
	return c
}

// CancelRebalance asks the running rebalance to stop.
func (a *AdminService) CancelRebalance(ctx context.Context, _ *pb.CancelRebalanceRequest) (*pb.CancelRebalanceResponse, error) {
	id, err := a.s.catalog.CancelRebalance(ctx)
	if err != nil {
		return nil, err
	}
	return &pb.CancelRebalanceResponse{RebalanceId: id}, nil
}

func rebalanceState(s string) pb.RebalanceState {
	switch s {
	case catalog.RebalanceRunning:
		return pb.RebalanceState_REBALANCE_STATE_RUNNING
	case catalog.RebalanceDone:
		return pb.RebalanceState_REBALANCE_STATE_DONE
	case catalog.RebalanceFailed:
		return pb.RebalanceState_REBALANCE_STATE_FAILED
	case catalog.RebalanceCancelled:
		return pb.RebalanceState_REBALANCE_STATE_CANCELLED
	}
	return pb.RebalanceState_REBALANCE_STATE_UNSPECIFIED
}

func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func rebalanceProto(r catalog.Rebalance, moves []catalog.Move, now time.Time) *pb.Rebalance {
	out := &pb.Rebalance{
		Id: r.ID, State: rebalanceState(r.State), CancelRequested: r.CancelRequested,
		MaxParallel: int32(r.MaxParallel), FreezeBudgetMs: int32(r.FreezeBudget.Milliseconds()),
		CreatedAt: timestamp(r.CreatedAt), FinishedAt: timestamp(r.FinishedAt), Error: r.Error,
	}
	for _, m := range moves {
		out.Moves = append(out.Moves, moveProto(m, now))
		out.RowsTotal += m.RowsTotal
		out.RowsCopied += m.RowsCopied
		if mover.State(m.State).Terminal() {
			out.MovesDone++
		}
	}
	return out
}

func moveProto(m catalog.Move, now time.Time) *pb.Move {
	pm := &pb.Move{
		Id: m.ID, Source: m.Source, Target: m.Target, Partitions: m.Partitions, State: m.State,
		RowsTotal: m.RowsTotal, RowsCopied: m.RowsCopied, BytesTotal: m.BytesTotal, Attempts: int32(m.Attempts),
		Freezes: int32(m.Freezes), LastFreezeMs: ms(m.LastFreeze), MaxFreezeMs: ms(m.MaxFreeze),
		VerifiedRows: m.VerifiedRows, LastError: m.LastError,
		StartedAt: timestamp(m.StartedAt), UpdatedAt: timestamp(m.UpdatedAt), FinishedAt: timestamp(m.FinishedAt),
	}
	if mover.State(m.State) == mover.Copying && !m.StartedAt.IsZero() && m.RowsCopied > 0 {
		if el := now.Sub(m.StartedAt).Seconds(); el > 0 {
			pm.RowsPerSecond = float64(m.RowsCopied) / el
			if left := m.RowsTotal - m.RowsCopied; left > 0 {
				pm.Eta = durationpb.New(time.Duration(float64(left) / pm.RowsPerSecond * float64(time.Second)))
			}
		}
	}
	return pm
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// VerifyPartition checksums a partition wherever it has rows.
func (a *AdminService) VerifyPartition(ctx context.Context, req *pb.VerifyPartitionRequest) (*pb.VerifyPartitionResponse, error) {
	p := req.GetPartition()
	topo, err := a.s.catalog.LoadTopology(ctx)
	if err != nil {
		return nil, err
	}
	resp := &pb.VerifyPartitionResponse{Partition: p, Owner: topo.Table.Owner(p), Ok: true}
	var moveTarget string
	if r, moves, err := a.s.catalog.LatestRebalance(ctx); err == nil && r.State == catalog.RebalanceRunning {
		for _, m := range moves {
			if !mover.State(m.State).Terminal() && slices.Contains(m.Partitions, p) {
				resp.Move = moveProto(m, time.Now())
				moveTarget = m.Target
			}
		}
	} else if err != nil && !errors.Is(err, catalog.ErrNoRebalance) {
		return nil, err
	}
	copies := make([]*pb.PartitionCopy, len(topo.Shards))
	var wg sync.WaitGroup
	for i, rec := range topo.Shards {
		wg.Go(func() { copies[i] = a.partitionCopy(ctx, rec.Name, p) })
	}
	wg.Wait()
	for _, c := range copies {
		held := c.Error != "" || len(c.Tables) > 0 || c.Ownership != ""
		switch {
		case c.Shard == resp.Owner:
			resp.Copies = append([]*pb.PartitionCopy{c}, resp.Copies...)
		case held:
			resp.Copies = append(resp.Copies, c)
			if c.Shard != moveTarget && c.Error == "" && (len(c.Tables) > 0 || c.Ownership == string(shards.Owned) || c.Ownership == string(shards.Frozen)) {
				resp.Ok = false
				resp.Problem = fmt.Sprintf("shard %s holds rows or ownership of partition %d, which %s owns, outside any move in flight", c.Shard, p, resp.Owner)
			}
		}
	}
	if own := resp.Copies; len(own) > 0 && own[0].Shard == resp.Owner && own[0].Error == "" &&
		own[0].Ownership != string(shards.Owned) && own[0].Ownership != string(shards.Frozen) {
		resp.Ok = false
		resp.Problem = fmt.Sprintf("the owner %s does not list partition %d as owned (it says %q)", resp.Owner, p, own[0].Ownership)
	}
	return resp, nil
}

// partitionCopy checksums what one shard holds of partition p.
func (a *AdminService) partitionCopy(ctx context.Context, shard string, p int32) *pb.PartitionCopy {
	c := &pb.PartitionCopy{Shard: shard}
	sh, ok := a.s.shard(shard)
	if !ok {
		c.Error = "this server has no connection pool for the shard"
		return c
	}
	fail := func(err error) *pb.PartitionCopy {
		a.s.opts.Logger.Warn("verify partition: shard unavailable", "shard", shard, "partition", p, "err", err)
		return &pb.PartitionCopy{Shard: shard, Error: "the shard could not be asked (see the server log)"}
	}
	st, err := sh.OwnershipOf(ctx, []int32{p})
	if err != nil {
		return fail(err)
	}
	c.Ownership = string(st[p])
	snap, err := sh.BeginSnapshot(ctx)
	if err != nil {
		return fail(err)
	}
	defer snap.Close()
	sums, err := snap.Checksums(ctx, []int32{p})
	if err != nil {
		return fail(err)
	}
	for _, s := range sums {
		c.Tables = append(c.Tables, &pb.TableChecksum{Table: s.Table, Rows: s.Rows, Hash: s.Sum})
	}
	return c
}
