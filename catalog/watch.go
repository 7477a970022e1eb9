package catalog

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/singleflight"

	"github.com/shardgate/shardgate/router"
)

// WatchApplicationName names the watcher's LISTEN connection in
// pg_stat_activity.
const WatchApplicationName = "shardgate-topology-watch"

// Watcher keeps a router.Router in step with the catalog. It listens for
// topology notifications and, as a fallback for lost ones, checks the
// version every Interval. Request paths never wait on it, except a request
// that was told "wrong shard" and calls Refresh.
type Watcher struct {
	Catalog *Catalog
	Router  *router.Router
	// DSN is the catalog DSN for the dedicated LISTEN connection.
	DSN string
	// Interval between version checks (default 5s).
	Interval time.Duration
	// OnLoad, if set, sees every newly loaded topology before the router
	// switches to it (the server opens pools for new shards here). An error
	// keeps the old table.
	OnLoad func(context.Context, Topology) error
	Logger *slog.Logger

	sf      singleflight.Group
	mu      sync.Mutex
	last    Topology
	changed chan struct{} // closed when a newer topology is installed
}

// Changed returns a channel that is closed when the router next switches
// to a newer topology: a request waiting for a partition mid-move wakes on
// the flip instead of at its next retry.
func (w *Watcher) Changed() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.changed == nil {
		w.changed = make(chan struct{})
	}
	return w.changed
}

// refreshTimeout bounds one shared topology reload.
const refreshTimeout = 10 * time.Second

// Refresh brings the router up to the catalog: it reads the topology version
// and loads the whole topology only when that is newer than the router's.
// Concurrent callers share one attempt, which runs on a context of its own so
// that one caller's short deadline cannot fail the others; each caller waits
// only as long as its own ctx allows.
func (w *Watcher) Refresh(ctx context.Context) error {
	ch := w.sf.DoChan("refresh", func() (any, error) {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), refreshTimeout)
		defer cancel()
		return nil, w.refresh(rctx)
	})
	select {
	case r := <-ch:
		return r.Err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (w *Watcher) refresh(ctx context.Context) error {
	v, err := w.Catalog.TopologyVersion(ctx)
	if err != nil {
		return err
	}
	if cur := w.Router.Table(); cur != nil && cur.Version() >= v {
		return nil
	}
	topo, err := w.Catalog.LoadTopology(ctx)
	if err != nil {
		return err
	}
	return w.install(ctx, topo)
}

// Topology returns the last topology the watcher installed.
func (w *Watcher) Topology() Topology {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last
}

func (w *Watcher) install(ctx context.Context, topo Topology) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if cur := w.Router.Table(); cur != nil && cur.Version() >= topo.Version {
		return nil
	}
	if w.OnLoad != nil {
		if err := w.OnLoad(ctx, topo); err != nil {
			return fmt.Errorf("apply topology %d: %w", topo.Version, err)
		}
	}
	if w.Router.Store(topo.Table) {
		w.last = topo
		if w.changed != nil {
			close(w.changed)
			w.changed = nil
		}
		w.logger().Info("topology installed", "version", topo.Version, "shards", len(topo.Shards))
	}
	return nil
}

// Run watches until ctx ends. It reconnects with backoff when the catalog is
// unreachable and re-checks the version after every reconnect, since
// notifications sent meanwhile are lost.
func (w *Watcher) Run(ctx context.Context) error {
	const firstBackoff = 100 * time.Millisecond
	backoff := firstBackoff
	for {
		connected, err := w.listen(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if connected {
			backoff = firstBackoff // a blip after a good run starts the backoff over
		}
		// Without a LISTEN connection, keep polling through the pool.
		if err := w.Refresh(ctx); err != nil && ctx.Err() == nil {
			w.logger().Warn("topology refresh failed", "err", err)
		}
		w.logger().Warn("topology watch interrupted; retrying", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// listen holds a LISTEN connection and refreshes on every notification and
// every Interval. It reports whether it got as far as listening.
func (w *Watcher) listen(ctx context.Context) (connected bool, err error) {
	interval := w.Interval
	if interval <= 0 {
		interval = 5 * time.Second
	}
	cfg, err := pgx.ParseConfig(w.DSN)
	if err != nil {
		return false, err
	}
	cfg.RuntimeParams["application_name"] = WatchApplicationName
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "LISTEN "+TopologyChannel); err != nil {
		return false, err
	}
	for {
		// After (re)connecting too: notifications sent meanwhile are lost.
		if err := w.Refresh(ctx); err != nil && ctx.Err() == nil {
			w.logger().Warn("topology refresh failed", "err", err)
		}
		wctx, cancel := context.WithTimeout(ctx, interval)
		_, err := conn.WaitForNotification(wctx)
		cancel()
		if ctx.Err() != nil {
			return true, ctx.Err()
		}
		if errors.Is(err, context.DeadlineExceeded) {
			// Quiet for a whole interval: make sure the connection is
			// still alive, or notifications would silently stop.
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = conn.Ping(pctx)
			cancel()
		}
		if err != nil {
			return true, err
		}
	}
}

func (w *Watcher) logger() *slog.Logger {
	if w.Logger == nil {
		return slog.Default()
	}
	return w.Logger
}
