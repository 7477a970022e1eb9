package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/testenv"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/router"
)

// testCluster is a catalog and shards in throwaway databases.
type testCluster struct {
	catalogDSN string
	shardDSN   map[string]string // shard name → DSN
	names      []string
}

func newTestCluster(t testing.TB, shards int) *testCluster {
	t.Helper()
	c := &testCluster{catalogDSN: testenv.NewDatabase(t), shardDSN: map[string]string{}}
	var specs []catalog.ShardSpec
	for i := range shards {
		name := fmt.Sprintf("shard-%d", i)
		dsn := testenv.NewDatabase(t)
		c.shardDSN[name] = dsn
		c.names = append(c.names, name)
		specs = append(specs, catalog.ShardSpec{Name: name, DSN: dsn})
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := catalog.CreateCluster(ctx, c.catalogDSN, router.RingConfig{}, specs); err != nil {
		t.Fatal(err)
	}
	return c
}

// exec runs SQL on a database of the cluster ("catalog" or a shard name).
func (c *testCluster) exec(t testing.TB, db, sql string, args ...any) {
	t.Helper()
	conn := c.connect(t, db)
	defer conn.Close(context.Background())
	if _, err := conn.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %s: %v", db, sql, err)
	}
}

func (c *testCluster) count(t testing.TB, db, sql string, args ...any) int {
	t.Helper()
	conn := c.connect(t, db)
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %s: %v", db, sql, err)
	}
	return n
}

func (c *testCluster) connect(t testing.TB, db string) *pgx.Conn {
	t.Helper()
	dsn := c.catalogDSN
	if db != "catalog" {
		dsn = c.shardDSN[db]
	}
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// testServer is one Shardgate instance serving a testCluster on loopback.
type testServer struct {
	srv   *Server
	conn  *grpc.ClientConn
	data  pb.DataServiceClient
	admin pb.AdminServiceClient
	stop  context.CancelFunc
	done  chan error
	addr  string
}

type serverOption func(*Options)

// testCacheMACKey is the cache MAC key of every test server, as the
// instances of one cluster share theirs.
var testCacheMACKey = []byte("shardgate test cache MAC key, 32+")

// withCache gives the server a cache of its own (its own rueidis client)
// on the Redis at addr under prefix; servers given the same prefix share
// cached keys, as routers sharing one Redis do.
func withCache(t testing.TB, addr, prefix string, o cache.Options) serverOption {
	return func(opts *Options) {
		o.Prefix = prefix
		if o.MACKey == nil {
			o.MACKey = testCacheMACKey
		}
		if o.Logger == nil {
			o.Logger = opts.Logger
		}
		c, err := cache.Dial(addr, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close) // registered before start's cleanup, so runs after it
		opts.Cache = c
	}
}

// start serves the cluster. The topology watcher runs only if watch is set,
// so a test can hold a router on a stale map.
func (c *testCluster) start(t testing.TB, watch bool, opts ...serverOption) *testServer {
	t.Helper()
	return c.startWith(t, watch, GRPCOptions{}, nil, opts...)
}

// startWith is start with gRPC server options and client dial options
// (plaintext when dial is nil).
func (c *testCluster) startWith(t testing.TB, watch bool, gopts GRPCOptions, dial []grpc.DialOption, opts ...serverOption) *testServer {
	t.Helper()
	o := Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), TopologyInterval: 200 * time.Millisecond}
	for _, f := range opts {
		f(&o)
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := New(ctx, c.catalogDSN, o)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if watch {
		go srv.WatchTopology(ctx)
	}
	g, hs := NewGRPCServer(srv, gopts)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{srv: srv, stop: cancel, done: make(chan error, 1)}
	go func() { ts.done <- Serve(ctx, g, hs, lis, 5*time.Second, 0) }()
	ts.addr = lis.Addr().String()
	if dial == nil {
		dial = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	ts.conn, err = grpc.NewClient(ts.addr, dial...)
	if err != nil {
		t.Fatal(err)
	}
	ts.data = pb.NewDataServiceClient(ts.conn)
	ts.admin = pb.NewAdminServiceClient(ts.conn)
	t.Cleanup(func() {
		ts.conn.Close()
		cancel()
		<-ts.done
		srv.Close()
	})
	return ts
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t testing.TB, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("got %v (%v), want %v", got, err, want)
	}
}

func sortedNames(m map[string]int) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	sort.Strings(s)
	return s
}
