package router

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/buraksezer/consistent"
)

func TestPartitionMatchesConsistent(t *testing.T) {
	for _, p := range []int{1, 7, 271, DefaultPartitions} {
		c := consistent.New(nil, consistent.Config{PartitionCount: p, Hasher: Hasher{}})
		for i := range 5000 {
			id := fmt.Sprintf("user-%d", i)
			if got, want := Partition(id, p), c.FindPartitionID([]byte(id)); int(got) != want {
				t.Fatalf("Partition(%q, %d) = %d, consistent says %d", id, p, got, want)
			}
		}
	}
}

func shardNames(n int) []string {
	s := make([]string, n)
	for i := range s {
		s[i] = fmt.Sprintf("shard-%d", i)
	}
	return s
}

func TestRingBalance(t *testing.T) {
	// Bounded loads cap the top; the bottom depends on the hash spread,
	// which widens with more shards per partition.
	for _, tc := range []struct {
		n   int
		tol float64
	}{{2, 0.06}, {3, 0.06}, {4, 0.06}, {8, 0.12}, {16, 0.12}} {
		n := tc.n
		r, err := NewRing(shardNames(n), RingConfig{})
		if err != nil {
			t.Fatal(err)
		}
		avg := float64(DefaultPartitions) / float64(n)
		for s, c := range r.Counts() {
			if dev := math.Abs(float64(c)-avg) / avg; dev > tc.tol {
				t.Errorf("%d shards: %s owns %d partitions, %.1f%% off the average %.0f", n, s, c, dev*100, avg)
			}
		}
	}
}

func TestRingIsDeterministicAndOrderFree(t *testing.T) {
	a, err := NewRing([]string{"a", "b", "c"}, RingConfig{PartitionCount: 512})
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewRing([]string{"c", "a", "b"}, RingConfig{PartitionCount: 512})
	if err != nil {
		t.Fatal(err)
	}
	for p := range int32(512) {
		if a.Owner(p) != b.Owner(p) {
			t.Fatalf("partition %d: %s vs %s depending on member order", p, a.Owner(p), b.Owner(p))
		}
	}
}

