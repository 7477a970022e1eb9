package events

import (
	"context"
	"log/slog"
	"sync"
)

// Manager runs a relay per shard and one for the catalog, and follows the
// topology: Sync starts relays for new shards, restarts those whose DSN
// changed and stops those of shards that left.
type Manager struct {
	opts   RelayOptions
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	relays map[string]running // shard name → relay; "" is the catalog's
}

type running struct {
	dsn   string
	relay *Relay
	stop  context.CancelFunc
}

// NewManager returns a manager whose relays use opts. Nothing is relayed
// until Sync or StartConfig; the manager listens for wake-ups (see Waker)
// at once.
func NewManager(opts RelayOptions) *Manager {
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{opts: opts, ctx: ctx, cancel: cancel, relays: map[string]running{}}
	if opts.Redis != nil {
		log := opts.Logger
		if log == nil {
			log = slog.Default()
		}
		m.wg.Go(func() {
			listenWakes(ctx, opts.Redis, opts.Prefix, func(name string, streams []int32) { m.WakeLocalStreams(name, streams) }, log)
		})
	}
	return m
}

// WakeLocal wakes this manager's relay of database name (a shard's name
// or ConfigWake) if it leads, and reports whether it did.
func (m *Manager) WakeLocal(name string) bool { return m.WakeLocalStreams(name, nil) }

// WakeLocalStreams is WakeLocal for new rows in the streams (partitions)
// named only; nil: any (see Relay.WakeStreams).
func (m *Manager) WakeLocalStreams(name string, streams []int32) bool {
	if name == ConfigWake {
		name = ""
	} else if name == "" {
		return false
	}
	m.mu.Lock()
	r, ok := m.relays[name]
	m.mu.Unlock()
	return ok && r.relay.WakeStreams(streams)
}

// StartConfig runs the relay of the catalog's config outbox.
func (m *Manager) StartConfig(catalogDSN string) {
	m.start("", catalogDSN, NewConfigRelay(catalogDSN, m.opts))
}

// Sync makes the running shard relays match shards (name → DSN). It does
// not block.
func (m *Manager) Sync(shards map[string]string) {
	m.mu.Lock()
	for name, r := range m.relays {
		if name == "" {
			continue
		}
		if dsn, ok := shards[name]; !ok || dsn != r.dsn {
			r.stop()
			delete(m.relays, name)
		}
	}
	m.mu.Unlock()
	for name, dsn := range shards {
		m.start(name, dsn, NewShardRelay(name, dsn, m.opts))
	}
}

func (m *Manager) start(name, dsn string, r *Relay) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.relays[name]; ok || m.ctx.Err() != nil {
		return
	}
	ctx, stop := context.WithCancel(m.ctx)
	m.relays[name] = running{dsn: dsn, relay: r, stop: stop}
	m.wg.Go(func() { r.Run(ctx) })
}

// sum adds f over the manager's relays.
func (m *Manager) sum(f func(*Relay) int64) int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var n int64
	for _, r := range m.relays {
		n += f(r.relay)
	}
	return n
}

// Reads counts the outbox reads of this manager's relays.
func (m *Manager) Reads() int64 {
	return m.sum((*Relay).Reads)
}

// RelayStat is one relay of a Manager as metrics see it.
type RelayStat struct {
	Name      string // the shard's, or "" for the catalog's config relay
	Leading   bool   // it holds its database's lock
	Published int64  // events it delivered
}

// Stats describes the manager's relays, in no particular order.
func (m *Manager) Stats() []RelayStat {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]RelayStat, 0, len(m.relays))
	for name, r := range m.relays {
		out = append(out, RelayStat{Name: name, Leading: r.relay.Leading(), Published: r.relay.Published()})
	}
	return out
}

// Republished counts the events this manager's relays published again
// into streams Redis had lost.
func (m *Manager) Republished() int64 {
	return m.sum((*Relay).Republished)
}

// Pruned counts the delivered events this manager's relays pruned.
func (m *Manager) Pruned() int64 {
	return m.sum((*Relay).Pruned)
}

// QuarantinedStreams returns how many streams (partitions, and the config
// stream) the relays of this manager hold back because they clash with
// their outbox clock (see Relay.Quarantined).
func (m *Manager) QuarantinedStreams() int {
	return int(m.sum(func(r *Relay) int64 { return int64(len(r.Quarantined())) }))
}

// Close stops every relay and waits for them to end; their locks go with
// their connections.
func (m *Manager) Close() {
	m.cancel()
	m.wg.Wait()
}
