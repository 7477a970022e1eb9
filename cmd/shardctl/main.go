// Command shardctl administers a Shardgate cluster.
//
//	shardctl topology                 shards and the partitions they own
//	shardctl locate USER              a user's partition and shard
//	shardctl migrate status           schema version of the catalog and each shard
//	shardctl migrate up --catalog DSN apply pending migrations everywhere
//	shardctl events tail --user U     follow change events live (--partition P, --config)
//	shardctl token mint --role R --sub S --key FILE   sign a token
//	shardctl shard add NAME --dsn DSN [--weight N]    register an empty shard
//	shardctl shard drain NAME         give its partitions away in the next rebalance
//	shardctl shard remove NAME        unregister a shard that owns and holds nothing
//	shardctl rebalance plan           what a rebalance would move (dry run)
//	shardctl rebalance start [--max-parallel N] [--wait]   start one (and follow it)
//	shardctl rebalance status         the running or last rebalance, per move
//	shardctl rebalance cancel         roll back moves not yet cut over
//	shardctl verify PARTITION         checksums of a partition wherever it has rows
//	shardctl status [--max-backlog-age D]   cluster summary; exit 1 when unhealthy
//	shardctl import check --mapping F --from DSN   dry run of an import (docs/migrating.md)
//	shardctl import start --mapping F --from DSN --catalog DSN   bulk copy (resumable)
//	shardctl import follow | status | cutover      follow changes, show lag, finish
//	shardctl export --out DIR [--partitions 0-511] NDJSON + manifest; import start --from-ndjson DIR
//	shardctl import verify | cancel [--purge]      compare source and Shardgate; stop an import
//
// --token (or SHARDGATE_TOKEN) is sent as "authorization: Bearer …" on
// every call; it needs TLS (--tls, --ca-file) unless the address is loopback.
//
// Output is a table for people; --json prints one JSON document for scripts
// (events tail: one JSON object per line).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/alecthomas/kong"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/shardgate/shardgate/catalog"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

type globals struct {
	Addr       string        `help:"Shardgate gRPC address." default:"127.0.0.1:7070" env:"SHARDGATE_ADDR"`
	JSON       bool          `help:"Print JSON instead of a table."`
	Timeout    time.Duration `help:"Deadline of each call." default:"10s"`
	Token      string        `help:"Bearer token (JWT) sent with every call; needs TLS unless the address is loopback." env:"SHARDGATE_TOKEN"`
	TLS        bool          `help:"Connect with TLS 1.3 (implied by --ca-file and --client-cert)." env:"SHARDGATE_TLS"`
	CAFile     string        `name:"ca-file" help:"PEM CA certificates to verify the server with (default: the system's)." env:"SHARDGATE_CA_FILE"`
	ServerName string        `name:"server-name" help:"Server name to verify instead of the address's host."`
	Cert       string        `name:"client-cert" help:"PEM client certificate, for mutual TLS." env:"SHARDGATE_CLIENT_CERT"`
	Key        string        `name:"client-key" help:"PEM private key of --client-cert." env:"SHARDGATE_CLIENT_KEY"`

	out io.Writer
}

