package cache

import (
	"hash/maphash"
	"sync"
	"time"
)

// memo keeps the decoded, MAC-checked entries of memory copies that
// rueidis answered locally, so the next hit skips DoCache (command build,
// key hash, LRU lock) and the MAC slot. It holds nothing rueidis does not:
// an entry is put only from a local hit that lookup would serve, carries
// that copy's stamp (pxat), and is dropped when Redis's invalidation push
// for its key arrives (rueidis drops its copy first, then tells
// Invalidations) or when the connection drops. A hit is judged by the same
// rules as a rueidis copy (trustLocal, floors, validity, expiry).
//
// A put races the push that invalidates it: lookup reads the key's shard
// generation before DoCache, and put installs only if no push for the
// shard came since. Push and put take the shard's lock, so a push either
// comes first (the generation moved: nothing is put) or deletes what was
// put.
type memo struct {
	seed   maphash.Seed
	shards [memoShards]memoShard
}

type memoShard struct {
	mu    sync.RWMutex
	gen   uint64
	m     map[string]memoEntry
	bytes int
}

type memoEntry struct {
	e          Entry
	pxat       int64     // the rueidis copy's stamp (CachePXAT)
	validUntil time.Time // the MAC'd validity
}

const (
	memoShards = 64
	// memoShardBytes bounds the entry bytes one shard pins (rueidis may
	// evict a copy the memo still refers to); a full shard starts over.
	memoShardBytes = 256 << 10
	// memoMaxEntry: larger entries (namespace lists) stay with DoCache
	// and the MAC slots.
	memoMaxEntry = 4 << 10
)

func newMemo() *memo {
	m := &memo{seed: maphash.MakeSeed()}
	for i := range m.shards {
		m.shards[i].m = make(map[string]memoEntry)
	}
	return m
}

func (m *memo) shard(key string) *memoShard {
	return &m.shards[maphash.String(m.seed, key)%memoShards]
}

// get returns key's entry, if the memo has it.
func (m *memo) get(key string) (memoEntry, bool) {
	s := m.shard(key)
	s.mu.RLock()
	e, ok := s.m[key]
	s.mu.RUnlock()
	return e, ok
}

// gen is key's shard generation, to be passed to put: read it before the
// DoCache whose result put installs.
func (m *memo) gen(key string) uint64 {
	s := m.shard(key)
	s.mu.RLock()
	g := s.gen
	s.mu.RUnlock()
	return g
}

// put installs key's entry (size: its stored bytes) unless an
// invalidation reached key's shard since gen was read.
func (m *memo) put(key string, gen uint64, e memoEntry, size int) {
	if size > memoMaxEntry {
		return
	}
	s := m.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gen != gen {
		return
	}
	if s.bytes+size > memoShardBytes {
		s.m, s.bytes = make(map[string]memoEntry), 0
	}
	if _, ok := s.m[key]; !ok {
		s.bytes += size
	}
	s.m[key] = e
}

// invalidate drops keys (nil: every key) and moves their shards'
// generations, so a put racing it installs nothing.
func (m *memo) invalidate(keys []string) {
	if keys == nil {
		for i := range m.shards {
			s := &m.shards[i]
			s.mu.Lock()
			s.gen++
			s.m, s.bytes = make(map[string]memoEntry), 0
			s.mu.Unlock()
		}
		return
	}
	for _, k := range keys {
		s := m.shard(k)
		s.mu.Lock()
		s.gen++
		delete(s.m, k)
		s.mu.Unlock()
	}
}
