package importer

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
)

// sourceTable is a mapped table as found in the source database.
type sourceTable struct {
	*Table
	oid       uint32
	schema    string
	relname   string
	ident     string            // quoted, schema-qualified
	alias     string            // quoted relname: expressions may say accounts.id
	columns   []string          // every column, in order
	types     map[string]string // column → format_type
	keyTypes  []string
	replIdent string // 'd' default (primary key), 'f' full, 'n' nothing, 'i' index
	pk        []string
}

// querier is what the source is read through: a connection or a transaction.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

const describeTableSQL = `
SELECT c.oid, n.nspname, c.relname, c.relreplident::text,
       coalesce((SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum))
                 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey::int2[])
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}'),
       (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       (SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')`

// describe finds t in the source: its columns, types and key.
func describe(ctx context.Context, q querier, t *Table) (*sourceTable, error) {
	schema, table, err := splitTable(t.Source)
	if err != nil {
		return nil, fmt.Errorf("table %s: source: %w", t.Name, err)
	}
	ident := pgx.Identifier{table}
	if schema != "" {
		ident = pgx.Identifier{schema, table}
	}
	st := &sourceTable{Table: t, types: map[string]string{}}
	var types []string
	err = q.QueryRow(ctx, describeTableSQL, ident.Sanitize()).
		Scan(&st.oid, &st.schema, &st.relname, &st.replIdent, &st.pk, &st.columns, &types)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("table %s: source table %s does not exist in the source database", t.Name, t.Source)
	}
	if err != nil {
		return nil, fmt.Errorf("table %s: describe %s: %w", t.Name, t.Source, err)
	}
	for i, c := range st.columns {
		st.types[c] = types[i]
	}
	st.ident = pgx.Identifier{st.schema, st.relname}.Sanitize()
	st.alias = pgx.Identifier{st.relname}.Sanitize()
	key := t.PrimaryKey
	if len(key) == 0 {
		if len(st.pk) == 0 {
			return nil, fmt.Errorf("table %s: source table %s has no primary key; list the columns that identify a row in primary_key:", t.Name, t.Source)
		}
		key = st.pk
	}
	for _, c := range key {
		typ, ok := st.types[c]
		if !ok {
			return nil, fmt.Errorf("table %s: primary_key: column %s does not exist in %s", t.Name, c, t.Source)
		}
		st.keyTypes = append(st.keyTypes, typ)
	}
	// Resolved on a copy: the mapping (and its hash) stays as written.
	resolved := *t
	resolved.PrimaryKey = key
	st.Table = &resolved
	return st, nil
}

// sqlString quotes s as an SQL string literal.
func sqlString(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}

// fieldCount is the number of fieldExprs, without building their SQL.
func (t *Table) fieldCount() int {
	switch t.Entity {
	case EntityUser:
		return 2
	case EntityItem:
		return 4
	default:
		return 3
	}
}

// fieldExprs returns the SQL of the mapped fields, in the order a Record
// is scanned: user: user_id, profile; item: user_id, collection, key,
// value; config: namespace, key, value. JSON fields are jsonb.
func (t *Table) fieldExprs() []string {
	p := func(e string) string { return "(" + e + ")::text" }
	j := func(e string) string { return "to_jsonb((" + e + "))" }
	switch t.Entity {
	case EntityUser:
		return []string{p(t.UserID), t.profileExpr()}
	case EntityItem:
		return []string{p(t.UserID), p(t.Collection), p(t.Key), j(t.Value)}
	default:
		return []string{p(t.Namespace), p(t.Key), j(t.Value)}
	}
}

func (t *Table) profileExpr() string {
	if t.ProfileSQL != "" {
		return "to_jsonb((" + t.ProfileSQL + "))"
	}
	// jsonb_build_object takes at most 100 arguments.
	var parts []string
	for i := 0; i < len(t.Profile); i += 50 {
		var args []string
		for _, f := range t.Profile[i:min(i+50, len(t.Profile))] {
			args = append(args, sqlString(f.Field), "("+f.Expr+")")
		}
		parts = append(parts, "jsonb_build_object("+strings.Join(args, ", ")+")")
	}
	return strings.Join(parts, " || ")
}

// keyList is the key columns, qualified by the table's alias (a bare name
// in ORDER BY would pick an output column of that name: the key as text),
// comma-separated.
func (st *sourceTable) keyList() string {
	q := make([]string, len(st.PrimaryKey))
	for i, c := range st.PrimaryKey {
		q[i] = st.alias + "." + pgx.Identifier{c}.Sanitize()
	}
	return strings.Join(q, ", ")
}