type cli struct {
	globals
	Topology topologyCmd `cmd:"" help:"Show the shards and how many partitions each owns."`
	Locate   locateCmd   `cmd:"" help:"Show which partition and shard hold a user."`
	Migrate  struct {
		Status migrateStatusCmd `cmd:"" help:"Show the schema version of the catalog and every shard."`
		Up     migrateUpCmd     `cmd:"" help:"Apply pending migrations to the catalog and every shard (talks to the databases directly)."`
	} `cmd:"" help:"Schema migrations."`
	Events struct {
		Tail eventsTailCmd `cmd:"" help:"Follow change events live (Watch), one line each."`
	} `cmd:"" help:"Change events."`
	Token struct {
		Mint tokenMintCmd `cmd:"" help:"Sign a token with a private key (e.g. dev mode's key) and print it."`
	} `cmd:"" help:"Tokens."`
	Shard struct {
		Add      shardAddCmd      `cmd:"" help:"Register a new, empty shard (its database is migrated first); it owns nothing until a rebalance."`
		Drain    shardDrainCmd    `cmd:"" help:"Mark a shard draining: the next rebalance moves all its partitions away."`
		Activate shardActivateCmd `cmd:"" help:"Undo a drain: the shard takes partitions again in the next rebalance."`
		Remove   shardRemoveCmd   `cmd:"" help:"Unregister a shard that owns no partition and holds no rows."`
	} `cmd:"" help:"Add, drain and remove shards."`
	Rebalance struct {
		Plan   rebalancePlanCmd   `cmd:"" help:"Show the moves a rebalance would make now (changes nothing)."`
		Start  rebalanceStartCmd  `cmd:"" help:"Start a rebalance (the cluster's executor runs it); --wait follows it."`
		Status rebalanceStatusCmd `cmd:"" help:"Show the running or last rebalance, move by move."`
		Cancel rebalanceCancelCmd `cmd:"" help:"Cancel the running rebalance: moves not yet cut over roll back."`
	} `cmd:"" help:"Move partitions between shards online."`
	Verify verifyCmd `cmd:"" help:"Checksum a partition on its owner and on any other shard holding rows of it; exit 1 on a problem."`
	Status statusCmd `cmd:"" help:"Summarise the cluster: shards, load, events, cache, the rebalance; exit 1 when unhealthy (a shard unreachable, an old relay backlog, a failed move)."`
	Export exportCmd `cmd:"" help:"Write every user, item and config value as NDJSON files with a manifest (resumable); 'import start --from-ndjson' loads them."`
	Import struct {
		Check   importCheckCmd   `cmd:"" help:"Validate a mapping against the source and show what an import would write (dry run)."`
		Start   importStartCmd   `cmd:"" help:"Copy a consistent snapshot of the source into the shards (resumable: run again after a failure)."`
		Follow  importFollowCmd  `cmd:"" help:"Apply the source's changes since the bulk snapshot until cutover (long-running; run again to continue)."`
		Status  importStatusCmd  `cmd:"" help:"Show an import's progress and its lag (bytes and seconds) per table."`
		Verify  importVerifyCmd  `cmd:"" help:"Compare every mapped source row with Shardgate: counts, content hashes, first differing keys."`
		Cutover importCutoverCmd `cmd:"" help:"Wait for zero lag, verify, stop following and drop the slot; prints the next steps."`
		Cancel  importCancelCmd  `cmd:"" help:"Stop an import: drop its slot and checkpoints (--purge: and the imported rows)."`
	} `cmd:"" help:"Import one unsharded PostgreSQL database (see docs/migrating.md)."`
}

func main() {
	var c cli
	c.out = os.Stdout
	kctx := kong.Parse(&c, kong.Name("shardctl"), kong.Description("Administer a Shardgate cluster."), kong.UsageOnError())
	if err := kctx.Run(&c.globals); err != nil {
		fmt.Fprintln(os.Stderr, "shardctl:", err)
		os.Exit(1)
	}
}

// call dials the server and runs fn with a deadline.
func (g *globals) call(fn func(context.Context, *grpc.ClientConn) error) error {
	opts, err := g.dialOptions()
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(g.Addr, opts...)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), g.Timeout)
	defer cancel()
	return fn(ctx, conn)
}

func (g *globals) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(g.out, string(b))
	return err
}

func (g *globals) table(header ...string) *tabwriter.Writer {
	w := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, strings.Join(header, "\t"))
	return w
}

type topologyCmd struct{}

func (topologyCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).GetTopology(ctx, &pb.GetTopologyRequest{})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		fmt.Fprintf(g.out, "topology version %d, %d partitions\n\n", resp.GetVersion(), resp.GetPartitionCount())
		w := g.table("SHARD", "STATE", "PARTITIONS", "SHARE")
		for _, s := range resp.GetShards() {
			share := 100 * float64(s.GetPartitionCount()) / float64(max(resp.GetPartitionCount(), 1))
			state := strings.ToLower(strings.TrimPrefix(s.GetState().String(), "SHARD_STATE_"))
			fmt.Fprintf(w, "%s\t%s\t%d\t%.1f%%\n", s.GetName(), state, s.GetPartitionCount(), share)
		}
		return w.Flush()
	})
}

type locateCmd struct {
	User string `arg:"" help:"User ID."`
}

func (c locateCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).LocateUser(ctx, &pb.LocateUserRequest{UserId: c.User})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		w := g.table("USER", "PARTITION", "SHARD")
		fmt.Fprintf(w, "%s\t%d\t%s\n", c.User, resp.GetPartition(), resp.GetShard())
		return w.Flush()
	})
}

type migrateStatusCmd struct{}

