package shards

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/shardgate/shardgate/internal/versioning"
)

func TestItemRoundTrip(t *testing.T) {
	t.Parallel()
	s := newShard(t, 9)
	ctx := testCtx(t)
	putUsers(t, s, 9, "alice")

	values := []struct{ name, json string }{
		{"object", `{ "title" : "x",  "n": [1,2] }`},
		{"array", `[1, "two", {"three": 3}]`},
		{"string", `"hello"`},
		{"number", `42`},
		{"null", `null`},
	}
	for _, v := range values {
		t.Run(v.name, func(t *testing.T) {
			key := "k-" + v.name
			ver, err := s.PutItem(ctx, 9, "alice", "docs", key, []byte(v.json), nil)
			if err != nil || ver != 1 {
				t.Fatalf("PutItem = %d, %v", ver, err)
			}
			it, err := s.GetItem(ctx, 9, "alice", "docs", key)
			if err != nil {
				t.Fatalf("GetItem: %v", err)
			}
			if it.UserID != "alice" || it.Collection != "docs" || it.Key != key || it.Partition != 9 || it.Version != 1 ||
				it.CreatedAt.IsZero() || it.UpdatedAt.Before(it.CreatedAt) {
				t.Fatalf("GetItem = %+v", it)
			}
			if !jsonEqual(t, it.Value, []byte(v.json)) {
				t.Fatalf("value = %s, want %s", it.Value, v.json)
			}
			ver, err = s.PutItem(ctx, 9, "alice", "docs", key, []byte(`{"v":2}`), nil)
			if err != nil || ver != 2 {
				t.Fatalf("second PutItem = %d, %v", ver, err)
			}
		})
	}

	// Same key in another collection or for another user is another item.
	if _, err := s.GetItem(ctx, 9, "alice", "other", "k-object"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("GetItem(other collection) err = %v", err)
	}
	if _, err := s.GetItem(ctx, 9, "bob", "docs", "k-object"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("GetItem(other user) err = %v", err)
	}
	if err := s.DeleteItem(ctx, 9, "alice", "docs", "k-object", nil); err != nil {
		t.Fatalf("DeleteItem: %v", err)
	}
	if _, err := s.GetItem(ctx, 9, "alice", "docs", "k-object"); !errors.Is(err, versioning.ErrNotFound) {
		t.Fatalf("GetItem after delete err = %v", err)
	}
	wantErr(t, s.DeleteItem(ctx, 9, "alice", "docs", "k-object", nil), versioning.ErrNotFound)
}