// selectSQL reads the mapped rows in key order: the key columns as text,
// then the fields (see fieldExprs, JSON as text). With after, only rows
// after the key given as $1.. (text) are read.
func (st *sourceTable) selectSQL(after bool) string {
	return st.selectRangeSQL(after, false)
}

// selectRangeSQL is selectSQL for the rows after the key given as $1..
// (with after) and up to and including the key given as the next
// parameters (with upTo).
func (st *sourceTable) selectRangeSQL(after, upTo bool) string {
	var cols []string
	for i, c := range st.PrimaryKey {
		cols = append(cols, fmt.Sprintf("%s.%s::text AS sg_k%d", st.alias, pgx.Identifier{c}.Sanitize(), i))
	}
	fe := st.fieldExprs()
	for i, e := range fe {
		if i == len(fe)-1 { // the JSON field
			e = "(" + e + ")::text"
		}
		cols = append(cols, fmt.Sprintf("%s AS sg_f%d", e, i))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "SELECT %s FROM %s AS %s", strings.Join(cols, ", "), st.ident, st.alias)
	b.WriteString(st.rangeWhere(after, upTo))
	b.WriteString(" ORDER BY " + st.keyList())
	return b.String()
}

// rangeWhere is the WHERE clause (or "") of the mapping's filter and the
// key bounds of selectRangeSQL.
func (st *sourceTable) rangeWhere(after, upTo bool) string {
	var conds []string
	if st.Where != "" {
		conds = append(conds, "("+st.Where+")")
	}
	n := 0
	bound := func(op string) {
		args := make([]string, len(st.PrimaryKey))
		for i := range st.PrimaryKey {
			n++
			args[i] = fmt.Sprintf("$%d::text::%s", n, st.keyTypes[i])
		}
		conds = append(conds, fmt.Sprintf("(%s) %s (%s)", st.keyList(), op, strings.Join(args, ", ")))
	}
	if after {
		bound(">")
	}
	if upTo {
		bound("<=")
	}
	if len(conds) == 0 {
		return ""
	}
	return " WHERE " + strings.Join(conds, " AND ")
}

// splitSQL returns the keys (as text) of every $n-th row that
// selectSQL(after) reads, at most $n+1 of them, in key order ($n is the
// parameter after the key of after): the cuts of ranges of about equal
// size, found with one scan of the key columns.
func (st *sourceTable) splitSQL(after bool) string {
	keys := make([]string, len(st.PrimaryKey))
	outs := make([]string, len(st.PrimaryKey))
	for i, c := range st.PrimaryKey {
		keys[i] = fmt.Sprintf("%s.%s::text AS sg_k%d", st.alias, pgx.Identifier{c}.Sanitize(), i)
		outs[i] = fmt.Sprintf("sg_k%d", i)
	}
	n := 1
	if after {
		n += len(st.PrimaryKey)
	}
	return fmt.Sprintf(`SELECT %s FROM (
    SELECT %s, row_number() OVER (ORDER BY %s) AS sg_pos FROM %s AS %s%s
) AS s WHERE sg_pos %% $%d = 0 ORDER BY sg_pos LIMIT $%d`,
		strings.Join(outs, ", "), strings.Join(keys, ", "), st.keyList(), st.ident, st.alias, st.rangeWhere(after, false), n, n+1)
}

// countSQL counts the rows selectSQL(false) reads.
func (st *sourceTable) countSQL() string {
	s := fmt.Sprintf("SELECT count(*) FROM %s AS %s", st.ident, st.alias)
	if st.Where != "" {
		s += " WHERE (" + st.Where + ")"
	}
	return s
}

// Record is one source row mapped to its entity.
type Record struct {
	Key        []string // the source row's key, as text
	UserID     string   // user, item
	Collection string   // item
	Namespace  string   // config
	ItemKey    string   // item, config
	JSON       string   // profile (user) or value (item, config), as jsonb prints it
	Partition  int32    // user, item
	Version    int64    // an export's version (NDJSON loads only), kept where the rules allow
}

// RowError is a source row that does not map to a valid entity.
type RowError struct {
	Table   string
	KeyCols []string
	Key     []string
	Field   string
	Msg     string
}