func (migrateStatusCmd) Run(g *globals) error {
	return g.call(func(ctx context.Context, conn *grpc.ClientConn) error {
		resp, err := pb.NewAdminServiceClient(conn).MigrationStatus(ctx, &pb.MigrationStatusRequest{})
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(resp)
		}
		w := g.table("DATABASE", "APPLIED", "LATEST", "PENDING", "ERROR")
		for _, d := range append([]*pb.DatabaseMigration{resp.GetCatalog()}, resp.GetShards()...) {
			pending := fmt.Sprint(d.GetPendingVersions())
			if len(d.GetPendingVersions()) == 0 {
				pending = "-"
			}
			errText := d.GetError()
			if errText == "" {
				errText = "-"
			}
			fmt.Fprintf(w, "%s\t%d\t%d\t%s\t%s\n", d.GetName(), d.GetAppliedVersion(), d.GetLatestVersion(), pending, errText)
		}
		return w.Flush()
	})
}

type migrateUpCmd struct {
	Catalog string `help:"Catalog database DSN." required:"" env:"SHARDGATE_CATALOG"`
}

func (c migrateUpCmd) Run(g *globals) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	results, err := catalog.MigrateAll(ctx, c.Catalog)
	if g.JSON {
		type row struct {
			Database string  `json:"database"`
			Applied  []int64 `json:"applied"`
			Error    string  `json:"error,omitempty"`
		}
		rows := make([]row, len(results))
		for i, r := range results {
			rows[i] = row{Database: r.Name, Applied: append([]int64{}, r.Applied...)}
			if r.Err != nil {
				rows[i].Error = r.Err.Error()
			}
		}
		enc := json.NewEncoder(g.out)
		enc.SetIndent("", "  ")
		if e := enc.Encode(rows); e != nil {
			return e
		}
		return err
	}
	w := g.table("DATABASE", "APPLIED NOW", "ERROR")
	for _, r := range results {
		applied, errText := "-", "-"
		if len(r.Applied) > 0 {
			applied = fmt.Sprint(r.Applied)
		}
		if r.Err != nil {
			errText = r.Err.Error()
		}
		fmt.Fprintf(w, "%s\t%s\t%s\n", r.Name, applied, errText)
	}
	if e := w.Flush(); e != nil {
		return e
	}
	return err
}

type eventsTailCmd struct {
	User       []string `help:"User ID to follow (repeatable, up to 1000)." placeholder:"USER"`
	Partition  []uint32 `help:"Partition to follow (repeatable)." placeholder:"P"`
	Config     bool     `help:"Follow global config changes too."`
	Cursor     string   `help:"Resume exactly after this cursor (from an earlier event or heartbeat)."`
	Heartbeats bool     `help:"Print heartbeats (with the current cursor) too."`
	Count      int      `help:"Exit after this many events (0: until interrupted)." default:"0"`
}

// Run follows until interrupted (or Count events): each event is one line,
// human-readable or (--json) a WatchResponse in JSON.
func (c eventsTailCmd) Run(g *globals) error {
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
	st, err := pb.NewDataServiceClient(conn).Watch(ctx, &pb.WatchRequest{
		UserIds: c.User, Partitions: c.Partition, Config: c.Config, Cursor: c.Cursor,
	})
	if err != nil {
		return err
	}
	line := protojson.MarshalOptions{}
	for n := 0; c.Count == 0 || n < c.Count; {
		r, err := st.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return nil // interrupted
			}
			return err
		}
		e, hb := r.GetEvent(), r.GetHeartbeat()
		if e != nil {
			n++
		} else if !c.Heartbeats {
			continue
		}
		if g.JSON {
			b, err := line.Marshal(r)
			if err != nil {
				return err
			}
			fmt.Fprintln(g.out, string(b))
			continue
		}
		if hb != nil {
			fmt.Fprintf(g.out, "%s  heartbeat  cursor=%s\n", hb.GetTime().AsTime().UTC().Format(time.RFC3339Nano), hb.GetCursor())
			continue
		}
		who := e.GetUserId()
		if e.GetEntity() == "config" {
			who = "-"
		}
		payload := e.GetPayloadJson()
		if e.GetPayloadOmitted() {
			payload = "(payload omitted: too large)"
		}
		fmt.Fprintf(g.out, "%s  p%-4d %-20s %-7s %-6s %s v%d  %s\n",
			e.GetCommittedAt().AsTime().UTC().Format(time.RFC3339Nano), e.GetPartition(), who,
			e.GetEntity(), e.GetOp(), e.GetKey(), e.GetVersion(), payload)
	}
	return nil
}
