package router

import (
	"errors"
	"fmt"
	"sync/atomic"
)

// Table is an immutable partition → shard map at one topology version.
// Build one with NewTable; never modify it after.
type Table struct {
	version int64
	shards  []string // index → name, sorted
	owner   []uint16 // partition → index into shards
}

// NewTable builds a table from owners, where owners[p] names partition p's
// shard. Every partition must have an owner.
func NewTable(version int64, owners []string) (*Table, error) {
	if err := ValidatePartitionCount(len(owners)); err != nil {
		return nil, err
	}
	counts := countOwners(owners)
	if len(counts) > 1<<16 {
		return nil, fmt.Errorf("%d shards: at most 65536", len(counts))
	}
	t := &Table{version: version, shards: sortedKeys(counts), owner: make([]uint16, len(owners))}
	index := make(map[string]uint16, len(t.shards))
	for i, s := range t.shards {
		if s == "" {
			return nil, errors.New("a partition has no shard")
		}
		index[s] = uint16(i)
	}
	for p, s := range owners {
		t.owner[p] = index[s]
	}
	return t, nil
}

// Version is the topology version the table was built from.
func (t *Table) Version() int64 { return t.version }

// PartitionCount is the number of partitions.
func (t *Table) PartitionCount() int { return len(t.owner) }

// Owner returns partition p's shard, or "" if p is out of range.
func (t *Table) Owner(p int32) string {
	if p < 0 || int(p) >= len(t.owner) {
		return ""
	}
	return t.shards[t.owner[p]]
}

// Shards returns the names of the shards that own at least one partition, in order.
func (t *Table) Shards() []string { return append([]string(nil), t.shards...) }

// Owners returns a copy of the map: element p is partition p's shard.
func (t *Table) Owners() []string {
	out := make([]string, len(t.owner))
	for p, i := range t.owner {
		out[p] = t.shards[i]
	}
	return out
}

// Counts returns how many partitions each shard owns.
func (t *Table) Counts() map[string]int {
	m := make(map[string]int, len(t.shards))
	for _, i := range t.owner {
		m[t.shards[i]]++
	}
	return m
}

// Router answers lookups from the newest table it was given. Lookups are
// lock-free and allocation-free; Store swaps the table atomically. The zero
// Router has no table and finds nothing.
type Router struct {
	table atomic.Pointer[Table]
}

// New returns a Router serving t.
func New(t *Table) *Router {
	r := &Router{}
	r.table.Store(t)
	return r
}

// Table returns the current table, or nil.
func (r *Router) Table() *Table { return r.table.Load() }

// Store installs t unless the router already holds a table of a higher
// version (a slow load must not undo a newer one). It reports whether t was
// installed.
func (r *Router) Store(t *Table) bool {
	for {
		cur := r.table.Load()
		if cur != nil && cur.version > t.version {
			return false
		}
		if r.table.CompareAndSwap(cur, t) {
			return true
		}
	}
}

// Lookup returns userID's partition and the shard that owns it. ok is false
// only when the router has no table yet.
func (r *Router) Lookup(userID string) (partition int32, shard string, ok bool) {
	t := r.table.Load()
	if t == nil {
		return 0, "", false
	}
	p := Partition(userID, len(t.owner))
	return p, t.shards[t.owner[p]], true
}

// ShardOf returns the shard that owns partition p. ok is false when the
// router has no table or p is out of range.
func (r *Router) ShardOf(p int32) (shard string, ok bool) {
	t := r.table.Load()
	if t == nil || p < 0 || int(p) >= len(t.owner) {
		return "", false
	}
	return t.shards[t.owner[p]], true
}
