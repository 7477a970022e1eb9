package server

import (
	"context"
	"sync"
	"time"

	"github.com/shardgate/shardgate/events"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// eventLog is Watch's events.Backlog: the outbox rows the shards and the
// catalog retain, read on the partition's owner like every read.
type eventLog struct{ s *Server }

func (l eventLog) Events(ctx context.Context, stream int32, after int64, limit int) ([]events.Event, int64, error) {
	if stream == events.ConfigStream {
		rows, delivered, err := l.s.catalog.ReadConfigEvents(ctx, after, limit, events.DefaultMaxPayloadBytes)
		if err != nil {
			return nil, 0, err
		}
		out := make([]events.Event, len(rows))
		for i := range rows {
			out[i] = events.ConfigEvent(&rows[i])
		}
		return out, delivered, nil
	}
	var (
		rows      []shards.OutboxRow
		delivered int64
	)
	err := l.s.onPartition(ctx, stream, func(sh *shards.Shard) (err error) {
		rows, delivered, err = sh.ReadEvents(ctx, stream, after, limit, events.DefaultMaxPayloadBytes)
		return err
	})
	if err != nil {
		return nil, 0, err
	}
	out := make([]events.Event, len(rows))
	for i := range rows {
		out[i] = events.ShardEvent(&rows[i])
	}
	return out, delivered, nil
}

// partitionOf is userID's partition under the current table (-1 before
// the first load).
func (s *Server) partitionOf(userID string) int32 {
	n := s.partitionCount()
	if n == 0 {
		return -1
	}
	return router.Partition(userID, n)
}

// droppedEntry counts a stream entry Watch dropped and says so at WARN, at
// most every droppedLogEvery: whoever writes such entries could otherwise
// flood the log.
func (s *Server) droppedEntry(stream int32, id string, err error) {
	s.droppedEntries.Add(1)
	if n, ok := s.droppedLog.allow(time.Now()); ok {
		s.opts.Logger.Warn("watch dropped stream entries that are not events of their stream (something else writes to the event streams in Redis)",
			"stream", stream, "entry", id, "err", err, "dropped_since_last_log", n)
	}
}

// droppedLogEvery is the least time between two WARNs about dropped stream
// entries.
const droppedLogEvery = 10 * time.Second

// logLimiter lets a log line through at most every droppedLogEvery,
// counting the ones it held back.
type logLimiter struct {
	mu      sync.Mutex
	last    time.Time
	skipped int64
}

// allow reports whether to log now and how many were held back since the
// last one that was (this one included).
func (l *logLimiter) allow(now time.Time) (int64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.skipped++
	if !l.last.IsZero() && now.Sub(l.last) < droppedLogEvery {
		return 0, false
	}
	n := l.skipped
	l.last, l.skipped = now, 0
	return n, true
}

// relayManager is the server's relay manager, nil without relays.
func (s *Server) relayManager() *events.Manager {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.relays
}
