package shards

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// defaultConnectTimeout bounds one connection attempt when neither
// PoolOptions nor the DSN sets a timeout.
const defaultConnectTimeout = 3 * time.Second

// PoolOptions tunes a shard's connection pool. The zero value is usable.
type PoolOptions struct {
	// MaxConns caps the pool's connections. 0 keeps the DSN's pool_max_conns
	// or, without it, the pgxpool default (the greater of 4 and the number of
	// CPUs).
	MaxConns int32
	// ConnectTimeout bounds one connection attempt. 0 keeps the DSN's
	// connect_timeout or, without it, 3s.
	ConnectTimeout time.Duration
	// MinIdleConns keeps this many connections open and idle (at most
	// MaxConns), so that a burst of calls (a partition arriving with a
	// move, say) does not wait for new connections. 0 keeps the DSN's
	// pool_min_idle_conns or none.
	MinIdleConns int32
	// MaxWriteBatch caps how many concurrent writes share one transaction
	// (group commit, see groupcommit.go). 0 means 32; 1 turns group commit
	// off, so every write is its own transaction.
	MaxWriteBatch int
	// WriteFlushers caps the connections flushing write batches at once.
	// 0 means half the pool (at least two), leaving the rest to reads.
	WriteFlushers int
	// MaxReadBatch caps how many concurrent point reads of one kind
	// (GetUser, GetItem) one statement answers (read batching, see
	// readbatch.go). 0 means 32; 1 turns read batching off.
	MaxReadBatch int
	// ReadFlushers caps the connections answering batched reads of one
	// kind at once; one runs while it keeps up (see readbatch.go). 0
	// means half the pool (at least two).
	ReadFlushers int
}

// Shard is one shard database: a name and a connection pool. It is safe for
// concurrent use. A zero Shard is closed: every call fails with an error for
// which IsUnavailable reports true.
type Shard struct {
	name  string
	pool  *pgxpool.Pool
	group *writeGroup // nil: group commit off
	// Read batching; all nil when it is off.
	users *readGroup[userKey, User]
	items *readGroup[itemKey, Item]
	reads *readStats

	importUpserts atomic.Int32 // bulk batches that upsert at once (bulk.go)
	importCopies  atomic.Int64 // bulk batches COPYed straight into their table (bulkcopy.go)
}

// Open prepares a pool for the shard database at dsn. It does not connect:
// connections are made on first use, so a shard that is down does not stop
// the caller from starting (its calls fail with IsUnavailable errors until it
// is back). Open fails only on a DSN it cannot parse; the error names the
// shard but never repeats the DSN, which may hold a password.
func Open(ctx context.Context, name, dsn string, opts PoolOptions) (*Shard, error) {
	if opts.MaxWriteBatch < 0 || opts.WriteFlushers < 0 || opts.MaxReadBatch < 0 || opts.ReadFlushers < 0 {
		return nil, fmt.Errorf("open shard %s: MaxWriteBatch %d, WriteFlushers %d, MaxReadBatch %d and ReadFlushers %d must not be negative",
			name, opts.MaxWriteBatch, opts.WriteFlushers, opts.MaxReadBatch, opts.ReadFlushers)
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, &dsnError{shard: name, err: err}
	}
	if opts.MaxConns > 0 {
		cfg.MaxConns = opts.MaxConns
	}
	if opts.MinIdleConns > 0 {
		cfg.MinIdleConns = min(opts.MinIdleConns, cfg.MaxConns)
	}
	switch {
	case opts.ConnectTimeout > 0:
		cfg.ConnConfig.ConnectTimeout = opts.ConnectTimeout
	case cfg.ConnConfig.ConnectTimeout == 0:
		cfg.ConnConfig.ConnectTimeout = defaultConnectTimeout
	}
	if _, ok := cfg.ConnConfig.RuntimeParams["application_name"]; !ok {
		cfg.ConnConfig.RuntimeParams["application_name"] = "shardgate"
	}
	// Every statement of this package is prepared once per connection and
	// keys on partition-led primary keys, which a generic plan serves as
	// well as a custom one; planning each execution afresh (PostgreSQL's
	// default for a prepared statement's first five runs and whenever a
	// custom plan looks cheaper) cost put-item 15-20% of its throughput.
	if _, ok := cfg.ConnConfig.RuntimeParams["plan_cache_mode"]; !ok {
		cfg.ConnConfig.RuntimeParams["plan_cache_mode"] = "force_generic_plan"
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open shard %s: %w", name, err)
	}
	sh := &Shard{name: name, pool: pool}
	// Zero options take the defaults (negative ones were refused above).
	if opts.MaxWriteBatch != 1 {
		sh.group = newWriteGroup(sh, cmp.Or(opts.MaxWriteBatch, defaultMaxWriteBatch),
			cmp.Or(opts.WriteFlushers, defaultWriteFlushers(cfg.MaxConns)))
	}
	if opts.MaxReadBatch != 1 {
		batch := cmp.Or(opts.MaxReadBatch, defaultMaxReadBatch)
		flushers := cmp.Or(opts.ReadFlushers, defaultReadFlushers(cfg.MaxConns))
		sh.reads = &readStats{}
		sh.users = newReadGroup(sh, "get user", batch, flushers, sh.getUser, sh.getUsers)
		sh.items = newReadGroup(sh, "get item", batch, flushers, sh.getItem, sh.getItems)
	}
	return sh, nil
}

// dsnError reports an unparsable DSN. Its message leaves out the parser's
// text, which quotes the DSN; Unwrap still gives it to a caller that asks.
type dsnError struct {
	shard string
	err   error
}

func (e *dsnError) Error() string {
	return fmt.Sprintf("open shard %s: invalid DSN (parser details withheld: they may quote a password)", e.shard)
}

func (e *dsnError) Unwrap() error { return e.err }

// Name returns the shard's name as given to Open.
func (s *Shard) Name() string {
	if s == nil {
		return ""
	}
	return s.name
}

// Stat reports the pool's connection statistics (for metrics); nil for a
// zero Shard.
func (s *Shard) Stat() *pgxpool.Stat {
	if s == nil || s.pool == nil {
		return nil
	}
	return s.pool.Stat()
}

// Close closes the pool, waiting for acquired connections to be released.
// Calls after Close fail with IsUnavailable errors. Close is idempotent.
func (s *Shard) Close() {
	if s != nil && s.pool != nil {
		s.pool.Close()
	}
}

// Ping checks that the shard answers a query.
func (s *Shard) Ping(ctx context.Context) error {
	c, err := s.acquire(ctx)
	if err != nil {
		return s.wrap("ping", err)
	}
	defer c.Release()
	if err := c.Ping(ctx); err != nil {
		return s.wrap("ping", err)
	}
	return nil
}

var errNotOpen = errors.New("shard is not open")

// acquire takes a connection from the pool. Its errors mean the shard could
// not be reached (or not in time), so they are marked unavailable; a caller
// that gave up (context.Canceled) is left as it is.
func (s *Shard) acquire(ctx context.Context) (*pgxpool.Conn, error) {
	if s == nil || s.pool == nil {
		return nil, &unavailableError{err: errNotOpen}
	}
	c, err := s.pool.Acquire(ctx)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return nil, err
		}
		return nil, &unavailableError{err: err}
	}
	return c, nil
}

// wrap prefixes err with the shard's name and the operation.
func (s *Shard) wrap(op string, err error) error {
	return fmt.Errorf("shard %s: %s: %w", s.Name(), op, err)
}
