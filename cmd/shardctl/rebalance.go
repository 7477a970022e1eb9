package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// Shard and rebalance commands: the cluster changing shape.

type shardAddCmd struct {
	Name   string `arg:"" help:"Shard name: 1-63 characters of [a-z0-9_-]."`
	DSN    string `name:"dsn" required:"" help:"The shard database's DSN as every server will use it (may reference environment variables as $${NAME}). The database must exist and be empty; it is migrated first."`
	Weight int32  `help:"Relative size: a shard of weight N gets N times the partitions of weight 1 (1-64)." default:"1"`
}

func (c shardAddCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).AddShard(ctx, &pb.AddShardRequest{Name: c.Name, Dsn: c.DSN, Weight: c.Weight})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		fmt.Fprintf(g.out, "shard %s added (weight %d); it owns nothing until 'shardctl rebalance start'\n", c.Name, resp.GetShard().GetWeight())
		return nil
	})
}

type shardDrainCmd struct {
	Name string `arg:"" help:"Shard name."`
}

func (c shardDrainCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).DrainShard(ctx, &pb.DrainShardRequest{Name: c.Name})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		fmt.Fprintf(g.out, "shard %s is draining; 'shardctl rebalance start' moves its partitions away\n", c.Name)
		return nil
	})
}

type shardActivateCmd struct {
	Name string `arg:"" help:"Shard name."`
}

func (c shardActivateCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).ActivateShard(ctx, &pb.ActivateShardRequest{Name: c.Name})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		fmt.Fprintf(g.out, "shard %s is active again\n", c.Name)
		return nil
	})
}

type shardRemoveCmd struct {
	Name  string `arg:"" help:"Shard name."`
	Force bool   `help:"Do not check that the shard's database holds no rows (for a database that is gone)."`
}

func (c shardRemoveCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).RemoveShard(ctx, &pb.RemoveShardRequest{Name: c.Name, Force: c.Force})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		fmt.Fprintf(g.out, "shard %s removed; its database can be dropped\n", c.Name)
		return nil
	})
}

type rebalancePlanCmd struct {
	MaxParallel int32 `name:"max-parallel" help:"Moves at once, for the estimate (0: the server's default, 2)." default:"0"`
}

func (c rebalancePlanCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).PlanRebalance(ctx, &pb.PlanRebalanceRequest{MaxParallel: c.MaxParallel})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		return printPlan(g, resp)
	})
}

func printPlan(g *globals, p *pb.PlanRebalanceResponse) error {
	if len(p.GetMoves()) == 0 {
		fmt.Fprintf(g.out, "nothing to move: the map matches the placement of the active shards (topology version %d)\n\n", p.GetTopologyVersion())
	} else {
		fmt.Fprintf(g.out, "%d partitions in %d moves, %d rows, %s, about %s (topology version %d)\n\n",
			p.GetPartitionsMoving(), len(p.GetMoves()), p.GetRows(), bytesText(p.GetBytes()),
			p.GetEstimate().AsDuration().Round(time.Second), p.GetTopologyVersion())
	}
	w := g.table("SHARD", "STATE", "WEIGHT", "BEFORE", "AFTER", "SHARE")
	for _, s := range p.GetShards() {
		share := "-"
		if s.GetShare() > 0 {
			share = fmt.Sprintf("%.1f", s.GetShare())
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\t%d\t%s\n", s.GetName(), stateText(s.GetState()), s.GetWeight(),
			s.GetPartitionsBefore(), s.GetPartitionsAfter(), share)
	}
	if err := w.Flush(); err != nil || len(p.GetMoves()) == 0 {
		return err
	}
	fmt.Fprintln(g.out)
	w = g.table("FROM", "TO", "PARTITIONS", "ROWS", "BYTES")
	for _, m := range p.GetMoves() {
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\t%s\n", m.GetSource(), m.GetTarget(), len(m.GetPartitions()), m.GetRows(), bytesText(m.GetBytes()))
	}
	return w.Flush()
}

