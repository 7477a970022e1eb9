package importer

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/cespare/xxhash/v2"
	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// VerifyOptions tunes Verify.
type VerifyOptions struct {
	MaxJSONBytes int // 0: DefaultMaxJSONBytes
	MaxDiffs     int // differing keys named per table; 0: 10
}

// VerifyTable compares one mapped table with Shardgate.
type VerifyTable struct {
	Name   string `json:"name"`
	Entity Entity `json:"entity"`
	// Rows are the source rows that map to a valid entity (Invalid the
	// others, which the import rejects and Verify skips).
	Rows    int64 `json:"rows"`
	Invalid int64 `json:"invalid"`
	// Matched rows hold the same value in Shardgate; Missing are absent,
	// Different hold another value.
	Matched   int64 `json:"matched"`
	Missing   int64 `json:"missing"`
	Different int64 `json:"different"`
	// Order-independent hashes of the mapped rows (key and value) on both
	// sides: equal when every row matches.
	SourceHash string   `json:"source_hash"`
	TargetHash string   `json:"target_hash"`
	Diffs      []string `json:"diffs,omitempty"`
}

// VerifyReport is Verify's answer.
type VerifyReport struct {
	Tables []VerifyTable `json:"tables"`
	// Per entity, the rows Shardgate holds in the key space of the import
	// (Scope) beyond those the source maps: rows deleted at the source and
	// not followed, or written through the API. Data outside the scope
	// (the cluster's own, from before the import) is not counted.
	Extra map[Entity]int64 `json:"extra"`
	Scope VerifyScope      `json:"scope"`
	OK    bool             `json:"ok"`
}

// VerifyScope is the key space Verify counts extra rows in: what the
// mapping, applied to the source's rows, can have written.
type VerifyScope struct {
	// UserPrefix is the longest common prefix of the mapped user IDs
	// (e.g. "acct-" for 'acct-' || id): extra users are the users whose ID
	// starts with it, extra items their items in Collections. Empty: the
	// mapped IDs share no prefix, and users and items are not checked
	// for extras (UsersChecked false).
	UserPrefix   string   `json:"user_prefix"`
	UsersChecked bool     `json:"users_checked"`
	Collections  []string `json:"collections,omitempty"`
	// Namespaces the source maps config into: extra config entries are
	// counted in them.
	Namespaces []string `json:"namespaces,omitempty"`
}

// commonPrefix is the longest common prefix of a and b.
func commonPrefix(a, b string) string {
	n := min(len(a), len(b))
	for i := 0; i < n; i++ {
		if a[i] != b[i] {
			return a[:i]
		}
	}
	return a[:n]
}

// rowHash hashes a mapped row: its key and its JSON as jsonb prints it.
func rowHash(e Entity, r *Record) uint64 {
	d := xxhash.New()
	d.WriteString(string(e))
	for _, s := range []string{r.UserID, r.Collection, r.Namespace, r.ItemKey, r.JSON} {
		d.Write([]byte{0})
		d.WriteString(s)
	}
	return d.Sum64()
}

// Verify compares every mapped row of the source (read in one snapshot)
// with Shardgate's: per table, counts and an order-independent content
// hash on both sides, and the first differing keys by name.
func Verify(ctx context.Context, cl *Cluster, m *Mapping, sourceDSN string, opts VerifyOptions) (*VerifyReport, error) {
	if opts.MaxJSONBytes <= 0 {
		opts.MaxJSONBytes = DefaultMaxJSONBytes
	}
	if opts.MaxDiffs <= 0 {
		opts.MaxDiffs = 10
	}
	src, err := connectSource(ctx, sourceDSN)
	if err != nil {
		return nil, err
	}
	defer src.Close(context.Background())
	tx, err := src.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	defer tx.Rollback(context.Background())

	rep := &VerifyReport{OK: true, Extra: map[Entity]int64{}}
	// The mapped keys Shardgate holds: what it holds in the key space
	// beyond them is extra (counting them, not all mapped keys, keeps a
	// missing row from hiding an extra one).
	present := map[Entity]map[uint64]struct{}{EntityUser: {}, EntityItem: {}, EntityConfig: {}}
	namespaces, collections := map[string]bool{}, map[string]bool{}
	var prefix string
	havePrefix := false
	for i := range m.Tables {
		st, err := describe(ctx, tx, &m.Tables[i])
		if err != nil {
			return nil, err
		}
		vt := VerifyTable{Name: st.Name, Entity: st.Entity}
		var srcSum, dstSum uint64
		diff := func(r *Record, what string) {
			if len(vt.Diffs) < opts.MaxDiffs {
				vt.Diffs = append(vt.Diffs, fmt.Sprintf("row (%s)=(%s): %s %s", joinComma(st.PrimaryKey), joinComma(r.Key), describeRecord(st.Entity, r), what))
			}
		}
		vt.Invalid, err = eachBatch(ctx, tx, st, opts.MaxJSONBytes, cl.Partitions(), 2000, func(recs []Record) error {
			for j := range recs {
				srcSum += rowHash(st.Entity, &recs[j])
				switch r := &recs[j]; st.Entity {
				case EntityConfig:
					namespaces[r.Namespace] = true
				default:
					if st.Entity == EntityItem {
						collections[r.Collection] = true
					}
					if !havePrefix {
						prefix, havePrefix = r.UserID, true
					} else if !strings.HasPrefix(r.UserID, prefix) {
						prefix = commonPrefix(prefix, r.UserID)
					}
				}
			}
			vt.Rows += int64(len(recs))
			return compareBatch(ctx, cl, st.Entity, recs, func(r *Record, got []byte, found bool) {
				if found {
					present[st.Entity][recordKey(st.Entity, r)] = struct{}{}
				}
				switch {
				case !found:
					vt.Missing++
					diff(r, "is missing in Shardgate")
				case string(got) != r.JSON:
					vt.Different++
					dstSum += rowHash(st.Entity, &Record{UserID: r.UserID, Collection: r.Collection, Namespace: r.Namespace, ItemKey: r.ItemKey, JSON: string(got)})
					diff(r, fmt.Sprintf("differs: source %s, Shardgate %s", clip(r.JSON), clip(string(got))))
				default:
					vt.Matched++
					dstSum += rowHash(st.Entity, r)
				}
			})
		})
		if err != nil {
			return nil, err
		}
		vt.SourceHash, vt.TargetHash = fmt.Sprintf("%016x", srcSum), fmt.Sprintf("%016x", dstSum)
		if vt.Missing > 0 || vt.Different > 0 {
			rep.OK = false
		}
		rep.Tables = append(rep.Tables, vt)
	}

	// Extras: rows in the import's key space the source does not map.
	mapped := map[Entity]int64{}
	for e, ks := range present {
		mapped[e] = int64(len(ks))
	}
	for c := range collections {
		rep.Scope.Collections = append(rep.Scope.Collections, c)
	}
	for n := range namespaces {
		rep.Scope.Namespaces = append(rep.Scope.Namespaces, n)
	}
	slices.Sort(rep.Scope.Collections)
	slices.Sort(rep.Scope.Namespaces)
	rep.Scope.UserPrefix, rep.Scope.UsersChecked = prefix, prefix != ""
	held := map[Entity]int64{}
	if rep.Scope.UsersChecked {
		for _, sh := range cl.Shards() {
			u, it, err := sh.CountKeySpace(ctx, prefix, rep.Scope.Collections)
			if err != nil {
				return nil, err
			}
			held[EntityUser] += u
			held[EntityItem] += it
		}
	}
	if len(rep.Scope.Namespaces) > 0 {
		if held[EntityConfig], err = cl.Catalog.CountConfig(ctx, rep.Scope.Namespaces); err != nil {
			return nil, err
		}
	}
	for e, n := range held {
		if hasEntity(m, e) && n > mapped[e] {
			rep.Extra[e] = n - mapped[e]
			rep.OK = false
		}
	}
	return rep, nil
}

