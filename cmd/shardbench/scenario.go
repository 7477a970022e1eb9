package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// Names of what a run creates; runID keeps concurrent runs apart.
const (
	configNamespace = "shardbench"
	itemCollection  = "shardbench"
	configKeys      = 64
	// noCacheHeader asks the server to read past its cache.
	noCacheHeader = "shardgate-cache"
)

// scenario is a named workload: setup creates its data and returns the call
// the callers repeat.
type scenario struct {
	name, help string
	setup      func(ctx context.Context, e *env) (op, error)
}

var scenarios = []scenario{
	{"noop", "gRPC health check: the transport's ceiling on this machine", setupNoop},
	{"get-session", "GetSession of random sessions (served from the cache)", setupGetSession(false)},
	{"get-session-nocache", "GetSession past the cache (" + noCacheHeader + ": no-cache): a shard query each", setupGetSession(true)},
	{"get-config", "GetConfig of random keys (served from the cache)", setupGetConfig},
	{"get-user", "GetUser of random users: a shard query each", setupGetUser},
	{"put-item", "PutItem to random users: a shard write each", setupPutItem},
	{"put-user", "PutUser of random users' profiles: a shard write each", setupPutUser},
	{"create-session", "CreateSession for random users: a shard write each (the sessions live an hour, or until the run's users are deleted)", setupCreateSession},
	{"mixed", "60% get-session, 20% get-config, 10% get-user, 10% put-item", setupMixed},
	{"pg-insert", "baseline of put-item: a one-row INSERT into a scratch table shaped like items, straight to the -pg database", setupPGInsert},
	{"pg-get", "baseline of get-user: a primary-key read of that table, straight from the -pg database", setupPGGet},
}

func scenarioNames() []string {
	names := make([]string, len(scenarios))
	for i, s := range scenarios {
		names[i] = s.name
	}
	return names
}

func findScenario(name string) *scenario {
	for i := range scenarios {
		if scenarios[i].name == name {
			return &scenarios[i]
		}
	}
	return nil
}

// env is what scenarios share: clients, the run's data and its cleanup list.
type env struct {
	cfg    config
	runID  string
	log    io.Writer // progress
	conns  []*grpc.ClientConn
	data   []pb.DataServiceClient
	health []healthpb.HealthClient

	// The -pg baselines: pg is nil until one runs.
	pg      *pgxpool.Pool
	pgTable string // created by this run when set
	pgRows  bool
	pgNext  atomic.Int64 // last pg-insert key number

	users      []string
	sessions   []string
	configKeys []string
	madeUsers  bool
	madeConfig bool
}

func newEnv(c config, conns []*grpc.ClientConn, log io.Writer) *env {
	b := make([]byte, 4)
	rand.Read(b)
	e := &env{cfg: c, runID: hex.EncodeToString(b), log: log, conns: conns}
	for _, conn := range conns {
		e.data = append(e.data, pb.NewDataServiceClient(conn))
		e.health = append(e.health, healthpb.NewHealthClient(conn))
	}
	return e
}

// callCtx adds the run's outgoing metadata to ctx.
func (e *env) callCtx(ctx context.Context) context.Context {
	if e.cfg.Token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+e.cfg.Token)
	}
	return ctx
}

func (e *env) dataClient(c *caller) pb.DataServiceClient { return e.data[c.id%len(e.data)] }

func (e *env) userID(i int) string { return fmt.Sprintf("shardbench-%s-%d", e.runID, i) }

// parallel runs fn(i) for i in [0,n) on the run's concurrency and returns the
// first error.
func (e *env) parallel(ctx context.Context, n int, fn func(ctx context.Context, client pb.DataServiceClient, i int) error) error {
	ctx, cancel := context.WithCancelCause(e.callCtx(ctx))
	defer cancel(nil)
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := range min(e.cfg.Concurrency, n) {
		wg.Go(func() {
			client := e.data[w%len(e.data)]
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				cctx, ccancel := context.WithTimeout(ctx, e.cfg.Timeout)
				err := fn(cctx, client, i)
				ccancel()
				if err != nil {
					cancel(err)
				}
			}
		})
	}
	wg.Wait()
	return context.Cause(ctx)
}

