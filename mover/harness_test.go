package mover_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/server"
)

// harness is a cluster whose shards each run in a PostgreSQL server of
// their own (so a test can stop one), with Shardgate instances serving it:
// relays, Watch and the rebalancing executor on, as in production.
type harness struct {
	t          testing.TB
	catalogDSN string
	pg         map[string]*testenv.PGCluster // shard name → its server
	dsn        map[string]string             // shard name → DSN
	names      []string                      // registered shards, in order of creation
	removed    map[string]bool               // shards removed from the cluster
	redisAddr  string
	prefix     string
	instances  []*instance
	servers    []*testenv.PGCluster // shared servers to put shards on (harnessOptions.Servers)
}

// instance is one Shardgate server process, in-process.
type instance struct {
	srv   *server.Server
	cache *cache.Cache // nil without harnessOptions.Cache
	conn  *grpc.ClientConn
	data  pb.DataServiceClient
	admin pb.AdminServiceClient
	stop  func()
}

// harnessOptions shape a harness. Zero values mean defaults.
type harnessOptions struct {
	Shards    int // initial shards (default 4)
	Instances int // Shardgate instances (default 1)
	Mover     mover.ExecutorOptions
	// NoMover starts instances without the rebalancing executor.
	NoMover bool
	// Servers, if set, host the shards' databases in order of creation
	// (shard-0 on the first); a shard beyond them gets a server of its
	// own. Starting a server takes seconds: tests that build many small
	// clusters share a few servers between their runs this way.
	Servers []*testenv.PGCluster
	// Log, when set, shows the instances' logs in the test output.
	Log bool
	// StaleMap leaves the instances' topology watchers off: a map is
	// reloaded only when a shard answers "wrong shard".
	StaleMap bool
	// Cache gives each instance a cache of its own (its own client) on the
	// harness's Redis, under the harness's prefix: instances share cached
	// keys, as routers sharing one Redis do.
	Cache bool
}

func newHarness(t testing.TB, o harnessOptions) *harness {
	t.Helper()
	if o.Shards == 0 {
		o.Shards = 4
	}
	if o.Instances == 0 {
		o.Instances = 1
	}
	h := &harness{t: t, catalogDSN: testenv.NewDatabase(t), pg: map[string]*testenv.PGCluster{}, dsn: map[string]string{}, servers: o.Servers}
	h.redisAddr, h.prefix = testenv.Redis(t)
	var specs []catalog.ShardSpec
	for i := range o.Shards {
		name := fmt.Sprintf("shard-%d", i)
		specs = append(specs, catalog.ShardSpec{Name: name, DSN: h.newShardDB(name)})
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := catalog.CreateCluster(ctx, h.catalogDSN, router.RingConfig{}, specs); err != nil {
		t.Fatal(err)
	}
	for range o.Instances {
		h.startInstance(o)
	}
	return h
}

// newShardDB starts a PostgreSQL server for a shard and creates its
// database; the shard is not registered yet.
func (h *harness) newShardDB(name string) string {
	h.t.Helper()
	if i := len(h.names); i < len(h.servers) {
		pg, db := h.servers[i], "shard_"+testenv.RandomHex(4)
		h.pg[name] = pg
		h.dsn[name] = pg.CreateDatabase(db)
		h.t.Cleanup(func() { dropDatabase(h.t, pg, db) })
	} else {
		pg := testenv.NewPGCluster(h.t)
		h.pg[name] = pg
		h.dsn[name] = pg.CreateDatabase("shard")
	}
	h.names = append(h.names, name)
	return h.dsn[name]
}

// dropDatabase drops a database of a shared server, with its connections.
func dropDatabase(t testing.TB, pg *testenv.PGCluster, db string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pg.DSN("postgres"))
	if err == nil {
		_, err = conn.Exec(ctx, "DROP DATABASE "+pgx.Identifier{db}.Sanitize()+" WITH (FORCE)")
		conn.Close(ctx)
	}
	if err != nil {
		t.Logf("drop database %s: %v", db, err)
	}
}