func TestItemExpected(t *testing.T) {
	t.Parallel()
	s := newShard(t, 9)
	ctx := testCtx(t)
	putUsers(t, s, 9, "alice")
	const (
		put = iota
		del
	)
	// "existing" is at version 2 before every case.
	tests := []struct {
		name        string
		op          int
		key         string
		expected    *int64
		wantVersion int64 // for a successful put
		wantErr     error // nil, versioning.ErrNotFound or versioning.ErrConflict
		wantCurrent int64
	}{
		{"put create missing", put, "new", ver(0), 1, nil, 0},
		{"put create existing", put, "existing", ver(0), 0, versioning.ErrConflict, 2},
		{"put at version", put, "existing", ver(2), 3, nil, 0},
		{"put stale version", put, "existing", ver(1), 0, versioning.ErrConflict, 2},
		{"put missing at version", put, "new", ver(1), 0, versioning.ErrConflict, 0},
		{"delete unconditional", del, "existing", nil, 0, nil, 0},
		{"delete at version", del, "existing", ver(2), 0, nil, 0},
		{"delete stale version", del, "existing", ver(1), 0, versioning.ErrConflict, 2},
		{"delete must not exist, exists", del, "existing", ver(0), 0, versioning.ErrConflict, 2},
		{"delete missing", del, "new", nil, 0, versioning.ErrNotFound, 0},
		{"delete missing, must not exist", del, "new", ver(0), 0, versioning.ErrNotFound, 0},
		{"delete missing at version", del, "new", ver(3), 0, versioning.ErrConflict, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Tombstones go too: each case starts from keys that never existed.
			exec(t, s, `TRUNCATE items, outbox, item_tombstones`)
			for range 2 {
				if _, err := s.PutItem(ctx, 9, "alice", "c", "existing", []byte(`1`), nil); err != nil {
					t.Fatal(err)
				}
			}
			before := countRows(t, s)
			_, seq := eventsAfter(t, s, 0)

			var (
				v   int64
				err error
			)
			if tc.op == put {
				v, err = s.PutItem(ctx, 9, "alice", "c", tc.key, []byte(`2`), tc.expected)
			} else {
				err = s.DeleteItem(ctx, 9, "alice", "c", tc.key, tc.expected)
			}
			switch tc.wantErr {
			case versioning.ErrConflict:
				wantConflict(t, err, *tc.expected, tc.wantCurrent)
			case versioning.ErrNotFound:
				wantErr(t, err, versioning.ErrNotFound)
			default:
				if err != nil {
					t.Fatalf("err = %v", err)
				}
			}
			evs, _ := eventsAfter(t, s, seq)
			if tc.wantErr != nil {
				if after := countRows(t, s); after != before {
					t.Fatalf("a refused write changed rows: %+v → %+v", before, after)
				}
				return
			}
			var want event
			if tc.op == put {
				if v != tc.wantVersion {
					t.Fatalf("version = %d, want %d", v, tc.wantVersion)
				}
				want = event{9, "alice", "item", "c/" + tc.key, "upsert", v, "2"}
				if it, err := s.GetItem(ctx, 9, "alice", "c", tc.key); err != nil || it.Version != v || string(it.Value) != "2" {
					t.Fatalf("GetItem = %+v, %v", it, err)
				}
			} else {
				want = event{9, "alice", "item", "c/" + tc.key, "delete", 3, ""}
				if _, err := s.GetItem(ctx, 9, "alice", "c", tc.key); !errors.Is(err, versioning.ErrNotFound) {
					t.Fatalf("GetItem after delete: %v", err)
				}
			}
			if len(evs) != 1 || evs[0] != want {
				t.Fatalf("events = %+v, want [%+v]", evs, want)
			}
		})
	}
}