func (e *RowError) Error() string {
	return fmt.Sprintf("table %s, row (%s)=(%s): %s: %s", e.Table, strings.Join(e.KeyCols, ","), strings.Join(e.Key, ","), e.Field, e.Msg)
}

// scanRecord reads one row of selectSQL and validates what it maps to.
// Every column is text, so the raw values are the strings (in text and
// binary format alike): no scan targets to allocate per row.
func (st *sourceTable) scanRecord(rows pgx.Rows, maxJSON int) (Record, *RowError) {
	nk := len(st.PrimaryKey)
	raw := rows.RawValues()
	var r Record
	if len(raw) != nk+st.fieldCount() {
		return r, &RowError{Table: st.Name, KeyCols: st.PrimaryKey, Field: "row",
			Msg: fmt.Sprintf("%d columns, want %d", len(raw), nk+st.fieldCount())}
	}
	r.Key = make([]string, nk)
	for i := range nk {
		r.Key[i] = string(raw[i])
	}
	var f [4]pgtype.Text
	for i, v := range raw[nk:] {
		if v != nil {
			f[i] = pgtype.Text{String: string(v), Valid: true}
		}
	}
	return st.mapValues(r, f[:len(raw)-nk], maxJSON)
}

// mapValues validates the mapped fields (in fieldExprs order) into r.
func (st *sourceTable) mapValues(r Record, f []pgtype.Text, maxJSON int) (Record, *RowError) {
	bad := func(field, format string, args ...any) (Record, *RowError) {
		return r, &RowError{Table: st.Name, KeyCols: st.PrimaryKey, Key: r.Key, Field: field, Msg: fmt.Sprintf(format, args...)}
	}
	var names []string
	switch st.Entity {
	case EntityUser:
		names = []string{"user_id", "profile"}
		if st.ProfileSQL != "" {
			names[1] = "profile_sql"
		}
	case EntityItem:
		names = []string{"user_id", "collection", "key", "value"}
	default:
		names = []string{"namespace", "key", "value"}
	}
	for i, v := range f {
		if !v.Valid {
			return bad(names[i], "is NULL")
		}
	}
	switch st.Entity {
	case EntityUser:
		r.UserID, r.JSON = f[0].String, f[1].String
		if err := ValidUserID(r.UserID); err != nil {
			return bad("user_id", "%q is not a valid user ID: %v", clip(r.UserID), err)
		}
		if err := validJSON(r.JSON, true, maxJSON); err != nil {
			return bad(names[1], "%v", err)
		}
	case EntityItem:
		r.UserID, r.Collection, r.ItemKey, r.JSON = f[0].String, f[1].String, f[2].String, f[3].String
		if err := ValidUserID(r.UserID); err != nil {
			return bad("user_id", "%q is not a valid user ID: %v", clip(r.UserID), err)
		}
		if err := validName(r.Collection); err != nil {
			return bad("collection", "%q: %v", clip(r.Collection), err)
		}
		if err := validKey(r.ItemKey); err != nil {
			return bad("key", "%q: %v", clip(r.ItemKey), err)
		}
		if err := validJSON(r.JSON, false, maxJSON); err != nil {
			return bad("value", "%v", err)
		}
	default:
		r.Namespace, r.ItemKey, r.JSON = f[0].String, f[1].String, f[2].String
		if err := validName(r.Namespace); err != nil {
			return bad("namespace", "%q: %v", clip(r.Namespace), err)
		}
		if err := validKey(r.ItemKey); err != nil {
			return bad("key", "%q: %v", clip(r.ItemKey), err)
		}
		if err := validJSON(r.JSON, false, maxJSON); err != nil {
			return bad("value", "%v", err)
		}
	}
	return r, nil
}

func clip(s string) string {
	if len(s) > 160 {
		return s[:157] + "..."
	}
	return s
}

// connectSource connects to the source with the session settings mapped
// values depend on: times in JSON are printed in UTC whoever runs the import.
func connectSource(ctx context.Context, dsn string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("source DSN: %w", err)
	}
	cfg.RuntimeParams["timezone"] = "UTC"
	if _, ok := cfg.RuntimeParams["application_name"]; !ok {
		cfg.RuntimeParams["application_name"] = "shardgate-import"
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	return conn, nil
}

// ConnectSource connects to the source database as the import does.
func ConnectSource(ctx context.Context, dsn string) (*pgx.Conn, error) {
	return connectSource(ctx, dsn)
}
