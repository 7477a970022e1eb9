package mover

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/shardgate/shardgate/router"
)

func infos(names ...string) []ShardInfo {
	out := make([]ShardInfo, len(names))
	for i, n := range names {
		out[i] = ShardInfo{Name: n, Weight: 1}
	}
	return out
}

func placed(t *testing.T, shards ...string) []string {
	t.Helper()
	r, err := router.NewRing(shards, router.RingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Map()
}

// apply runs a plan's moves on a copy of the map.
func apply(t *testing.T, actual []string, p Plan) []string {
	t.Helper()
	out := slices.Clone(actual)
	seen := map[int32]bool{}
	for _, m := range p.Moves {
		for _, q := range m.Partitions {
			if seen[q] {
				t.Fatalf("partition %d in two moves", q)
			}
			seen[q] = true
			if out[q] != m.Source {
				t.Fatalf("move of partition %d from %s, but %s owns it", q, m.Source, out[q])
			}
			out[q] = m.Target
		}
	}
	return out
}

func TestPlanNothingToDo(t *testing.T) {
	actual := placed(t, "a", "b", "c", "d")
	p, err := MakePlan(actual, 3, infos("a", "b", "c", "d"), router.RingConfig{}, nil, PlanOptions{})
	if err != nil || len(p.Moves) != 0 || p.Version != 3 {
		t.Fatalf("plan of a placed map: %d moves, version %d, %v", len(p.Moves), p.Version, err)
	}
}

func TestPlanAddingAShard(t *testing.T) {
	actual := placed(t, "a", "b", "c", "d")
	shards := append(infos("a", "b", "c", "d"), ShardInfo{Name: "e", Weight: 2})
	sizes := map[int32]Size{}
	for p := range int32(len(actual)) {
		sizes[p] = Size{Rows: 10, Bytes: 1000}
	}
	p, err := MakePlan(actual, 1, shards, router.RingConfig{}, sizes, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	after := apply(t, actual, p)
	if !slices.Equal(after, p.Target) {
		t.Fatal("the moves do not produce the target map")
	}
	want, err := router.Place([]router.ShardWeight{{Name: "a", Weight: 1}, {Name: "b", Weight: 1}, {Name: "c", Weight: 1}, {Name: "d", Weight: 1}, {Name: "e", Weight: 2}}, router.RingConfig{})
	if err != nil || !slices.Equal(p.Target, want) {
		t.Fatalf("target is not the placement of the shard set (%v)", err)
	}
	// Minimal: exactly the partitions whose placement differs move.
	n, size := p.Size()
	diff := 0
	for q := range actual {
		if actual[q] != want[q] {
			diff++
		}
	}
	if n != diff || size.Rows != int64(10*n) || size.Bytes != int64(1000*n) {
		t.Fatalf("plan moves %d partitions (%+v); %d differ", n, size, diff)
	}
	for _, s := range p.Shards {
		lo, hi := router.Bounds(len(actual), s.Weight, 6)
		if s.After < lo || s.After > hi {
			t.Errorf("%s ends with %d partitions, outside [%d, %d] (share %.1f)", s.Name, s.After, lo, hi, s.Share)
		}
	}
	t.Logf("adding e (weight 2) to 4 shards moves %d of %d partitions in %d moves", n, len(actual), len(p.Moves))
}

func TestPlanDrainingAShard(t *testing.T) {
	actual := placed(t, "a", "b", "c")
	shards := infos("a", "b", "c")
	shards[1].Draining = true
	p, err := MakePlan(actual, 1, shards, router.RingConfig{}, nil, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	after := apply(t, actual, p)
	for q, o := range after {
		if o == "b" {
			t.Fatalf("partition %d stays on draining shard b", q)
		}
	}
	for _, m := range p.Moves {
		if m.Source != "b" {
			t.Errorf("draining b moves a partition from %s to %s as well", m.Source, m.Target)
		}
	}
}

func TestPlanBatches(t *testing.T) {
	actual := placed(t, "a")
	sizes := map[int32]Size{}
	for p := range int32(len(actual)) {
		sizes[p] = Size{Rows: 100}
	}
	p, err := MakePlan(actual, 1, infos("a", "b"), router.RingConfig{}, sizes, PlanOptions{MaxBatch: 300, MaxBatchRows: 25_000})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range p.Moves {
		if len(m.Partitions) > 250 || m.Size.Rows > 25_000 || m.Source != "a" || m.Target != "b" {
			t.Errorf("move %s→%s of %d partitions, %d rows breaks the batch limits", m.Source, m.Target, len(m.Partitions), m.Size.Rows)
		}
		if !slices.IsSorted(m.Partitions) {
			t.Error("a move's partitions are not in order")
		}
	}
	if len(p.Moves) < 8 {
		t.Errorf("%d moves for ~2048 partitions in batches of 250", len(p.Moves))
	}
}

func TestPlanRefusesWhatItCannotPlace(t *testing.T) {
	actual := placed(t, "a", "b")
	drained := infos("a", "b")
	drained[0].Draining, drained[1].Draining = true, true
	for name, c := range map[string]struct {
		actual []string
		shards []ShardInfo
		want   string
	}{
		"unknown owner": {actual, infos("a"), "not a registered shard"},
		"all draining":  {actual, drained, "no active shard"},
		"twice":         {actual, infos("a", "b", "a"), "listed twice"},
		"empty map":     {nil, infos("a"), "empty"},
		"bad weight":    {actual, []ShardInfo{{Name: "a", Weight: 0}, {Name: "b", Weight: 1}}, "weight"},
	} {
		_, err := MakePlan(c.actual, 1, c.shards, router.RingConfig{}, nil, PlanOptions{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want one saying %q", name, err, c.want)
		}
	}
}

func TestEstimate(t *testing.T) {
	d := Estimate(Size{Rows: 200_000}, 4, 2, 100_000, 0)
	if got := fmt.Sprint(d); got != "1s" {
		t.Errorf("200k rows at 100k/s on 2 streams: %s, want 1s", got)
	}
}
