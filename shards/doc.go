// Package shards talks to the Postgres databases that hold user data: one
// connection pool per shard, and the SQL for users, sessions, items, the
// ownership table, the outbox relay's reads and deletes, and the work a
// partition move does on a shard. It is the only package that runs SQL on a
// shard database (migrations aside; internal/layering checks).
//
// # Fencing
//
// Every read and write is fenced: the same statement that touches the data
// also checks the partition's row in the ownership table. Reads accept a
// partition that is owned or frozen; writes require owned and hold FOR SHARE
// on the ownership row until they commit, so a freeze (an UPDATE of that
// row) waits for in-flight writes and then stops new ones. A router with a
// stale map therefore gets ErrWrongShard instead of stale data or a lost
// write.
//
// Every write also inserts its change events into the outbox in the same
// statement, so an event is committed exactly when its change is.
//
// # Outbox clocks and lock order
//
// Every outbox insert takes its partition's outbox_clock row lock (the BEFORE
// INSERT trigger of shard migrations 00002/00003) until commit. A write
// locks nothing after its clock but its own key's tombstone (a delete
// upserts it after its outbox insert; the trigger's tombstone lookups take
// no locks), and writers insert events of one partition only. Work that
// holds several clocks at once therefore cannot deadlock with writers as
// long as it takes every other lock before its first clock and the clocks
// in partition order:
//
//   - The session sweeper (SweepExpiredSessions) takes its ownership and
//     session row locks without waiting (SKIP LOCKED), all of them before its
//     first outbox insert (the insert's sort reads every delete first, as in
//     deleteUserSQL), then the clocks in partition order. Writers of a swept
//     partition wait at most for the rest of the batch and its commit; the
//     sweep waits only for writers about to commit, or for a prune batch.
//     SKIP LOCKED passes over a partition whose ownership row is being
//     changed (a row changed since the snapshot is rechecked, so one frozen
//     meanwhile is excluded) and over sessions a Touch, Revoke or DeleteUser
//     holds, which revive or delete them with their own event, so no
//     session gets two. Row locks SKIP LOCKED takes before skipping a join
//     row stay held until commit; they only guard expired sessions.
//   - The tombstone pruner (PruneTombstones) locks the clocks before any
//     tombstone, the reverse of "the clock is a write's last lock", on
//     purpose: a delete writes its tombstone after its outbox insert took the
//     clock, so a prune holding a tombstone while waiting for that delete's
//     clock would deadlock with it. Holding the clocks first, it only waits
//     for writers that hold a clock and need nothing the prune holds:
//     single-partition writers want no other clock; the sweeper takes clocks
//     in partition order too; ownership FOR SHARE conflicts only with
//     ownership changes, which hold no clock; and it takes tombstones
//     afterwards without waiting (SKIP LOCKED).
//   - Two sweepers or two pruners of one shard never run at once (advisory
//     locks, internal/pglock), and a sweeper and a pruner queue behind each
//     other on the clocks rather than deadlock.
package shards