// ensureUsers creates the run's users, each with one item.
func (e *env) ensureUsers(ctx context.Context) error {
	if e.users != nil {
		return nil
	}
	e.madeUsers = true
	e.users = make([]string, e.cfg.Users)
	return e.parallel(ctx, e.cfg.Users, func(ctx context.Context, client pb.DataServiceClient, i int) error {
		id := e.userID(i)
		if _, err := client.PutUser(ctx, &pb.PutUserRequest{UserId: id, ProfileJson: fmt.Sprintf(`{"name":"bench user %d","plan":"free"}`, i)}); err != nil {
			return fmt.Errorf("create user %s: %w", id, err)
		}
		if _, err := client.PutItem(ctx, &pb.PutItemRequest{UserId: id, Collection: itemCollection, Key: "k0", ValueJson: `{"n":0}`}); err != nil {
			return fmt.Errorf("create item of %s: %w", id, err)
		}
		e.users[i] = id
		return nil
	})
}

// ensureSessions creates one session per user.
func (e *env) ensureSessions(ctx context.Context) error {
	if err := e.ensureUsers(ctx); err != nil || e.sessions != nil {
		return err
	}
	e.sessions = make([]string, len(e.users))
	return e.parallel(ctx, len(e.users), func(ctx context.Context, client pb.DataServiceClient, i int) error {
		resp, err := client.CreateSession(ctx, &pb.CreateSessionRequest{UserId: e.users[i], DataJson: `{"device":"bench","scopes":["read","write"]}`, TtlSeconds: 3600})
		if err != nil {
			return fmt.Errorf("create session of %s: %w", e.users[i], err)
		}
		e.sessions[i] = resp.GetToken()
		return nil
	})
}

// ensureConfig creates the run's config keys.
func (e *env) ensureConfig(ctx context.Context) error {
	if e.configKeys != nil {
		return nil
	}
	e.madeConfig = true
	e.configKeys = make([]string, configKeys)
	return e.parallel(ctx, configKeys, func(ctx context.Context, client pb.DataServiceClient, i int) error {
		key := fmt.Sprintf("%s-flag-%d", e.runID, i)
		if _, err := client.SetConfig(ctx, &pb.SetConfigRequest{Namespace: configNamespace, Key: key, ValueJson: fmt.Sprintf(`{"enabled":true,"rollout":%d}`, i)}); err != nil {
			return fmt.Errorf("set config %s/%s: %w", configNamespace, key, err)
		}
		e.configKeys[i] = key
		return nil
	})
}

// cleanup deletes what the run created and drops its scratch table.
// Deleting a user deletes its sessions and items.
func (e *env) cleanup(ctx context.Context) error {
	var errs []error
	if e.madeUsers {
		errs = append(errs, e.parallel(ctx, len(e.users), func(ctx context.Context, client pb.DataServiceClient, i int) error {
			if e.users[i] == "" {
				return nil
			}
			_, err := client.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: e.users[i]})
			return err
		}))
	}
	if e.madeConfig {
		errs = append(errs, e.parallel(ctx, len(e.configKeys), func(ctx context.Context, client pb.DataServiceClient, i int) error {
			if e.configKeys[i] == "" {
				return nil
			}
			_, err := client.DeleteConfig(ctx, &pb.DeleteConfigRequest{Namespace: configNamespace, Key: e.configKeys[i]})
			return err
		}))
	}
	errs = append(errs, e.cleanupPG(ctx))
	return errors.Join(errs...)
}

// close releases the connections env opened itself.
func (e *env) close() {
	if e.pg != nil {
		e.pg.Close()
	}
}

func setupNoop(ctx context.Context, e *env) (op, error) {
	// The first check also proves the server is reachable before measuring.
	cctx, cancel := context.WithTimeout(e.callCtx(ctx), e.cfg.Timeout)
	defer cancel()
	if _, err := e.health[0].Check(cctx, &healthpb.HealthCheckRequest{}); err != nil {
		return nil, fmt.Errorf("health check: %w", err)
	}
	return func(ctx context.Context, c *caller) error {
		_, err := e.health[c.id%len(e.health)].Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	}, nil
}

