package cache

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
)

// trustLocal reports whether local copies may answer (not while
// recovering from a failed invalidation or an outage) and key's floor: if
// this process wrote key lately, when that write's delete was acknowledged
// (only a copy fetched after that may answer), or else when an overflow
// ended, if lately. The zero floor's time lies before every copy.
func (c *Cache) trustLocal(key string, now time.Time) (bool, floor) {
	if now.UnixNano() < c.uncachedUntil.Load() || c.br.current() != BreakerClosed {
		return false, floor{}
	}
	fl, _ := c.floors.get(key)
	if end := c.overflowEnded.Load(); end != 0 && (fl.at.IsZero() || fl.at.UnixNano() < end) && now.UnixNano()-end < int64(c.opts.LocalTTL) {
		// Copies from before the flush may have missed an invalidation
		// that was dropped.
		fl = floor{seq: fl.seq, at: time.Unix(0, end)}
	}
	return true, fl
}

// predates reports whether the memory copy stamped pxat (its CachePXAT)
// may have been fetched before floor fl, and was not found equal to
// Redis's value since: it must not answer without asking Redis.
func (c *Cache) predates(pxat int64, fl floor) bool {
	return c.copyStart(pxat) <= fl.at.UnixMilli() && pxat != fl.verified
}

// copyStart is when the fetch that made the local copy stamped pxat began
// (Unix ms), or earlier; why that holds is in doc.go, Read-your-writes.
func (c *Cache) copyStart(pxat int64) int64 {
	if pxat <= 0 {
		return 0
	}
	return pxat - c.opts.LocalTTL.Milliseconds()
}

func (c *Cache) distrustLocal(d time.Duration) {
	until := time.Now().Add(d).UnixNano()
	for {
		cur := c.uncachedUntil.Load()
		if cur >= until || c.uncachedUntil.CompareAndSwap(cur, until) {
			return
		}
	}
}

// markFloors records a write to keys now: called when a write's delete is
// sent and again once it is acknowledged (the later mark is the one local
// copies are judged by). A floor is kept for as long as a copy fetched
// before it may live (LocalTTL) or a flight started before it may run
// (LeaseTTL).
func (c *Cache) markFloors(keys []string) {
	now := time.Now()
	for _, k := range keys {
		c.floors.set(k, c.seq.Add(1), now, c.opts.LocalTTL+c.opts.LeaseTTL)
	}
}

// floors remembers, for keys written here lately, the sequence number and
// time of the write. Split by key hash: every read looks its key up, and
// one lock shared by all readers makes its cache line bounce between CPUs.
// Each shard keeps two generations, swapped every keep: a floor lives
// between keep and twice keep (longer in a shard no write touches, which
// only makes older copies ask Redis), and forgetting costs no walk of the
// map.
type floors struct {
	seed   maphash.Seed
	shards [floorShards]floorShard
	n      atomic.Int64 // floors held, for the lock-free empty check
}

const floorShards = 32

type floorShard struct {
	mu       sync.RWMutex
	cur, old map[string]floor
	swapped  time.Time
}

type floor struct {
	seq uint64
	at  time.Time
	// verified is the rueidis stamp (CachePXAT) of a memory copy from
	// before the write that was found equal to Redis's value after it: it
	// may answer (see lookup). Any later write resets it.
	verified int64
}

func (f *floors) init() {
	f.seed = maphash.MakeSeed()
	for i := range f.shards {
		f.shards[i].cur, f.shards[i].old = make(map[string]floor), make(map[string]floor)
	}
}

func (f *floors) shard(key string) *floorShard {
	return &f.shards[maphash.String(f.seed, key)%floorShards]
}

// get returns key's floor, if it has one.
func (f *floors) get(key string) (floor, bool) {
	if f.n.Load() == 0 {
		return floor{}, false
	}
	s := f.shard(key)
	s.mu.RLock()
	defer s.mu.RUnlock()
	if fl, ok := s.cur[key]; ok {
		return fl, true
	}
	fl, ok := s.old[key]
	return fl, ok
}

// set records a write to key. It never moves a floor back: two writes of
// one key (or of two config values sharing a namespace list) may mark in
// either order. Floors are kept at least keep, which outlasts any local
// copy and any flight from before the write.
func (f *floors) set(key string, seq uint64, now time.Time, keep time.Duration) {
	s := f.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	before := len(s.cur) + len(s.old)
	if now.Sub(s.swapped) > keep {
		s.old, s.cur, s.swapped = s.cur, make(map[string]floor), now
	}
	fl, ok := s.cur[key]
	if !ok {
		fl = s.old[key]
	}
	if seq > fl.seq {
		fl.seq = seq
	}
	if now.After(fl.at) {
		fl.at = now
	}
	fl.verified = 0
	s.cur[key] = fl
	f.n.Add(int64(len(s.cur) + len(s.old) - before))
}

// verify records that key's memory copy stamped pxat matched Redis after
// the write whose floor has sequence seq (not if a later write came).
func (f *floors) verify(key string, seq uint64, pxat int64) {
	s := f.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if fl, ok := s.cur[key]; ok && fl.seq == seq {
		fl.verified = pxat
		s.cur[key] = fl
	} else if fl, ok := s.old[key]; ok && fl.seq == seq {
		fl.verified = pxat
		s.old[key] = fl
	}
}
