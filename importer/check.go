package importer

import (
	"context"
	"fmt"
	"math"
	"sort"

	"github.com/cespare/xxhash/v2"
	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/router"
)

// CheckOptions tunes Check. The zero value checks against a cluster of
// router.DefaultPartitions partitions with the server's JSON limit.
type CheckOptions struct {
	MaxJSONBytes int // 0: DefaultMaxJSONBytes
	Partitions   int // 0: router.DefaultPartitions
	// Owner names partition p's shard, to report the spread per shard; nil
	// reports partitions only.
	Owner func(p int32) string
	// MaxErrors bounds the errors listed per table (all are counted); 0: 10.
	MaxErrors int
}

func (o *CheckOptions) defaults() {
	if o.MaxJSONBytes <= 0 {
		o.MaxJSONBytes = DefaultMaxJSONBytes
	}
	if o.Partitions <= 0 {
		o.Partitions = router.DefaultPartitions
	}
	if o.MaxErrors <= 0 {
		o.MaxErrors = 10
	}
}

// TableReport is what Check found for one mapped table.
type TableReport struct {
	Name   string `json:"name"`
	Source string `json:"source"`
	Entity Entity `json:"entity"`
	// Rows counts the rows that map to a valid entity; Invalid the others.
	Rows    int64 `json:"rows"`
	Invalid int64 `json:"invalid"`
	// Duplicates counts rows mapping to a key an earlier row (of any table
	// of the same entity) mapped to: the import keeps the last one.
	Duplicates int64 `json:"duplicates"`
	// MissingUsers counts items whose user no user table of the mapping has.
	MissingUsers int64 `json:"missing_users"`
	// Partitions touched, and the fewest and most rows in one of them.
	Partitions       int              `json:"partitions"`
	MinPartitionRows int64            `json:"min_partition_rows"`
	MaxPartitionRows int64            `json:"max_partition_rows"`
	PerShard         map[string]int64 `json:"per_shard,omitempty"`
	Errors           []string         `json:"errors,omitempty"`   // the mapping does not work, or sample bad rows
	Warnings         []string         `json:"warnings,omitempty"` // it works, but mind this
}

// CheckReport is Check's answer; OK means the import can start.
type CheckReport struct {
	Tables []TableReport `json:"tables"`
	// Problems of the source as a whole (its settings, the role's rights).
	Problems []string `json:"problems,omitempty"`
	OK       bool     `json:"ok"`
}

// Check validates m against the source database q (which it only reads,
// in one repeatable-read, read-only transaction): the tables, columns and
// expressions exist and have usable types, and every row maps to a valid
// entity with a unique key. It reports row counts and the partition spread
// the import would produce.
func Check(ctx context.Context, conn *pgx.Conn, m *Mapping, opts CheckOptions) (*CheckReport, error) {
	opts.defaults()
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	defer tx.Rollback(ctx)

	rep := &CheckReport{OK: true}
	rep.Problems = sourceProblems(ctx, tx)
	tables := make([]*sourceTable, len(m.Tables))
	for i := range m.Tables {
		t := &m.Tables[i]
		tr := TableReport{Name: t.Name, Source: t.Source, Entity: t.Entity}
		st, err := describe(ctx, tx, t)
		if err == nil {
			tr.Warnings = st.followWarnings()
			err = checkExprs(ctx, tx, st)
		}
		if err != nil {
			tr.Errors = append(tr.Errors, err.Error())
		} else {
			tables[i] = st
		}
		rep.Tables = append(rep.Tables, tr)
	}

	// Users first: items are checked against the users the mapping imports.
	hasUsers := false
	users := map[uint64]struct{}{}
	keys := map[Entity]map[uint64]struct{}{EntityUser: users, EntityItem: {}, EntityConfig: {}}
	for _, phase := range []Entity{EntityUser, EntityConfig, EntityItem} {
		for i, st := range tables {
			if st == nil || st.Entity != phase {
				continue
			}
			hasUsers = hasUsers || phase == EntityUser
			if err := checkRows(ctx, tx, st, &rep.Tables[i], opts, keys[phase], users, hasUsers); err != nil {
				rep.Tables[i].Errors = append(rep.Tables[i].Errors, err.Error())
			}
		}
	}
	for _, tr := range rep.Tables {
		if len(tr.Errors) > 0 || tr.Invalid > 0 || tr.MissingUsers > 0 {
			rep.OK = false
		}
	}
	if len(rep.Problems) > 0 {
		rep.OK = false
	}
	return rep, nil
}

