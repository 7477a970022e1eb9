package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// errUnhealthy is the exit status of a status that found a problem.
var errUnhealthy = errors.New("the cluster is unhealthy")

type statusCmd struct {
	MaxBacklogAge time.Duration `name:"max-backlog-age" help:"An undelivered event older than this makes the cluster unhealthy (1s to 24h)." default:"60s"`
}

// Run prints the cluster summary and fails (exit 1) when it lists a
// problem: a shard unreachable, a relay backlog older than
// --max-backlog-age, a failed move. An unreachable server fails too.
func (c statusCmd) Run(g *globals) error {
	if c.MaxBacklogAge < time.Second || c.MaxBacklogAge > 24*time.Hour {
		return fmt.Errorf("--max-backlog-age %s is outside 1s..24h", c.MaxBacklogAge)
	}
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).GetClusterStatus(ctx, &pb.GetClusterStatusRequest{
			MaxBacklogAgeSeconds: int32(c.MaxBacklogAge / time.Second),
		})
		if err != nil {
			return err
		}
		if g.JSON {
			err = g.printJSON(resp)
		} else {
			err = printStatus(g, resp)
		}
		if err != nil {
			return err
		}
		if len(resp.GetProblems()) > 0 {
			return errUnhealthy
		}
		return nil
	})
}

func printStatus(g *globals, r *pb.GetClusterStatusResponse) error {
	fmt.Fprintf(g.out, "topology version %d, %d partitions, %d shards\n\n", r.GetTopologyVersion(), r.GetPartitionCount(), len(r.GetShards()))
	w := g.table("SHARD", "STATE", "UP", "PARTITIONS", "SHARE", "WEIGHT", "ROWS", "SIZE", "QPS", "P99", "POOL", "BACKLOG", "OLDEST", "RELAY")
	for _, s := range r.GetShards() {
		up := "yes"
		if !s.GetReachable() {
			up = "NO"
		}
		relay := "-"
		if s.GetRelayLeading() {
			relay = "here"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%.1f%%\t%d\t%d\t%s\t%.1f\t%.2fms\t%d/%d\t%d\t%s\t%s\n",
			s.GetName(), enumName(s.GetState().String(), "SHARD_STATE_"), up, s.GetPartitions(), 100*s.GetShare(), s.GetWeight(),
			s.GetRows(), bytesText(s.GetBytes()), s.GetQps(), s.GetP99Ms(), s.GetPoolAcquired(), s.GetPoolMax(),
			s.GetBacklog(), ageText(s.GetOldestEventAgeSeconds()), relay)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	ev := r.GetEvents()
	fmt.Fprintf(g.out, "\nevents: %.1f/s published here (%d in all), backlog %d, oldest %s, %d watch streams (%d events sent)\n",
		ev.GetPublishedPerSecond(), ev.GetPublishedTotal(), ev.GetBacklog(), ageText(ev.GetOldestEventAgeSeconds()),
		ev.GetWatchStreams(), ev.GetWatchEventsSent())
	if c := r.GetCache(); c.GetEnabled() {
		fmt.Fprintf(g.out, "cache: hit ratio %.1f%% (local %d, redis %d, miss %d), breaker %s\n",
			100*c.GetHitRatio(), c.GetLocalHits(), c.GetRedisHits(), c.GetMisses(), c.GetBreaker())
	} else {
		fmt.Fprintln(g.out, "cache: off")
	}
	if rb := r.GetRebalance(); rb != nil {
		fmt.Fprintf(g.out, "\nrebalance %d: %s, %d/%d moves done, %d/%d rows copied\n", rb.GetId(),
			enumName(rb.GetState().String(), "REBALANCE_STATE_"), rb.GetMovesDone(), len(rb.GetMoves()), rb.GetRowsCopied(), rb.GetRowsTotal())
		if rb.GetState() == pb.RebalanceState_REBALANCE_STATE_RUNNING {
			mw := g.table("MOVE", "FROM", "TO", "PARTITIONS", "STATE", "PROGRESS", "LAST PAUSE", "WORST PAUSE")
			for _, m := range rb.GetMoves() {
				prog := "-"
				if m.GetRowsTotal() > 0 {
					prog = fmt.Sprintf("%.0f%%", 100*min(float64(m.GetRowsCopied())/float64(m.GetRowsTotal()), 1))
				}
				fmt.Fprintf(mw, "%d\t%s\t%s\t%d\t%s\t%s\t%.1fms\t%.1fms\n", m.GetId(), m.GetSource(), m.GetTarget(),
					len(m.GetPartitions()), m.GetState(), prog, m.GetLastFreezeMs(), m.GetMaxFreezeMs())
			}
			if err := mw.Flush(); err != nil {
				return err
			}
		}
	}
	if len(r.GetProblems()) == 0 {
		fmt.Fprintln(g.out, "\nhealthy")
		return nil
	}
	fmt.Fprintln(g.out, "\nUNHEALTHY:")
	for _, p := range r.GetProblems() {
		fmt.Fprintln(g.out, "  - "+p)
	}
	return nil
}

func enumName(s, prefix string) string { return strings.ToLower(strings.TrimPrefix(s, prefix)) }

func ageText(sec float64) string {
	if sec <= 0 {
		return "-"
	}
	return (time.Duration(sec * float64(time.Second))).Round(100 * time.Millisecond).String()
}
