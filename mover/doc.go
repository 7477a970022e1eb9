// Package mover rebalances a cluster: it plans which partitions move where
// (a pure diff of the actual map against the ring of the target shard set)
// and moves them, a batch at a time per source and target, while the
// cluster serves.
//
// The work is split the way etcd's raft splits it: machine.go is a pure
// state machine that says, for a move's recorded state, which actions come
// next and which state each outcome leads to; plan.go is the pure planner;
// the Executor does the I/O through packages catalog and shards, records
// every new state in the catalog, and runs on every instance, one at a time
// cluster-wide (an advisory lock, fenced by a term).
//
// How a move goes: the source publishes the batch's rows (row-filtered
// logical replication) and exports a snapshot with a new slot; the rows are
// copied as of that snapshot, without firing triggers; the target subscribes
// to the slot and applies every change since. When a marker written on the
// source reaches the target within half the freeze budget, a short freeze
// takes snapshots of both sides at the same point and their per-table
// checksums are compared; a mismatch rolls the move back. Then the cutover:
// freeze (in-flight writes finish, new ones wait in their routers), marker,
// source marked moved, target owned, catalog owner flipped by
// compare-and-set. Writers waiting in routers retry on the new owner. Last,
// the replication objects and the source's copy are deleted.
package mover