// sourceProblems checks what the bulk and follow phases need of the source
// server: logical decoding, a free replication slot and sender, and a role
// that may replicate and create publications.
func sourceProblems(ctx context.Context, tx pgx.Tx) []string {
	var (
		walLevel              string
		slotsFree, sendersMax int
		replicate, create     bool
	)
	err := tx.QueryRow(ctx, `
		SELECT current_setting('wal_level'),
		       current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots),
		       current_setting('max_wal_senders')::int,
		       (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
		       has_database_privilege(current_database(), 'CREATE')`).Scan(&walLevel, &slotsFree, &sendersMax, &replicate, &create)
	if err != nil {
		return []string{fmt.Sprintf("source settings: %v", err)}
	}
	var out []string
	if walLevel != "logical" {
		out = append(out, fmt.Sprintf("the source's wal_level is %s: following changes needs logical (ALTER SYSTEM SET wal_level = logical, then restart the source)", walLevel))
	}
	if slotsFree < 1 {
		out = append(out, "the source has no free replication slot (raise max_replication_slots)")
	}
	if sendersMax < 1 {
		out = append(out, "the source allows no WAL sender (raise max_wal_senders)")
	}
	if !replicate {
		out = append(out, "the source role may not replicate (ALTER ROLE ... REPLICATION)")
	}
	if !create {
		out = append(out, "the source role may not create a publication in the database (GRANT CREATE ON DATABASE ...)")
	}
	return out
}

// followWarnings says what the follow phase cannot see in this table.
func (st *sourceTable) followWarnings() []string {
	switch {
	case st.replIdent == "n":
		return []string{"REPLICA IDENTITY NOTHING: updates and deletes cannot be followed (ALTER TABLE ... REPLICA IDENTITY FULL)"}
	case st.replIdent == "d" && !sameStrings(st.pk, st.PrimaryKey):
		return []string{"primary_key differs from the table's primary key, which is its replica identity: deletes are followed only if the mapped identity uses the replica identity's columns (or set REPLICA IDENTITY FULL)"}
	case st.replIdent == "i":
		return []string{"REPLICA IDENTITY USING INDEX: deletes are followed only if the mapped identity uses that index's columns"}
	}
	return nil
}

func sameStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

const (
	oidJSON   = 114
	oidJSONB  = 3802
	oidRecord = 2249
)

// checkExprs runs each expression of the mapping on its own (LIMIT 0), so
// an error names the field it is in, and checks profile_sql's type.
func checkExprs(ctx context.Context, tx pgx.Tx, st *sourceTable) error {
	for field, expr := range st.exprs() {
		q := fmt.Sprintf("SELECT (%s) FROM %s AS %s LIMIT 0", expr, st.ident, st.alias)
		if field == "where" {
			q = fmt.Sprintf("SELECT 1 FROM %s AS %s WHERE (%s) LIMIT 0", st.ident, st.alias, expr)
		}
		sp, err := tx.Begin(ctx)
		if err != nil {
			return err
		}
		rows, err := sp.Query(ctx, q)
		var oid uint32
		if err == nil {
			if fd := rows.FieldDescriptions(); len(fd) == 1 {
				oid = fd[0].DataTypeOID
			}
			rows.Close()
			err = rows.Err()
		}
		if err != nil {
			sp.Rollback(ctx)
			return fmt.Errorf("table %s: %s: %s: %v", st.Name, field, clip(expr), err)
		}
		if field == "profile_sql" && oid != oidJSON && oid != oidJSONB && oid != oidRecord {
			var typtype, name string
			if err := sp.QueryRow(ctx, `SELECT typtype::text, format_type(oid, NULL) FROM pg_type WHERE oid = $1`, oid).Scan(&typtype, &name); err != nil {
				sp.Rollback(ctx)
				return err
			}
			if typtype != "c" {
				sp.Rollback(ctx)
				return fmt.Errorf("table %s: profile_sql: type %s cannot be a JSON object (want json, jsonb or a row)", st.Name, name)
			}
		}
		if err := sp.Commit(ctx); err != nil {
			return err
		}
	}
	// The whole statement, as the import will run it.
	sp, err := tx.Begin(ctx)
	if err != nil {
		return err
	}
	defer sp.Rollback(ctx)
	rows, err := sp.Query(ctx, st.selectSQL(false)+" LIMIT 0")
	if err == nil {
		rows.Close()
		err = rows.Err()
	}
	if err != nil {
		return fmt.Errorf("table %s: %v", st.Name, err)
	}
	return nil
}