func getSessionOp(e *env) op {
	return func(ctx context.Context, c *caller) error {
		_, err := e.dataClient(c).GetSession(ctx, &pb.GetSessionRequest{Token: e.sessions[c.rng.IntN(len(e.sessions))]})
		return err
	}
}

func setupGetSession(nocache bool) func(context.Context, *env) (op, error) {
	return func(ctx context.Context, e *env) (op, error) {
		if err := e.ensureSessions(ctx); err != nil {
			return nil, err
		}
		get := getSessionOp(e)
		if !nocache {
			return get, nil
		}
		return func(ctx context.Context, c *caller) error {
			return get(metadata.AppendToOutgoingContext(ctx, noCacheHeader, "no-cache"), c)
		}, nil
	}
}

func getConfigOp(e *env) op {
	return func(ctx context.Context, c *caller) error {
		_, err := e.dataClient(c).GetConfig(ctx, &pb.GetConfigRequest{Namespace: configNamespace, Key: e.configKeys[c.rng.IntN(len(e.configKeys))]})
		return err
	}
}

func setupGetConfig(ctx context.Context, e *env) (op, error) {
	if err := e.ensureConfig(ctx); err != nil {
		return nil, err
	}
	return getConfigOp(e), nil
}

func getUserOp(e *env) op {
	return func(ctx context.Context, c *caller) error {
		_, err := e.dataClient(c).GetUser(ctx, &pb.GetUserRequest{UserId: e.users[c.rng.IntN(len(e.users))]})
		return err
	}
}

func setupGetUser(ctx context.Context, e *env) (op, error) {
	if err := e.ensureUsers(ctx); err != nil {
		return nil, err
	}
	return getUserOp(e), nil
}

func putItemOp(e *env) op {
	return func(ctx context.Context, c *caller) error {
		n := c.rng.IntN(1 << 20)
		_, err := e.dataClient(c).PutItem(ctx, &pb.PutItemRequest{
			UserId:     e.users[c.rng.IntN(len(e.users))],
			Collection: itemCollection,
			Key:        fmt.Sprintf("k%d", n%16),
			ValueJson:  fmt.Sprintf(`{"n":%d}`, n),
		})
		return err
	}
}

func setupPutItem(ctx context.Context, e *env) (op, error) {
	if err := e.ensureUsers(ctx); err != nil {
		return nil, err
	}
	return putItemOp(e), nil
}

func setupPutUser(ctx context.Context, e *env) (op, error) {
	if err := e.ensureUsers(ctx); err != nil {
		return nil, err
	}
	return func(ctx context.Context, c *caller) error {
		_, err := e.dataClient(c).PutUser(ctx, &pb.PutUserRequest{
			UserId:      e.users[c.rng.IntN(len(e.users))],
			ProfileJson: fmt.Sprintf(`{"n":%d}`, c.rng.IntN(1<<20)),
		})
		return err
	}, nil
}

func setupCreateSession(ctx context.Context, e *env) (op, error) {
	if err := e.ensureUsers(ctx); err != nil {
		return nil, err
	}
	return func(ctx context.Context, c *caller) error {
		_, err := e.dataClient(c).CreateSession(ctx, &pb.CreateSessionRequest{
			UserId:     e.users[c.rng.IntN(len(e.users))],
			DataJson:   `{"ip":"10.0.0.7"}`,
			TtlSeconds: 3600,
		})
		return err
	}, nil
}

func setupMixed(ctx context.Context, e *env) (op, error) {
	if err := e.ensureSessions(ctx); err != nil {
		return nil, err
	}
	if err := e.ensureConfig(ctx); err != nil {
		return nil, err
	}
	session, config, user, put := getSessionOp(e), getConfigOp(e), getUserOp(e), putItemOp(e)
	return func(ctx context.Context, c *caller) error {
		switch n := c.rng.IntN(100); {
		case n < 60:
			return session(ctx, c)
		case n < 80:
			return config(ctx, c)
		case n < 90:
			return user(ctx, c)
		default:
			return put(ctx, c)
		}
	}, nil
}