// startInstance serves the cluster from a new instance.
func (h *harness) startInstance(o harnessOptions) *instance {
	h.t.Helper()
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	if o.Log || os.Getenv("SHARDGATE_TEST_LOG") != "" {
		logger = slog.New(slog.NewTextHandler(testWriter{h.t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	rc, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{h.redisAddr}, DisableCache: true})
	if err != nil {
		h.t.Fatal(err)
	}
	mo := o.Mover
	if mo.Interval == 0 {
		mo.Interval = 200 * time.Millisecond
	}
	if mo.ReapInterval == 0 {
		mo.ReapInterval = 2 * time.Second
	}
	mo.Holder = fmt.Sprintf("instance-%d", len(h.instances))
	var c *cache.Cache
	if o.Cache {
		if c, err = cache.Dial(h.redisAddr, cache.Options{Prefix: h.prefix, MACKey: []byte("mover test cache MAC key, 32 bytes+"), Logger: logger}); err != nil {
			h.t.Fatal(err)
		}
		h.t.Cleanup(c.Close) // registered before the instance's stop, so runs after it
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := server.New(ctx, h.catalogDSN, server.Options{
		Logger: logger.With("instance", len(h.instances)), TopologyInterval: 200 * time.Millisecond,
		Redis: rc, EventsPrefix: h.prefix, RunRelays: true, WatchHeartbeat: 200 * time.Millisecond,
		SweepInterval: -1, RunMover: !o.NoMover, Mover: mo, Cache: c,
	})
	if err != nil {
		cancel()
		h.t.Fatal(err)
	}
	if !o.StaleMap {
		go srv.WatchTopology(ctx)
	}
	g, hs := server.NewGRPCServer(srv, server.GRPCOptions{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		h.t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- server.Serve(ctx, g, hs, lis, time.Second, 0) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		h.t.Fatal(err)
	}
	in := &instance{srv: srv, cache: c, conn: conn, data: pb.NewDataServiceClient(conn), admin: pb.NewAdminServiceClient(conn)}
	var once sync.Once
	in.stop = func() {
		once.Do(func() {
			conn.Close()
			cancel()
			<-done
			srv.Close()
			rc.Close()
		})
	}
	h.t.Cleanup(in.stop)
	h.instances = append(h.instances, in)
	return in
}

// testWriter sends log lines to t.Log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// addShard creates a shard database on a server of its own and registers
// it through the admin API.
func (h *harness) addShard(name string, weight int32) {
	h.t.Helper()
	dsn := h.newShardDB(name)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := h.instances[0].admin.AddShard(ctx, &pb.AddShardRequest{Name: name, Dsn: dsn, Weight: weight}); err != nil {
		h.t.Fatal(err)
	}
}

// connect opens a connection to a shard's database.
func (h *harness) connect(ctx context.Context, name string) *pgx.Conn {
	h.t.Helper()
	conn, err := pgx.Connect(ctx, h.dsn[name])
	if err != nil {
		h.t.Fatalf("connect to %s: %v", name, err)
	}
	return conn
}

// query runs a one-value query on a shard.
func (h *harness) query(name, sql string, args ...any) int64 {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn := h.connect(ctx, name)
	defer conn.Close(ctx)
	var n int64
	if err := conn.QueryRow(ctx, sql, args...).Scan(&n); err != nil {
		h.t.Fatalf("%s: %s: %v", name, sql, err)
	}
	return n
}

// waitRebalance polls until the latest rebalance ends and returns it.
func (h *harness) waitRebalance(within time.Duration) *pb.Rebalance {
	h.t.Helper()
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := h.instances[0].admin.GetRebalance(ctx, &pb.GetRebalanceRequest{})
		cancel()
		if err != nil {
			h.t.Fatal(err)
		}
		r := resp.GetRebalance()
		if r.GetState() != pb.RebalanceState_REBALANCE_STATE_RUNNING {
			return r
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("rebalance still running after %s:\n%s", within, movesText(r))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// movesText is one line per move.
func movesText(r *pb.Rebalance) string {
	var b strings.Builder
	for _, m := range r.GetMoves() {
		fmt.Fprintf(&b, "move %d %s→%s (%d partitions): %s, %d/%d rows, pause %.1f ms, %d attempts, last error %q\n",
			m.GetId(), m.GetSource(), m.GetTarget(), len(m.GetPartitions()), m.GetState(), m.GetRowsCopied(), m.GetRowsTotal(),
			m.GetLastFreezeMs(), m.GetAttempts(), m.GetLastError())
	}
	return b.String()
}

// rebalance starts a rebalance and waits for it to end done.
func (h *harness) rebalance(req *pb.StartRebalanceRequest, within time.Duration) *pb.Rebalance {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := h.instances[0].admin.StartRebalance(ctx, req); err != nil {
		h.t.Fatal(err)
	}
	r := h.waitRebalance(within)
	if r.GetState() != pb.RebalanceState_REBALANCE_STATE_DONE {
		h.t.Fatalf("rebalance ended %s:\n%s", r.GetState(), movesText(r))
	}
	return r
}

// checkPlacement fails unless the catalog's map is the placement of the
// active shards and every shard's ownership table says exactly that.
func (h *harness) checkPlacement(shards []router.ShardWeight) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cat, err := catalog.Open(ctx, h.catalogDSN)
	if err != nil {
		h.t.Fatal(err)
	}
	defer cat.Close()
	topo, err := cat.LoadTopology(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	want, err := router.Place(shards, router.RingConfig{})
	if err != nil {
		h.t.Fatal(err)
	}
	if !slices.Equal(topo.Table.Owners(), want) {
		h.t.Fatal("the partition map is not the placement of the active shards")
	}
	for _, s := range shards {
		owned := h.query(s.Name, `SELECT count(*) FROM ownership WHERE state = 'owned'`)
		other := h.query(s.Name, `SELECT count(*) FROM ownership WHERE state <> 'owned'`)
		if owned != int64(topo.Table.Counts()[s.Name]) || other != 0 {
			h.t.Fatalf("%s lists %d owned and %d other partitions; the map gives it %d", s.Name, owned, other, topo.Table.Counts()[s.Name])
		}
	}
}

// checkNoReplication fails if any shard's server keeps a publication,
// subscription or replication slot.
func (h *harness) checkNoReplication() {
	h.t.Helper()
	for _, name := range h.names {
		n := h.query(name, `SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_subscription)
			+ (SELECT count(*) FROM pg_replication_slots)`)
		if n != 0 {
			h.t.Fatalf("%s's server keeps %d publications, subscriptions or slots", name, n)
		}
	}
}
