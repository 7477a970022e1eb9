package mover

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/shardgate/shardgate/router"
)

// ShardInfo is a shard as the planner sees it.
type ShardInfo struct {
	Name     string
	Weight   int
	Draining bool // gives all its partitions away
}

// Size is what a partition holds.
type Size struct {
	Rows, Bytes int64
}

// PlanOptions shape the moves of a plan. The zero value means defaults.
type PlanOptions struct {
	// MaxBatch caps the partitions of one move (default 1024). A move's
	// fixed costs (a slot, a subscription, a cutover) are paid per batch.
	MaxBatch int
	// MaxBatchRows caps the rows of one move, when sizes are known
	// (default 2,000,000), so that one move does not hold a replication
	// slot for long.
	MaxBatchRows int64
}

func (o PlanOptions) withDefaults() PlanOptions {
	if o.MaxBatch <= 0 {
		o.MaxBatch = 1024
	}
	if o.MaxBatchRows <= 0 {
		o.MaxBatchRows = 2_000_000
	}
	return o
}

// PlannedMove is a batch of partitions to move from one shard to another.
type PlannedMove struct {
	Source, Target string
	Partitions     []int32
	Size           Size
}

// ShardPlan is one shard's part in a plan.
type ShardPlan struct {
	ShardInfo
	Before, After int     // partitions owned now and after the plan
	Share         float64 // the weighted share After aims at, in partitions
}

// Plan is what a rebalance would do.
type Plan struct {
	// Version is the topology version of the map the plan was made from.
	Version int64
	// Target is the map after the plan: Target[p] is partition p's shard.
	Target []string
	Moves  []PlannedMove
	Shards []ShardPlan // in name order
}

// Size adds up the moves' sizes.
func (p Plan) Size() (partitions int, size Size) {
	for _, m := range p.Moves {
		partitions += len(m.Partitions)
		size.Rows += m.Rows()
		size.Bytes += m.Size.Bytes
	}
	return partitions, size
}

// Rows is the move's row count.
func (m PlannedMove) Rows() int64 { return m.Size.Rows }

// Estimate is how long moving size takes at rowsPerSecond, with perMove
// of fixed cost for each of moves moves run maxParallel at a time.
func Estimate(size Size, moves, maxParallel int, rowsPerSecond float64, perMove time.Duration) time.Duration {
	if maxParallel < 1 {
		maxParallel = 1
	}
	waves := (moves + maxParallel - 1) / maxParallel
	copyTime := time.Duration(float64(size.Rows) / rowsPerSecond / float64(min(maxParallel, max(moves, 1))) * float64(time.Second))
	return copyTime + time.Duration(waves)*perMove
}

// MakePlan diffs the actual map (actual[p] is partition p's shard, at
// topology version) against the placement of the active shards (see
// router.Place): every partition whose placement differs moves, and no
// other. Moves are grouped by source and target and cut into batches by
// opts. sizes, when known, gives each partition's size; missing entries
// count as empty.
func MakePlan(actual []string, version int64, shards []ShardInfo, cfg router.RingConfig, sizes map[int32]Size, opts PlanOptions) (Plan, error) {
	opts = opts.withDefaults()
	if len(actual) == 0 {
		return Plan{}, errors.New("plan: the partition map is empty")
	}
	cfg.PartitionCount = len(actual)
	var (
		active      []router.ShardWeight
		totalWeight int
		known       = make(map[string]bool, len(shards))
	)
	for _, s := range shards {
		if known[s.Name] {
			return Plan{}, fmt.Errorf("plan: shard %s listed twice", s.Name)
		}
		known[s.Name] = true
		if !s.Draining {
			active = append(active, router.ShardWeight{Name: s.Name, Weight: s.Weight})
			totalWeight += s.Weight
		}
	}
	if len(active) == 0 {
		return Plan{}, errors.New("plan: no active shard to place partitions on")
	}
	for p, owner := range actual {
		if !known[owner] {
			return Plan{}, fmt.Errorf("plan: partition %d belongs to %q, which is not a registered shard", p, owner)
		}
	}
	target, err := router.Place(active, cfg)
	if err != nil {
		return Plan{}, fmt.Errorf("plan: %w", err)
	}

	type pair struct{ from, to string }
	groups := map[pair][]int32{}
	for p := range actual {
		if actual[p] != target[p] {
			k := pair{actual[p], target[p]}
			groups[k] = append(groups[k], int32(p))
		}
	}
	keys := make([]pair, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].from != keys[j].from {
			return keys[i].from < keys[j].from
		}
		return keys[i].to < keys[j].to
	})
	plan := Plan{Version: version, Target: target}
	for _, k := range keys {
		var cur PlannedMove
		flush := func() {
			if len(cur.Partitions) > 0 {
				plan.Moves = append(plan.Moves, cur)
			}
			cur = PlannedMove{Source: k.from, Target: k.to}
		}
		flush()
		for _, p := range groups[k] { // ascending
			sz := sizes[p]
			if len(cur.Partitions) > 0 && (len(cur.Partitions) >= opts.MaxBatch || cur.Size.Rows+sz.Rows > opts.MaxBatchRows) {
				flush()
			}
			cur.Partitions = append(cur.Partitions, p)
			cur.Size.Rows += sz.Rows
			cur.Size.Bytes += sz.Bytes
		}
		flush()
	}

	before, after := map[string]int{}, map[string]int{}
	for p := range actual {
		before[actual[p]]++
		after[target[p]]++
	}
	for _, s := range shards {
		sp := ShardPlan{ShardInfo: s, Before: before[s.Name], After: after[s.Name]}
		if !s.Draining {
			sp.Share = float64(len(actual)) * float64(s.Weight) / float64(totalWeight)
		}
		plan.Shards = append(plan.Shards, sp)
	}
	slices.SortFunc(plan.Shards, func(a, b ShardPlan) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	return plan, nil
}
