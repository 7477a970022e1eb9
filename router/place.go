package router

import (
	"fmt"
	"math"
	"sort"
	"strconv"

	"github.com/cespare/xxhash/v2"
)

// ShardWeight is a shard and its weight: a shard of weight N gets about N
// times the partitions of a shard of weight 1.
type ShardWeight struct {
	Name   string
	Weight int
}

// MaxWeight bounds a shard's weight; each unit is a member on the ring.
const MaxWeight = 64

// BalanceTolerance is how far a shard's partition count may stray from its
// weighted share in a placement: 5%, rounded up to whole partitions.
const BalanceTolerance = 0.05

// weightMember is member number n ≥ 2 of a shard of weight ≥ n. Its name
// ("a#2#") cannot collide with the first member's virtual nodes ("a#" plus
// digits) or with another shard's, since shard names hold no '#'.
type weightMember struct {
	shard string
	n     int
}

func (m weightMember) String() string { return m.shard + memberSep + strconv.Itoa(m.n) + memberSep }

// Place computes the target partition → shard map for a set of weighted
// shards: the consistent ring (weight N is N ring members, each with
// cfg.ReplicationFactor virtual nodes and bounded loads), then, only where a
// shard ends up outside BalanceTolerance of its weighted share, a balancing
// pass that hands the fewest partitions from the most loaded shards to the
// least loaded. Shards of weight 1 with a ring already inside the tolerance
// get exactly NewRing's map, so clusters created before weights existed
// keep their placement. The result depends only on the shard set, never on
// the order given.
func Place(shards []ShardWeight, cfg RingConfig) ([]string, error) {
	cfg = cfg.WithDefaults()
	names := make([]string, len(shards))
	weights := make(map[string]int, len(shards))
	for i, s := range shards {
		if s.Weight < 1 || s.Weight > MaxWeight {
			return nil, fmt.Errorf("%w: shard %s: weight %d outside 1..%d", ErrInvalidRing, s.Name, s.Weight, MaxWeight)
		}
		names[i] = s.Name
		weights[s.Name] = s.Weight
	}
	if err := checkRing(names, cfg); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRing, err)
	}
	var members []memberName
	for _, s := range shards {
		members = append(members, memberName{name: member(s.Name).String(), shard: s.Name})
		for n := 2; n <= s.Weight; n++ {
			members = append(members, memberName{name: weightMember{s.Name, n}.String(), shard: s.Name})
		}
	}
	if cfg.PartitionCount < len(members) {
		return nil, fmt.Errorf("%w: %d partitions cannot be spread over %d ring members (shard weights add up to more than the partition count)",
			ErrInvalidRing, cfg.PartitionCount, len(members))
	}
	owners, err := ringOwners(members, cfg)
	if err != nil {
		return nil, err
	}
	balance(owners, weights)
	return owners, nil
}

// Bounds returns the fewest and most partitions a shard of weight w may own
// among shards whose weights total totalWeight, for partitions partitions.
func Bounds(partitions, w, totalWeight int) (lo, hi int) {
	share := float64(partitions) * float64(w) / float64(totalWeight)
	slack := math.Ceil(share * BalanceTolerance)
	return int(math.Max(0, math.Ceil(share-slack))), int(math.Floor(share + slack))
}

// balance moves partitions from shards over their bounds, or from the most
// loaded, to shards under theirs, until every shard is within Bounds. A
// receiver takes, of a donor's partitions, those that hash first with the
// receiver's name: a choice that depends on nothing but the two shards.
func balance(owners []string, weights map[string]int) {
	total := 0
	for _, w := range weights {
		total += w
	}
	names := sortedKeys(weights)
	count := countOwners(owners)
	lo, hi := map[string]int{}, map[string]int{}
	for _, s := range names {
		lo[s], hi[s] = Bounds(len(owners), weights[s], total)
	}
	load := func(s string) float64 { return float64(count[s]) / float64(weights[s]) }
	for range len(owners) { // each round moves one partition; this bounds the loop
		var from, to string
		for _, s := range names {
			switch {
			case count[s] > hi[s] && (from == "" || load(s) > load(from)):
				from = s
			case count[s] < lo[s] && (to == "" || load(s) < load(to)):
				to = s
			}
		}
		if from == "" && to == "" {
			return
		}
		// One side is out of bounds: pair it with the other extreme.
		if from == "" {
			for _, s := range names {
				if s != to && count[s] > lo[s] && (from == "" || load(s) > load(from)) {
					from = s
				}
			}
		}
		if to == "" {
			for _, s := range names {
				if s != from && count[s] < hi[s] && (to == "" || load(s) < load(to)) {
					to = s
				}
			}
		}
		if from == "" || to == "" {
			return // nothing can give or take without breaking its own bound
		}
		p := pick(owners, from, to)
		owners[p] = to
		count[from]--
		count[to]++
	}
}

// pick returns the partition of from that hashes lowest with to's name.
func pick(owners []string, from, to string) int {
	best, bestHash := -1, uint64(math.MaxUint64)
	buf := make([]byte, 0, len(to)+12)
	for p, o := range owners {
		if o != from {
			continue
		}
		buf = strconv.AppendInt(append(append(buf[:0], to...), memberSep...), int64(p), 10)
		if h := xxhash.Sum64(buf); h < bestHash {
			best, bestHash = p, h
		}
	}
	return best
}

// memberName is a ring member's name and the shard it stands for.
type memberName struct {
	name, shard string
}

func (m memberName) String() string    { return m.name }
func (m memberName) shardName() string { return m.shard }

// ringOwners places the partitions on the members and returns, per
// partition, the member's shard.
func ringOwners(members []memberName, cfg RingConfig) ([]string, error) {
	sort.Slice(members, func(i, j int) bool { return members[i].name < members[j].name })
	ms := make([]ringMember, len(members))
	for i, m := range members {
		ms[i] = m
	}
	return buildRing(ms, cfg)
}