func stateText(s pb.ShardState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "SHARD_STATE_"))
}

func bytesText(b int64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%d B", b)
	}
	div, exp := int64(unit), 0
	for n := b / unit; n >= unit; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(b)/float64(div), "KMGTPE"[exp])
}

type rebalanceStartCmd struct {
	MaxParallel  int32         `name:"max-parallel" help:"Moves at once (1-64; 0: the default, 2)." default:"0"`
	FreezeBudget time.Duration `name:"freeze-budget" help:"Longest a cutover keeps writes to its partitions waiting (1ms-1s)." default:"100ms"`
	Wait         bool          `help:"Follow the rebalance with live progress until it ends; exit 0 only if every move is done and verified."`
}

func (c rebalanceStartCmd) Run(g *globals) error {
	if c.FreezeBudget < time.Millisecond || c.FreezeBudget > time.Second {
		return fmt.Errorf("--freeze-budget %s: want 1ms to 1s", c.FreezeBudget)
	}
	var resp *pb.StartRebalanceResponse
	err := g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		var err error
		resp, err = pb.NewAdminServiceClient(conn).StartRebalance(ctx, &pb.StartRebalanceRequest{
			MaxParallel: c.MaxParallel, FreezeBudgetMs: int32(c.FreezeBudget.Milliseconds()),
		})
		return err
	})
	if err != nil {
		return err
	}
	if g.JSON && !c.Wait {
		return g.printJSON(resp)
	}
	if !g.JSON {
		if err := printPlan(g, resp.GetPlan()); err != nil {
			return err
		}
		fmt.Fprintf(g.out, "\nrebalance %d started\n", resp.GetRebalanceId())
	}
	if !c.Wait {
		return nil
	}
	return follow(g)
}

type rebalanceStatusCmd struct {
	Wait bool `help:"Follow the rebalance with live progress until it ends; exit 0 only if every move is done and verified."`
}

func (c rebalanceStatusCmd) Run(g *globals) error {
	if c.Wait {
		return follow(g)
	}
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).GetRebalance(ctx, &pb.GetRebalanceRequest{})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		return printRebalance(g, resp.GetRebalance())
	})
}

func printRebalance(g *globals, r *pb.Rebalance) error {
	fmt.Fprintf(g.out, "rebalance %d: %s, %d of %d moves ended, %d of %d rows copied%s\n",
		r.GetId(), rebalanceText(r), r.GetMovesDone(), len(r.GetMoves()), r.GetRowsCopied(), r.GetRowsTotal(), errText(r.GetError()))
	if len(r.GetMoves()) == 0 {
		return nil
	}
	fmt.Fprintln(g.out)
	w := g.table("MOVE", "FROM", "TO", "PARTITIONS", "STATE", "ROWS", "FREEZE", "VERIFIED", "LAST ERROR")
	for _, m := range r.GetMoves() {
		freeze := "-"
		if m.GetFreezes() > 0 {
			freeze = fmt.Sprintf("%.1f ms", m.GetLastFreezeMs())
		}
		verified := "-"
		if m.GetVerifiedRows() > 0 {
			verified = fmt.Sprint(m.GetVerifiedRows())
		}
		last := m.GetLastError()
		if last == "" {
			last = "-"
		}
		fmt.Fprintf(w, "%d\t%s\t%s\t%d\t%s\t%d/%d\t%s\t%s\t%s\n", m.GetId(), m.GetSource(), m.GetTarget(), len(m.GetPartitions()),
			m.GetState(), m.GetRowsCopied(), m.GetRowsTotal(), freeze, verified, last)
	}
	return w.Flush()
}

func rebalanceText(r *pb.Rebalance) string {
	s := strings.ToLower(strings.TrimPrefix(r.GetState().String(), "REBALANCE_STATE_"))
	if r.GetCancelRequested() && r.GetState() == pb.RebalanceState_REBALANCE_STATE_RUNNING {
		s += " (cancelling)"
	}
	return s
}