func TestRingMovesLittleWhenAShardJoins(t *testing.T) {
	before, err := NewRing(shardNames(4), RingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	after, err := NewRing(shardNames(5), RingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	moved := 0
	for p := range int32(DefaultPartitions) {
		if before.Owner(p) != after.Owner(p) {
			moved++
		}
	}
	// The ideal is 1/5 of the partitions; bounded loads cost some extra.
	if frac := float64(moved) / DefaultPartitions; frac > 0.5 {
		t.Errorf("adding a fifth shard moved %.0f%% of partitions", frac*100)
	}
	t.Logf("adding a fifth shard moves %d of %d partitions", moved, DefaultPartitions)
}

func TestRingRejectsWhatTheLibraryPanicsOn(t *testing.T) {
	cases := []struct {
		name   string
		shards []string
		cfg    RingConfig
	}{
		{"nil shards", nil, RingConfig{}},
		{"empty shards", []string{}, RingConfig{}},
		{"fewer partitions than shards", []string{"a", "b", "c"}, RingConfig{PartitionCount: 2}},
		{"replication factor 1", []string{"a"}, RingConfig{ReplicationFactor: 1}},
		{"replication factor negative", []string{"a"}, RingConfig{ReplicationFactor: -3}},
		{"load 1 with uneven split", []string{"a", "b", "c"}, RingConfig{PartitionCount: 10, Load: 1}},
		{"load below 1", []string{"a", "b"}, RingConfig{PartitionCount: 10, Load: 0.5}},
		{"load NaN", []string{"a", "b"}, RingConfig{Load: math.NaN()}},
		{"partition count negative", []string{"a"}, RingConfig{PartitionCount: -1}},
		{"duplicate shard", []string{"a", "a"}, RingConfig{}},
		{"empty name", []string{""}, RingConfig{}},
		{"name with separator", []string{"a#1"}, RingConfig{}},
		{"upper-case name", []string{"Shard"}, RingConfig{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := NewRing(c.shards, c.cfg)
			if !errors.Is(err, ErrInvalidRing) {
				t.Fatalf("NewRing = %v, %v; want ErrInvalidRing", r, err)
			}
		})
	}
}

func TestRingLoadOneWithEvenSplit(t *testing.T) {
	r, err := NewRing([]string{"a", "b"}, RingConfig{PartitionCount: 10, Load: 1})
	if err != nil {
		t.Fatal(err)
	}
	if c := r.Counts(); c["a"] != 5 || c["b"] != 5 {
		t.Fatalf("counts %v, want 5 each", c)
	}
}

// Shard "a" virtual node 12 and shard "a1" virtual node 2 must not share a
// ring position: without the separator both would hash "a12".
func TestMemberNamesDoNotCollide(t *testing.T) {
	a, a1 := member("a"), member("a1")
	seen := map[string]string{}
	for _, m := range []member{a, a1} {
		for i := range 100 {
			key := fmt.Sprintf("%s%d", m.String(), i)
			if other, dup := seen[key]; dup {
				t.Fatalf("virtual node %q of %s collides with %s", key, m, other)
			}
			seen[key] = string(m)
		}
	}
}

func TestTableAndRouter(t *testing.T) {
	var zero Router
	if _, _, ok := zero.Lookup("u"); ok {
		t.Fatal("zero Router found a shard")
	}
	ring, err := NewRing([]string{"a", "b"}, RingConfig{PartitionCount: 64})
	if err != nil {
		t.Fatal(err)
	}
	t1, err := NewTable(1, ring.Map())
	if err != nil {
		t.Fatal(err)
	}
	r := New(t1)
	p, s, ok := r.Lookup("alice")
	if !ok || p != Partition("alice", 64) || s != ring.Owner(p) {
		t.Fatalf("Lookup = %d %q %v", p, s, ok)
	}
	if got, _ := r.ShardOf(p); got != s {
		t.Fatalf("ShardOf(%d) = %q, want %q", p, got, s)
	}
	if _, ok := r.ShardOf(64); ok {
		t.Fatal("ShardOf out of range succeeded")
	}
	if _, ok := r.ShardOf(-1); ok {
		t.Fatal("ShardOf(-1) succeeded")
	}

	// A newer table wins; an older one never replaces it.
	owners := ring.Map()
	owners[p] = "c"
	t3, err := NewTable(3, owners)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Store(t3) {
		t.Fatal("newer table refused")
	}
	if _, s, _ := r.Lookup("alice"); s != "c" {
		t.Fatalf("after Store, alice on %q, want c", s)
	}
	if r.Store(t1) {
		t.Fatal("older table installed over a newer one")
	}
	if got := t3.Counts()["c"]; got != 1 {
		t.Fatalf("Counts[c] = %d, want 1", got)
	}
	if got := t3.Shards(); len(got) != 3 || got[2] != "c" {
		t.Fatalf("Shards = %v", got)
	}
}

func TestNewTableRejectsBadMaps(t *testing.T) {
	if _, err := NewTable(1, nil); err == nil {
		t.Error("empty map accepted")
	}
	if _, err := NewTable(1, []string{"a", ""}); err == nil {
		t.Error("partition without owner accepted")
	}
}

// Ten thousand users over four shards land within ±10% of even.
func TestUsersSpreadEvenly(t *testing.T) {
	ring, err := NewRing(shardNames(4), RingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	tbl, err := NewTable(1, ring.Map())
	if err != nil {
		t.Fatal(err)
	}
	r := New(tbl)
	counts := map[string]int{}
	for i := range 10000 {
		_, s, _ := r.Lookup(fmt.Sprintf("user-%d", i))
		counts[s]++
	}
	for s, c := range counts {
		if c < 2250 || c > 2750 {
			t.Errorf("%s holds %d of 10000 users, outside 2500±10%%", s, c)
		}
	}
}

func BenchmarkLookup(b *testing.B) {
	ring, err := NewRing(shardNames(4), RingConfig{})
	if err != nil {
		b.Fatal(err)
	}
	tbl, err := NewTable(1, ring.Map())
	if err != nil {
		b.Fatal(err)
	}
	r := New(tbl)
	ids := make([]string, 1024)
	for i := range ids {
		ids[i] = fmt.Sprintf("user-%d@example.com", i)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, _, ok := r.Lookup(ids[i&1023]); !ok {
			b.Fatal("no table")
		}
	}
}

func TestLookupDoesNotAllocate(t *testing.T) {
	ring, _ := NewRing(shardNames(4), RingConfig{})
	tbl, _ := NewTable(1, ring.Map())
	r := New(tbl)
	if n := testing.AllocsPerRun(1000, func() { r.Lookup("some-user-id") }); n != 0 {
		t.Fatalf("Lookup allocates %.1f times per call", n)
	}
}

// Place keeps NewRing's map for equal weights inside the tolerance (clusters
// created before weights keep their placement) and lands every shard within
// BalanceTolerance of its weighted share.
func TestPlaceBalancesWeightedShares(t *testing.T) {
	cases := []struct {
		name   string
		shards []ShardWeight
	}{
		{"four equal", []ShardWeight{{"shard-0", 1}, {"shard-1", 1}, {"shard-2", 1}, {"shard-3", 1}}},
		{"a fifth", []ShardWeight{{"shard-0", 1}, {"shard-1", 1}, {"shard-2", 1}, {"shard-3", 1}, {"shard-4", 1}}},
		{"a fifth of weight 2", []ShardWeight{{"shard-0", 1}, {"shard-1", 1}, {"shard-2", 1}, {"shard-3", 1}, {"shard-4", 2}}},
		{"mixed", []ShardWeight{{"a", 3}, {"b", 1}, {"c", 2}, {"d", 1}, {"e", 5}}},
		{"sixteen", func() []ShardWeight {
			var s []ShardWeight
			for i := range 16 {
				s = append(s, ShardWeight{fmt.Sprintf("s%02d", i), 1 + i%3})
			}
			return s
		}()},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			owners, err := Place(c.shards, RingConfig{})
			if err != nil {
				t.Fatal(err)
			}
			total := 0
			for _, s := range c.shards {
				total += s.Weight
			}
			counts := countOwners(owners)
			for _, s := range c.shards {
				lo, hi := Bounds(len(owners), s.Weight, total)
				if n := counts[s.Name]; n < lo || n > hi {
					t.Errorf("%s (weight %d) owns %d partitions, outside [%d, %d]", s.Name, s.Weight, n, lo, hi)
				}
			}
			// Order of the input does not matter.
			rev := append([]ShardWeight(nil), c.shards...)
			slices.Reverse(rev)
			again, err := Place(rev, RingConfig{})
			if err != nil || !slices.Equal(owners, again) {
				t.Fatalf("placement depends on input order (err %v)", err)
			}
		})
	}
}

func TestPlaceRejectsBadWeights(t *testing.T) {
	for _, w := range []int{0, -1, MaxWeight + 1} {
		if _, err := Place([]ShardWeight{{"a", w}}, RingConfig{}); !errors.Is(err, ErrInvalidRing) {
			t.Errorf("weight %d: err %v, want ErrInvalidRing", w, err)
		}
	}
	// More members than partitions.
	if _, err := Place([]ShardWeight{{"a", 3}}, RingConfig{PartitionCount: 2}); !errors.Is(err, ErrInvalidRing) {
		t.Errorf("3 members on 2 partitions: err %v, want ErrInvalidRing", err)
	}
}

// Adding a shard moves about its share and nothing else needlessly.
func TestPlaceMovesAboutTheNewShare(t *testing.T) {
	four := []ShardWeight{{"shard-0", 1}, {"shard-1", 1}, {"shard-2", 1}, {"shard-3", 1}}
	before, err := Place(four, RingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	after, err := Place(append(four, ShardWeight{"shard-4", 1}), RingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	moved := 0
	for p := range before {
		if before[p] != after[p] {
			moved++
		}
	}
	ideal := DefaultPartitions / 5
	if moved > ideal*11/10 {
		t.Errorf("adding a fifth shard moves %d partitions; its share is %d", moved, ideal)
	}
	t.Logf("adding a fifth shard moves %d of %d partitions (share %d)", moved, DefaultPartitions, ideal)
}
