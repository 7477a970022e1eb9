package router

import (
	"errors"
	"fmt"
	"testing"
)

// Place never panics: it returns ErrInvalidRing or a map that gives every
// partition a listed shard and every shard its weighted share within
// BalanceTolerance.
func FuzzPlace(f *testing.F) {
	f.Add(uint8(4), uint16(4096), uint64(0x0101010101010101))
	f.Add(uint8(5), uint16(4096), uint64(0x0201010101010101))
	f.Add(uint8(3), uint16(10), uint64(0x4000000000000001))
	f.Add(uint8(0), uint16(64), uint64(0))
	f.Fuzz(func(t *testing.T, n uint8, partitions uint16, weights uint64) {
		n %= 9 // up to 8 shards: each byte of weights is one's weight
		var shards []ShardWeight
		total := 0
		for i := range int(n) {
			w := int(weights>>(8*i)) & 0x7f // 0 and over 64 are invalid
			shards = append(shards, ShardWeight{Name: fmt.Sprintf("s%d", i), Weight: w})
			total += w
		}
		cfg := RingConfig{PartitionCount: int(partitions), ReplicationFactor: 16}
		owners, err := Place(shards, cfg)
		if err != nil {
			if !errors.Is(err, ErrInvalidRing) {
				t.Fatalf("Place: %v, not ErrInvalidRing", err)
			}
			return
		}
		counts := countOwners(owners)
		for _, s := range shards {
			lo, hi := Bounds(len(owners), s.Weight, total)
			if c := counts[s.Name]; c < lo || c > hi {
				t.Fatalf("%v on %d partitions: %s (weight %d) owns %d, outside [%d, %d]", shards, partitions, s.Name, s.Weight, c, lo, hi)
			}
			delete(counts, s.Name)
		}
		if len(counts) != 0 {
			t.Fatalf("partitions placed on unlisted shards: %v", counts)
		}
	})
}