func hasEntity(m *Mapping, e Entity) bool {
	for _, t := range m.Tables {
		if t.Entity == e {
			return true
		}
	}
	return false
}

// eachBatch reads the mapped rows of st in tx and hands the valid ones to
// fn in batches of size, with their partitions; it returns how many rows
// were invalid.
func eachBatch(ctx context.Context, tx pgx.Tx, st *sourceTable, maxJSON, partitions, size int, fn func([]Record) error) (invalid int64, err error) {
	rows, err := tx.Query(ctx, st.selectSQL(false))
	if err != nil {
		return 0, fmt.Errorf("table %s: read: %w", st.Name, err)
	}
	defer rows.Close()
	var batch []Record
	for rows.Next() {
		r, bad := st.scanRecord(rows, maxJSON)
		if bad != nil {
			invalid++
			continue
		}
		if st.Entity != EntityConfig {
			r.Partition = router.Partition(r.UserID, partitions)
		}
		batch = append(batch, r)
		if len(batch) == size {
			if err := fn(batch); err != nil {
				return invalid, err
			}
			batch = nil
		}
	}
	if err := rows.Err(); err != nil {
		return invalid, fmt.Errorf("table %s: read: %w", st.Name, err)
	}
	if len(batch) > 0 {
		if err := fn(batch); err != nil {
			return invalid, err
		}
	}
	return invalid, nil
}

// compareBatch looks the records up in Shardgate and calls seen for each
// with what Shardgate holds.
func compareBatch(ctx context.Context, cl *Cluster, e Entity, recs []Record, seen func(r *Record, got []byte, found bool)) error {
	if e == EntityConfig {
		ns := make([]string, len(recs))
		keys := make([]string, len(recs))
		for i, r := range recs {
			ns[i], keys[i] = r.Namespace, r.ItemKey
		}
		got, err := cl.Catalog.LookupConfig(ctx, ns, keys)
		if err != nil {
			return err
		}
		for i := range recs {
			v, ok := got[[2]string{recs[i].Namespace, recs[i].ItemKey}]
			seen(&recs[i], v, ok)
		}
		return nil
	}
	return cl.route(ctx, recs, func(sh *shards.Shard, batch []Record) error {
		if e == EntityUser {
			refs := make([]shards.UserRef, len(batch))
			for i, r := range batch {
				refs[i] = shards.UserRef{Partition: r.Partition, UserID: r.UserID}
			}
			got, err := sh.LookupUsers(ctx, refs)
			if err != nil {
				return err
			}
			for i := range batch {
				v, ok := got[refs[i]]
				seen(&batch[i], v, ok)
			}
			return nil
		}
		refs := make([]shards.ItemRef, len(batch))
		for i, r := range batch {
			refs[i] = shards.ItemRef{Partition: r.Partition, UserID: r.UserID, Collection: r.Collection, Key: r.ItemKey}
		}
		got, err := sh.LookupItems(ctx, refs)
		if err != nil {
			return err
		}
		for i := range batch {
			v, ok := got[refs[i]]
			seen(&batch[i], v, ok)
		}
		return nil
	})
}
