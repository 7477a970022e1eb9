// Package cache is the read-through cache in front of the databases for
// sessions and config: rueidis with server-assisted client-side caching
// (RESP3 CLIENT TRACKING), so a hot read is answered from this process's
// memory and Redis pushes an invalidation to every process holding a key
// when the key changes.
//
// # No stale set
//
// A miss runs one loader per key: one per process (an in-process flight)
// and one across processes (a lease written into the key itself). The
// loader's result is stored only while its lease is still in the key, so a
// writer's delete, which removes the lease, makes a loader that read the
// old value fail to store it.
//
// # Signed entries
//
// Redis is not trusted: every entry carries an HMAC-SHA256 under
// Options.MACKey over its Redis key and contents, and the time until which
// it may be served (its store time plus the TTL it was stored with). An
// entry that fails either is a miss, is replaced, and is counted
// (Stats.Rejected, Stats.PastValidity). Binding the key stops a genuine
// entry being copied under another key; the validity bounds how long a
// replayed older entry of the same key can be served.
//
// # Read-your-writes
//
// The process that acknowledged a write never serves an older value
// afterwards: a write leaves a floor on its keys, the time its delete was
// acknowledged. A local copy fetched before that is not served even if its
// invalidation push is late, and in-process flights that started before
// the write are not joined. Every other process drops its copy when
// Redis's invalidation reaches it (δ, measured in the tests).
//
// A copy's fetch time is read off its rueidis stamp (copyStart). rueidis
// stamps a copy with an expiry of its fetch's start plus the LocalTTL it
// was asked for, shortened to the key's TTL in Redis; so the expiry minus
// LocalTTL is at or before the fetch's start, and a copy whose start lies
// after a write's acknowledged delete was read from Redis after that
// delete. A shortened expiry only makes a copy look older (it is then read
// from Redis, never served stale). Both stamps are this process's wall
// clock; a clock stepped back between a write and a fetch could make an
// older copy look newer.
//
// A copy from before the floor is checked against Redis (Stats.Predated).
// If Redis holds the same bytes (often a not-found entry, whose short TTL
// makes its copy look older than it is), the copy is as fresh as that
// answer, and later writes will invalidate or floor it, so it may answer
// again until the next write.
//
// # Memo
//
// A cache made by Dial keeps the decoded entries of the memory copies it
// served in a map of its own (memo), so a repeated hit asks rueidis
// nothing. The memo never outlives a rueidis copy: an entry is added only
// from a rueidis local hit that passed every check above, keeps that
// copy's stamp (so floors, LocalTTL and the distrust windows judge it
// exactly as they judge the copy), and is dropped by the same invalidation
// push or connection loss that drops the copy (rueidis drops its copy,
// then reports the push). An entry read before a push but added after it
// would outlive its copy: each memo shard's generation moves with every
// push, and an entry is added only if its shard's generation has not
// moved since before the DoCache that produced it.
//
// # Overflow
//
// Past Options.MaxPending failed invalidations the cache drops them and
// reads everything from the database. The overflow ends after a pass that
// deletes every key of this cache in Redis (flushPrefix) succeeds with no
// invalidation dropped while it ran (endOverflow). That is enough: a value
// made stale by a dropped invalidation was read from the database before
// that write committed, under a lease taken before the read, so before the
// pass began. SCAN returns every key present for the whole pass, so the
// value, or the lease it would replace, is deleted unless someone deleted
// it first; a loader whose lease is gone stores nothing (storeLua). A lease
// taken after the pass passed the key reads the database after the write.
// What is left is this process's own state: flights that began before the
// overflow's end are not joined (flightFloor), and memory copies fetched
// before it, whose invalidation pushes may arrive after the deletes'
// replies, are checked against Redis like copies from before a write
// (overflowEnded, trustLocal).
package cache