func TestListItems(t *testing.T) {
	t.Parallel()
	s := newShard(t, 9)
	ctx := testCtx(t)
	putUsers(t, s, 9, "alice", "bob", "alic")
	// In byte order ("B" < "X" < "_" < "a" < "é" < U+10FFFF), as Go sorts strings.
	keys := []string{"", "%", "B", "_", "a", "a%", "a%b", "aXc", "a_", "a_c", "ab", "abc", "abd", "b", "é", "éa", "\U0010FFFF", "\U0010FFFFz"}
	if !slices.IsSorted(keys) {
		t.Fatal("keys must be listed in byte order")
	}
	for _, k := range keys {
		if _, err := s.PutItem(ctx, 9, "alice", "c", k, []byte(`{"k":`+quote(k)+`}`), nil); err != nil {
			t.Fatal(err)
		}
	}
	// Noise that must never show up.
	for _, noise := range []struct{ user, coll, key string }{{"alice", "d", "a"}, {"bob", "c", "a"}, {"alic", "c", "a"}} {
		if _, err := s.PutItem(ctx, 9, noise.user, noise.coll, noise.key, []byte(`0`), nil); err != nil {
			t.Fatal(err)
		}
	}

	tests := []struct {
		name          string
		prefix, after string
		limit         int
		want          []string
	}{
		{"all", "", "", 100, keys},
		{"first page", "", "", 3, []string{"", "%", "B"}},
		{"after", "", "a_", 3, []string{"a_c", "ab", "abc"}},
		{"after the last", "", "\U0010FFFFz", 10, nil},
		{"prefix a", "a", "", 100, []string{"a", "a%", "a%b", "aXc", "a_", "a_c", "ab", "abc", "abd"}},
		{"percent is literal", "a%", "", 100, []string{"a%", "a%b"}},
		{"underscore is literal", "a_", "", 100, []string{"a_", "a_c"}},
		{"lone percent", "%", "", 100, []string{"%"}},
		{"prefix ab", "ab", "", 100, []string{"ab", "abc", "abd"}},
		{"prefix and after inside it", "ab", "ab", 100, []string{"abc", "abd"}},
		{"prefix and after before it", "ab", "a%", 100, []string{"ab", "abc", "abd"}},
		{"prefix and after past it", "ab", "b", 100, nil},
		{"prefix limit", "a", "a%b", 2, []string{"aXc", "a_"}},
		{"case matters", "A", "", 100, nil},
		{"multibyte prefix", "é", "", 100, []string{"é", "éa"}},
		{"max rune prefix", "\U0010FFFF", "", 100, []string{"\U0010FFFF", "\U0010FFFFz"}},
		{"no match", "zz", "", 100, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			items, err := s.ListItems(ctx, 9, "alice", "c", tc.prefix, tc.after, tc.limit)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, it := range items {
				got = append(got, it.Key)
				if it.UserID != "alice" || it.Collection != "c" || it.Partition != 9 || it.Version != 1 ||
					!jsonEqual(t, it.Value, []byte(`{"k":`+quote(it.Key)+`}`)) {
					t.Fatalf("item %+v", it)
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("keys = %q, want %q", got, tc.want)
			}
		})
	}

	t.Run("paging", func(t *testing.T) {
		for _, prefix := range []string{"", "a"} {
			var got []string
			after := ""
			for {
				page, err := s.ListItems(ctx, 9, "alice", "c", prefix, after, 2)
				if err != nil {
					t.Fatal(err)
				}
				for _, it := range page {
					got = append(got, it.Key)
				}
				if len(page) < 2 {
					break
				}
				after = page[len(page)-1].Key
			}
			var want []string
			for _, k := range keys {
				if strings.HasPrefix(k, prefix) {
					want = append(want, k)
				}
			}
			if !slices.Equal(got, want) {
				t.Fatalf("prefix %q pages = %q, want %q", prefix, got, want)
			}
		}
	})

	if _, err := s.ListItems(ctx, 9, "alice", "c", "", "", 0); err == nil {
		t.Fatal("ListItems accepted limit 0")
	}
}

func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"', '\\':
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	b.WriteByte('"')
	return b.String()
}

func TestPrefixEnd(t *testing.T) {
	t.Parallel()
	tests := []struct {
		prefix string
		want   string
		ok     bool
	}{
		{"", "", false},
		{"a", "b", true},
		{"abc", "abd", true},
		{"a%", "a&", true},
		{"z\x7f", "z\u0080", true},
		{"é", "ê", true},
		{"a\uD7FF", "a\uE000", true},
		{"a\U0010FFFF", "b", true},
		{"\U0010FFFF\U0010FFFF", "", false},
		{"a\xff", "", false},
	}
	for _, tc := range tests {
		got, ok := prefixEnd(tc.prefix)
		if got != tc.want || ok != tc.ok {
			t.Errorf("prefixEnd(%q) = %q, %v; want %q, %v", tc.prefix, got, ok, tc.want, tc.ok)
		}
		if !ok {
			continue
		}
		// Every extension of the prefix sorts before the bound.
		for _, ext := range []string{"", "\x01", "zzz", "\U0010FFFF\U0010FFFF"} {
			if k := tc.prefix + ext; k >= got {
				t.Errorf("prefixEnd(%q) = %q, but %q is not below it", tc.prefix, got, k)
			}
		}
	}
}

// Items belong to an existing user; a put for anyone else writes nothing.
func TestPutItemNeedsUser(t *testing.T) {
	t.Parallel()
	s := newShard(t, 9)
	ctx := testCtx(t)
	for _, expected := range []*int64{nil, ver(0), ver(1)} {
		_, err := s.PutItem(ctx, 9, "ghost", "c", "k", []byte(`1`), expected)
		wantErr(t, err, ErrUserNotFound)
	}
	if n := countRows(t, s); n != (rowCounts{}) {
		t.Fatalf("rows after refused puts: %+v", n)
	}
}
