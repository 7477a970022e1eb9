package router

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"sort"

	"github.com/buraksezer/consistent"
)

// RingConfig shapes the consistent ring. The zero value of a field means its
// default.
type RingConfig struct {
	// PartitionCount is the number of partitions (default DefaultPartitions).
	PartitionCount int
	// ReplicationFactor is the number of virtual nodes per shard (default
	// 512, at least 2). More nodes give a more even spread.
	ReplicationFactor int
	// Load bounds a shard's partitions to Load × the average (default 1.05;
	// more than 1 unless partitions divide evenly among shards). Lower is
	// more even but moves more partitions when shards come and go.
	Load float64
}

// Ring defaults, measured to place 4096 partitions on 4 shards within ±4% of
// even (see TestRingBalance); 20 virtual nodes, the library's default, left
// one shard 15% short.
const (
	DefaultReplicationFactor = 512
	DefaultLoad              = 1.05
)

// WithDefaults returns c with zero fields set to their defaults.
func (c RingConfig) WithDefaults() RingConfig {
	if c.PartitionCount == 0 {
		c.PartitionCount = DefaultPartitions
	}
	if c.ReplicationFactor == 0 {
		c.ReplicationFactor = DefaultReplicationFactor
	}
	if c.Load == 0 {
		c.Load = DefaultLoad
	}
	return c
}

// ErrInvalidRing is wrapped by every error NewRing returns for a ring the
// library cannot build.
var ErrInvalidRing = errors.New("invalid ring")

var shardNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// ValidateShardName reports whether name is a valid shard name: 1-63 bytes
// of [a-z0-9_-], starting with a letter or digit.
func ValidateShardName(name string) error {
	if !shardNameRE.MatchString(name) {
		return fmt.Errorf("shard name %q: want 1-63 characters of [a-z0-9_-] starting with a letter or digit", name)
	}
	return nil
}

// member is a shard on the ring. The library names virtual node i of a member
// String()+i, so without a separator shard "a" node 12 and shard "a1" node 2
// would both hash "a12". The separator cannot occur in a shard name.
type member string

const memberSep = "#"

func (m member) String() string { return string(m) + memberSep }

// Ring is the target partition → shard map for a set of shards.
type Ring struct {
	owners []string // partition → shard name
}

// NewRing places cfg.PartitionCount partitions on the given shards, each of
// weight 1 (see Place). It returns an error, never panics, for inputs the
// library would panic on: no shards, invalid or duplicate names, fewer
// partitions than shards, ReplicationFactor < 2, or a Load too small to
// hold every partition.
func NewRing(shards []string, cfg RingConfig) (*Ring, error) {
	ws := make([]ShardWeight, len(shards))
	for i, s := range shards {
		ws[i] = ShardWeight{Name: s, Weight: 1}
	}
	return NewWeightedRing(ws, cfg)
}

// NewWeightedRing places cfg.PartitionCount partitions on weighted shards
// (see Place).
func NewWeightedRing(shards []ShardWeight, cfg RingConfig) (*Ring, error) {
	owners, err := Place(shards, cfg)
	if err != nil {
		return nil, err
	}
	return &Ring{owners: owners}, nil
}

// ringMember is a member of the consistent ring that stands for a shard.
type ringMember interface {
	consistent.Member
	shardName() string
}

func (m member) shardName() string { return string(m) }

// buildRing places cfg.PartitionCount partitions on members and returns,
// per partition, the owning member's shard. cfg has its defaults and passed
// checkRing.
func buildRing(members []ringMember, cfg RingConfig) (owners []string, err error) {
	// The library caps each member at ceil(floor(P/n) × Load) partitions and
	// panics when the caps add up to less than P.
	n := len(members)
	perMember := math.Ceil(float64(cfg.PartitionCount/n) * cfg.Load)
	if perMember*float64(n) < float64(cfg.PartitionCount) {
		return nil, fmt.Errorf("%w: load %v is too small for %d partitions on %d ring members: raise it above 1", ErrInvalidRing, cfg.Load, cfg.PartitionCount, n)
	}
	ms := make([]consistent.Member, n)
	for i, m := range members {
		ms[i] = m
	}
	// checkRing rules out every panic we know of; this catches the rest.
	defer func() {
		if p := recover(); p != nil {
			owners, err = nil, fmt.Errorf("%w: %v", ErrInvalidRing, p)
		}
	}()
	c := consistent.New(ms, consistent.Config{
		PartitionCount:    cfg.PartitionCount,
		ReplicationFactor: cfg.ReplicationFactor,
		Load:              cfg.Load,
		Hasher:            Hasher{},
	})
	owners = make([]string, cfg.PartitionCount)
	for p := range owners {
		m := c.GetPartitionOwner(p)
		if m == nil {
			return nil, fmt.Errorf("%w: partition %d has no owner", ErrInvalidRing, p)
		}
		owners[p] = m.(ringMember).shardName()
	}
	return owners, nil
}

func checkRing(shards []string, cfg RingConfig) error {
	if len(shards) == 0 {
		return errors.New("no shards")
	}
	seen := make(map[string]bool, len(shards))
	for _, s := range shards {
		if err := ValidateShardName(s); err != nil {
			return err
		}
		if seen[s] {
			return fmt.Errorf("shard %q listed twice", s)
		}
		seen[s] = true
	}
	if err := ValidatePartitionCount(cfg.PartitionCount); err != nil {
		return err
	}
	n := len(shards)
	if cfg.PartitionCount < n {
		return fmt.Errorf("%d partitions cannot be spread over %d shards", cfg.PartitionCount, n)
	}
	if cfg.ReplicationFactor < 2 {
		return fmt.Errorf("replication factor %d: want at least 2", cfg.ReplicationFactor)
	}
	if cfg.ReplicationFactor > 1<<16 {
		return fmt.Errorf("replication factor %d: want at most 65536", cfg.ReplicationFactor)
	}
	if math.IsNaN(cfg.Load) || cfg.Load < 1 || cfg.Load > 100 {
		return fmt.Errorf("load %v: want a number in [1, 100]", cfg.Load)
	}
	return nil
}

// Owner returns the shard the ring assigns partition p to.
func (r *Ring) Owner(p int32) string { return r.owners[p] }

// Map returns a copy of the target map: element p is partition p's shard.
func (r *Ring) Map() []string { return append([]string(nil), r.owners...) }

// Counts returns how many partitions each shard gets.
func (r *Ring) Counts() map[string]int { return countOwners(r.owners) }

func countOwners(owners []string) map[string]int {
	m := make(map[string]int)
	for _, o := range owners {
		m[o]++
	}
	return m
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