func errText(e string) string {
	if e == "" {
		return ""
	}
	return ": " + e
}

// errRebalanceNotDone is the exit status of a --wait that ended otherwise
// than with every move done and verified.
var errRebalanceNotDone = errors.New("the rebalance did not complete")

// follow watches the current rebalance until it ends: progress bars on a
// terminal, a line per change otherwise, one JSON object per update with
// --json. It fails unless the rebalance ended done.
func follow(g *globals) error {
	opts, err := g.dialOptions()
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(g.Addr, opts...)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	st, err := pb.NewAdminServiceClient(conn).WatchRebalance(ctx, &pb.WatchRebalanceRequest{})
	if err != nil {
		return err
	}
	var view progressView = &lineView{out: g.out, seen: map[int64]string{}}
	switch {
	case g.JSON:
		view = &jsonView{out: g.out}
	case isTerminal(g.out):
		view = newBarView(g.out)
	}
	var last *pb.Rebalance
	for {
		resp, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			view.done()
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted; the rebalance goes on (shardctl rebalance status)")
			}
			return err
		}
		last = resp.GetRebalance()
		view.update(last)
	}
	view.done()
	if last == nil {
		return errRebalanceNotDone
	}
	if !g.JSON {
		fmt.Fprintln(g.out)
		if err := printRebalance(g, last); err != nil {
			return err
		}
	}
	if last.GetState() != pb.RebalanceState_REBALANCE_STATE_DONE {
		return fmt.Errorf("%w: rebalance %d ended %s", errRebalanceNotDone, last.GetId(), rebalanceText(last))
	}
	return nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

type progressView interface {
	update(*pb.Rebalance)
	done()
}

// jsonView prints each update as one line of JSON.
type jsonView struct{ out io.Writer }

func (v *jsonView) update(r *pb.Rebalance) {
	b, err := protojson.Marshal(r)
	if err == nil {
		fmt.Fprintln(v.out, string(b))
	}
}

func (v *jsonView) done() {}

// lineView prints a line whenever a move changes state.
type lineView struct {
	out  io.Writer
	seen map[int64]string
}

func (v *lineView) update(r *pb.Rebalance) {
	for _, m := range r.GetMoves() {
		if v.seen[m.GetId()] == m.GetState() {
			continue
		}
		v.seen[m.GetId()] = m.GetState()
		fmt.Fprintf(v.out, "%s  move %d %s→%s (%d partitions): %s%s\n", time.Now().Format("15:04:05"),
			m.GetId(), m.GetSource(), m.GetTarget(), len(m.GetPartitions()), moveStatus(m), errText(m.GetLastError()))
	}
}

func (v *lineView) done() {}

func moveStatus(m *pb.Move) string {
	switch m.GetState() {
	case "copying":
		return fmt.Sprintf("copying %d/%d rows", m.GetRowsCopied(), m.GetRowsTotal())
	case "cut_over", "cleaned_up":
		return fmt.Sprintf("%s, write pause %.1f ms, %d rows verified", m.GetState(), m.GetLastFreezeMs(), m.GetVerifiedRows())
	}
	return m.GetState()
}

// barView draws a progress bar per move (mpb): rows copied, rate, ETA,
// then the state and the measured write pause.
type barView struct {
	p    *mpb.Progress
	bars map[int64]*mpb.Bar
	last map[int64]*pb.Move
}

func newBarView(out io.Writer) *barView {
	return &barView{
		p:    mpb.New(mpb.WithOutput(out), mpb.WithWidth(32), mpb.WithRefreshRate(200*time.Millisecond)),
		bars: map[int64]*mpb.Bar{},
		last: map[int64]*pb.Move{},
	}
}