// recordKey identifies the Shardgate row r maps to, for duplicate checks.
func recordKey(e Entity, r *Record) uint64 {
	d := xxhash.New()
	switch e {
	case EntityUser:
		d.WriteString(r.UserID)
	case EntityItem:
		d.WriteString(r.UserID)
		d.Write([]byte{0})
		d.WriteString(r.Collection)
		d.Write([]byte{0})
		d.WriteString(r.ItemKey)
	default:
		d.WriteString(r.Namespace)
		d.Write([]byte{0})
		d.WriteString(r.ItemKey)
	}
	return d.Sum64()
}

func checkRows(ctx context.Context, tx pgx.Tx, st *sourceTable, tr *TableReport, opts CheckOptions,
	seen, users map[uint64]struct{}, hasUsers bool) error {
	rows, err := tx.Query(ctx, st.selectSQL(false))
	if err != nil {
		return fmt.Errorf("table %s: read: %w", st.Name, err)
	}
	defer rows.Close()
	perPart := map[int32]int64{}
	note := func(msg string) {
		if len(tr.Errors) < opts.MaxErrors {
			tr.Errors = append(tr.Errors, msg)
		}
	}
	for rows.Next() {
		r, bad := st.scanRecord(rows, opts.MaxJSONBytes)
		if bad != nil {
			tr.Invalid++
			note(bad.Error())
			continue
		}
		tr.Rows++
		k := recordKey(st.Entity, &r)
		if _, dup := seen[k]; dup {
			tr.Duplicates++
			if tr.Duplicates <= 3 {
				tr.Warnings = append(tr.Warnings, fmt.Sprintf("row (%s)=(%s) maps to %s, as an earlier row did; the last one read wins",
					joinComma(st.PrimaryKey), joinComma(r.Key), describeRecord(st.Entity, &r)))
			}
		}
		seen[k] = struct{}{}
		if st.Entity == EntityConfig {
			continue
		}
		if st.Entity == EntityItem && hasUsers {
			if _, ok := users[recordKey(EntityUser, &Record{UserID: r.UserID})]; !ok {
				tr.MissingUsers++
				note(fmt.Sprintf("table %s, row (%s)=(%s): user_id: user %q is not imported by any user table of the mapping",
					st.Name, joinComma(st.PrimaryKey), joinComma(r.Key), r.UserID))
			}
		}
		perPart[router.Partition(r.UserID, opts.Partitions)]++
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("table %s: read: %w", st.Name, err)
	}
	if st.Entity == EntityItem && !hasUsers {
		tr.Warnings = append(tr.Warnings, "the mapping imports no users: every item's user must exist in Shardgate already")
	}
	tr.Partitions = len(perPart)
	if len(perPart) > 0 {
		tr.MinPartitionRows = math.MaxInt64
		if len(perPart) < opts.Partitions {
			tr.MinPartitionRows = 0
		}
	}
	for p, n := range perPart {
		tr.MinPartitionRows = min(tr.MinPartitionRows, n)
		tr.MaxPartitionRows = max(tr.MaxPartitionRows, n)
		if opts.Owner != nil {
			if tr.PerShard == nil {
				tr.PerShard = map[string]int64{}
			}
			tr.PerShard[opts.Owner(p)] += n
		}
	}
	return nil
}

func describeRecord(e Entity, r *Record) string {
	switch e {
	case EntityUser:
		return fmt.Sprintf("user %q", r.UserID)
	case EntityItem:
		return fmt.Sprintf("item %q %s/%s", r.UserID, r.Collection, r.ItemKey)
	default:
		return fmt.Sprintf("config %s/%s", r.Namespace, r.ItemKey)
	}
}

func joinComma(s []string) string {
	out := ""
	for i, v := range s {
		if i > 0 {
			out += ","
		}
		out += v
	}
	return out
}

// SortedShards returns the keys of a PerShard map in order.
func SortedShards(m map[string]int64) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
