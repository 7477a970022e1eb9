package server

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/metadata"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/events"
	"github.com/shardgate/shardgate/internal/versioning"
	"github.com/shardgate/shardgate/shards"
)

// CacheMetadataKey is the request metadata that steers the cache: the
// value "no-cache" makes a read go to the database and leave the cache as
// it was.
const CacheMetadataKey = "shardgate-cache"

// readCache returns the cache a read may use: none without one, or when
// the request asked for no-cache.
func (s *Server) readCache(ctx context.Context) *cache.Cache {
	c := s.opts.Cache
	if c == nil {
		return nil
	}
	for _, v := range metadata.ValueFromIncomingContext(ctx, CacheMetadataKey) {
		if strings.EqualFold(strings.TrimSpace(v), "no-cache") {
			return nil
		}
	}
	return c
}

// Cache returns the server's cache, nil if it has none.
func (s *Server) Cache() *cache.Cache { return s.opts.Cache }

// invalidateEvents is the relays' hook: after a batch of events is in
// Redis it drops the cache keys they touched. This second invalidation heals
// one a write lost (Redis unreachable at the time, or the process died before
// it ran), so such a key is stale at most until its event is relayed. A
// failure the cache queued for retry is not the relay's to retry.
func (s *Server) invalidateEvents(ctx context.Context, evs []events.Event) error {
	var errs []error
	if s.opts.Invalidate != nil {
		errs = append(errs, s.opts.Invalidate(ctx, evs))
	}
	c := s.opts.Cache
	if c == nil {
		return errors.Join(errs...)
	}
	var keys []string
	for i := range evs {
		switch ev := &evs[i]; ev.Entity {
		case events.EntitySession:
			hash, err := hex.DecodeString(ev.Key)
			if err != nil {
				s.opts.Logger.Warn("session event with a malformed key; not invalidated", "event_id", ev.ID)
				continue
			}
			keys = append(keys, c.SessionKey(hash))
		case events.EntityConfig:
			ns, key := ev.ConfigKey()
			keys = append(keys, c.ConfigChangeKeys(ns, key)...)
		}
	}
	if len(keys) > 0 {
		if err := c.Invalidate(ctx, keys...); !errors.Is(err, cache.ErrInvalidationQueued) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// invalidated runs after a write reached the database (whether or not it
// succeeded: one that failed late may still have committed). A failed
// invalidation does not fail the write: the cache queues and retries it,
// and this server reads the key from the database meanwhile.
func (s *Server) invalidated(ctx context.Context, err error) {
	if err != nil {
		s.opts.Logger.Warn("cache invalidation failed; retrying in the background", "err", err)
	}
}

// sessionEntry is what the cache keeps of a session.
func sessionEntry(sess shards.Session) cache.Entry {
	return cache.Entry{Found: true, Owner: sess.UserID, Value: string(sess.Data), Version: sess.Version, ExpiresAt: sess.ExpiresAt}
}

// notFoundEntry turns the database's "not found" into a cacheable answer.
func notFoundEntry(err error) (cache.Entry, error) {
	if errors.Is(err, versioning.ErrNotFound) {
		return cache.Entry{}, nil
	}
	return cache.Entry{}, err
}

func configEntry(e catalog.ConfigEntry) cache.Entry {
	return cache.Entry{Found: true, Key: e.Key, Value: string(e.Value), Version: e.Version, UpdatedAt: e.UpdatedAt}
}

// cachedConfigPage returns the page of a cached namespace that the
// database would return for ListConfig(namespace, after, limit), and false
// if it cannot tell: the namespace is too large to cache, or after is not
// one of its keys (the database compares keys by its collation; the cached
// list is in that order, so a page can only start right after a key it
// holds).
func cachedConfigPage(e cache.Entry, namespace, after string, limit int) ([]catalog.ConfigEntry, bool) {
	if e.TooLarge {
		return nil, false
	}
	start := 0
	if after != "" {
		start = -1
		for i, m := range e.List {
			if m.Key == after {
				start = i + 1
				break
			}
		}
		if start < 0 {
			return nil, false
		}
	}
	end := min(len(e.List), start+limit)
	page := make([]catalog.ConfigEntry, 0, end-start)
	for _, m := range e.List[start:end] {
		page = append(page, catalog.ConfigEntry{Namespace: namespace, Key: m.Key, Value: []byte(m.Value), Version: m.Version, UpdatedAt: m.UpdatedAt})
	}
	return page, true
}

func errSessionNotFound() error { return fmt.Errorf("session: %w", versioning.ErrNotFound) }
func errConfigNotFound(namespace, key string) error {
	return fmt.Errorf("config %s/%s: %w", namespace, key, versioning.ErrNotFound)
}
