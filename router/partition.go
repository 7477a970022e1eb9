// Package router maps a user ID to its partition and a partition to its shard.
// It does no I/O: the ring computes target maps, and an immutable Table behind
// an atomic pointer answers lookups with an array index, without locks or
// allocations. Loading and watching the table lives in package catalog.
package router

import (
	"fmt"

	"github.com/cespare/xxhash/v2"
)

// DefaultPartitions is the partition count of a new cluster. The count is
// fixed for the cluster's life: partitions, not keys, are what moves.
const DefaultPartitions = 4096

// MaxPartitions bounds the partition count so a partition fits an int32 and a
// table stays small (one uint16 per partition).
const MaxPartitions = 1 << 20

// Partition returns xxhash64(userID) mod partitions: the same value that
// consistent.FindPartitionID computes with the ring's Hasher, without the
// []byte conversion that would allocate.
func Partition(userID string, partitions int) int32 {
	return int32(xxhash.Sum64String(userID) % uint64(partitions))
}

// Hasher is the xxhash64 consistent.Hasher used by the ring.
type Hasher struct{}

// Sum64 returns xxhash64 of b.
func (Hasher) Sum64(b []byte) uint64 { return xxhash.Sum64(b) }

// ValidatePartitionCount reports whether n is a usable partition count.
func ValidatePartitionCount(n int) error {
	if n < 1 || n > MaxPartitions {
		return fmt.Errorf("partition count %d out of range [1, %d]", n, MaxPartitions)
	}
	return nil
}