func (v *barView) update(r *pb.Rebalance) {
	for _, m := range r.GetMoves() {
		id := m.GetId()
		v.last[id] = m
		bar, ok := v.bars[id]
		// One more than the rows, so that a finished copy does not complete
		// the bar while the move goes on (catching up, cutover, cleanup).
		total := m.GetRowsTotal() + 1
		if !ok {
			label := fmt.Sprintf("move %d %s→%s (%d p)", id, m.GetSource(), m.GetTarget(), len(m.GetPartitions()))
			bar = v.p.AddBar(total,
				mpb.PrependDecorators(decor.Name(label, decor.WCSyncSpaceR)),
				mpb.AppendDecorators(decor.Any(func(decor.Statistics) string { return barText(v.last[id]) })),
			)
			v.bars[id] = bar
		}
		switch m.GetState() {
		case "cleaned_up", "failed", "cancelled":
			bar.SetCurrent(total)
		default:
			bar.SetCurrent(min(m.GetRowsCopied(), total-1))
		}
	}
}

func barText(m *pb.Move) string {
	if m == nil {
		return ""
	}
	switch m.GetState() {
	case "copying":
		eta := "-"
		if m.GetEta() != nil {
			eta = m.GetEta().AsDuration().Round(time.Second).String()
		}
		return fmt.Sprintf("%d/%d rows  %.0f rows/s  ETA %s", m.GetRowsCopied(), m.GetRowsTotal(), m.GetRowsPerSecond(), eta)
	case "cut_over", "cleaned_up":
		return fmt.Sprintf("%s  pause %.1f ms  %d rows verified", m.GetState(), m.GetLastFreezeMs(), m.GetVerifiedRows())
	case "failed", "rolling_back":
		return m.GetState() + errText(m.GetLastError())
	}
	return m.GetState()
}

func (v *barView) done() {
	for _, b := range v.bars {
		if !b.Completed() {
			b.Abort(false)
		}
	}
	v.p.Wait()
}

type rebalanceCancelCmd struct{}

func (rebalanceCancelCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).CancelRebalance(ctx, &pb.CancelRebalanceRequest{})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		fmt.Fprintf(g.out, "rebalance %d is cancelling: moves not yet cut over roll back, the others finish\n", resp.GetRebalanceId())
		return nil
	})
}

type verifyCmd struct {
	Partition int32 `arg:"" help:"Partition number."`
}

// errVerify is the exit status of a verify that found a problem.
var errVerify = errors.New("verification found a problem")

func (c verifyCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).VerifyPartition(ctx, &pb.VerifyPartitionRequest{Partition: c.Partition})
		if err != nil {
			return err
		}
		if g.JSON {
			if err := g.printJSON(resp); err != nil {
				return err
			}
		} else {
			fmt.Fprintf(g.out, "partition %d, owner %s\n", resp.GetPartition(), resp.GetOwner())
			if m := resp.GetMove(); m != nil {
				fmt.Fprintf(g.out, "moving: move %d %s→%s, %s\n", m.GetId(), m.GetSource(), m.GetTarget(), m.GetState())
			}
			fmt.Fprintln(g.out)
			w := g.table("SHARD", "OWNERSHIP", "TABLE", "ROWS", "HASH")
			for _, cp := range resp.GetCopies() {
				own := cp.GetOwnership()
				if own == "" {
					own = "-"
				}
				if cp.GetError() != "" {
					fmt.Fprintf(w, "%s\t%s\t-\t-\t%s\n", cp.GetShard(), own, cp.GetError())
					continue
				}
				if len(cp.GetTables()) == 0 {
					fmt.Fprintf(w, "%s\t%s\t(no rows)\t0\t-\n", cp.GetShard(), own)
				}
				for _, t := range cp.GetTables() {
					fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\n", cp.GetShard(), own, t.GetTable(), t.GetRows(), t.GetHash())
				}
			}
			if err := w.Flush(); err != nil {
				return err
			}
			if resp.GetOk() {
				fmt.Fprintln(g.out, "\nok")
			} else {
				fmt.Fprintf(g.out, "\nPROBLEM: %s\n", resp.GetProblem())
			}
		}
		if !resp.GetOk() {
			return fmt.Errorf("%w: %s", errVerify, resp.GetProblem())
		}
		return nil
	})
}
