// Package importer moves data from one unsharded PostgreSQL database into
// Shardgate and back out: a mapping file says how source tables become
// users, items and config entries; a bulk phase copies a consistent
// snapshot, a follow phase applies the source's later changes through
// logical decoding, and verification compares both sides. The SQL it runs
// on shards lives in package shards, its checkpoints in package catalog.
package importer

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Entity is what a source table becomes in Shardgate.
type Entity string

// The entities a table can map to. Sessions are not imported: their tokens
// carry their partition and are handed out by Shardgate alone.
const (
	EntityUser   Entity = "user"
	EntityItem   Entity = "item"
	EntityConfig Entity = "config"
)

// Mapping says, per source table, which entity it becomes and how. Column
// expressions are SQL evaluated by the source database against one row of
// the table, so any schema maps without code.
type Mapping struct {
	Tables []Table `yaml:"tables"`
}

// Table maps one source table. The fields an entity needs are required;
// the others must be empty.
type Table struct {
	// Name identifies the mapping in checkpoints and reports; default Source.
	Name string `yaml:"name"`
	// Source is the table, optionally schema-qualified ("legacy.accounts").
	Source string `yaml:"source"`
	Entity Entity `yaml:"entity"`
	// PrimaryKey lists the source columns that identify a row: the bulk
	// phase reads in their order and checkpoints by them. Default: the
	// table's primary key.
	PrimaryKey []string `yaml:"primary_key"`
	// Where filters the rows imported (an SQL condition); empty: all.
	Where string `yaml:"where"`

	UserID string `yaml:"user_id"` // user, item
	// Profile builds the user's profile as a JSON object: field → expression.
	Profile    OrderedExprs `yaml:"profile"`
	ProfileSQL string       `yaml:"profile_sql"` // or one expression giving a JSON object

	Collection string `yaml:"collection"` // item
	Namespace  string `yaml:"namespace"`  // config
	Key        string `yaml:"key"`        // item, config
	Value      string `yaml:"value"`      // item, config: any SQL value, stored as JSON
}

// OrderedExprs is a YAML mapping of field → SQL expression, in file order.
type OrderedExprs []NamedExpr

// NamedExpr is one field of an OrderedExprs.
type NamedExpr struct {
	Field string
	Expr  string
}

// UnmarshalYAML reads a mapping keeping its order; duplicate fields are an
// error (yaml reports them too, but with less context).
func (o *OrderedExprs) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.MappingNode {
		return fmt.Errorf("line %d: want a mapping of field: SQL expression", n.Line)
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode || v.Kind != yaml.ScalarNode {
			return fmt.Errorf("line %d: want field: SQL expression", k.Line)
		}
		if seen[k.Value] {
			return fmt.Errorf("line %d: field %q appears twice", k.Line, k.Value)
		}
		seen[k.Value] = true
		*o = append(*o, NamedExpr{Field: k.Value, Expr: v.Value})
	}
	return nil
}

// MaxMappingBytes bounds a mapping file.
const MaxMappingBytes = 1 << 20

// MaxTables bounds the tables of one mapping.
const MaxTables = 256

var (
	nameRE  = regexp.MustCompile(`^[a-z0-9][a-z0-9_]{0,62}$`)
	identRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_$]{0,62}$`)
)

// ParseMapping reads a mapping file strictly: unknown fields, duplicate
// keys, a field another entity needs, a missing required field or a bad
// identifier is an error that names the table and the field.
func ParseMapping(b []byte) (*Mapping, error) {
	if len(b) > MaxMappingBytes {
		return nil, fmt.Errorf("mapping: %d bytes exceeds the limit of %d", len(b), MaxMappingBytes)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var m Mapping
	if err := dec.Decode(&m); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("mapping: empty file")
		}
		return nil, fmt.Errorf("mapping: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return nil, errors.New("mapping: more than one YAML document")
	}
	if err := m.validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

func (m *Mapping) validate() error {
	if len(m.Tables) == 0 {
		return errors.New("mapping: tables: at least one table is required")
	}
	if len(m.Tables) > MaxTables {
		return fmt.Errorf("mapping: tables: %d tables exceed the limit of %d", len(m.Tables), MaxTables)
	}
	names := map[string]bool{}
	for i := range m.Tables {
		t := &m.Tables[i]
		if t.Source == "" {
			return fmt.Errorf("mapping: tables[%d]: source: required", i)
		}
		if _, _, err := splitTable(t.Source); err != nil {
			return fmt.Errorf("mapping: tables[%d]: source: %w", i, err)
		}
		if t.Name == "" {
			t.Name = strings.ToLower(strings.ReplaceAll(t.Source, ".", "_"))
		}
		if !nameRE.MatchString(t.Name) {
			return fmt.Errorf("mapping: table %s: name %q: want 1-63 characters of [a-z0-9_] (set name: when the source has others)", t.Source, t.Name)
		}
		if names[t.Name] {
			return fmt.Errorf("mapping: table %s: name %q is used twice (give each mapping of a table its own name:)", t.Source, t.Name)
		}
		names[t.Name] = true
		if err := t.validate(); err != nil {
			return fmt.Errorf("mapping: table %s: %w", t.Name, err)
		}
	}
	return nil
}

func (t *Table) validate() error {
	for _, c := range t.PrimaryKey {
		if !identRE.MatchString(c) {
			return fmt.Errorf("primary_key: %q is not a plain column name", c)
		}
	}
	seen := map[string]bool{}
	for _, c := range t.PrimaryKey {
		if seen[c] {
			return fmt.Errorf("primary_key: column %s appears twice", c)
		}
		seen[c] = true
	}
	fields := map[string]string{
		"user_id": t.UserID, "profile_sql": t.ProfileSQL, "collection": t.Collection,
		"namespace": t.Namespace, "key": t.Key, "value": t.Value,
	}
	var need []string
	switch t.Entity {
	case EntityUser:
		need = []string{"user_id"}
		switch {
		case len(t.Profile) > 0 && t.ProfileSQL != "":
			return errors.New("profile and profile_sql: give one, not both")
		case len(t.Profile) == 0 && t.ProfileSQL == "":
			return errors.New("profile: required (a mapping of field: SQL expression), or profile_sql")
		}
		for _, f := range t.Profile {
			if f.Field == "" {
				return errors.New("profile: a field name is empty")
			}
			if strings.TrimSpace(f.Expr) == "" {
				return fmt.Errorf("profile.%s: SQL expression required", f.Field)
			}
		}
		fields["profile_sql"] = "" // optional, checked above
	case EntityItem:
		need = []string{"user_id", "collection", "key", "value"}
	case EntityConfig:
		need = []string{"namespace", "key", "value"}
	case "":
		return errors.New("entity: required (user, item or config)")
	case "session":
		return errors.New(`entity "session": sessions are not imported (their tokens carry their partition); users sign in again`)
	default:
		return fmt.Errorf("entity %q: want user, item or config", t.Entity)
	}
	if t.Entity != EntityUser && len(t.Profile) > 0 {
		return fmt.Errorf("profile: only a user mapping has a profile, not %s", t.Entity)
	}
	for _, f := range need {
		if strings.TrimSpace(fields[f]) == "" {
			return fmt.Errorf("%s: SQL expression required for entity %s", f, t.Entity)
		}
		delete(fields, f)
	}
	for f, v := range fields {
		if v != "" {
			return fmt.Errorf("%s: not a field of entity %s", f, t.Entity)
		}
	}
	for f, v := range t.exprs() {
		if strings.ContainsRune(v, 0) {
			return fmt.Errorf("%s: contains a NUL byte", f)
		}
	}
	return nil
}

// exprs returns the table's SQL fields by name, for checks that name them.
func (t *Table) exprs() map[string]string {
	m := map[string]string{}
	add := func(k, v string) {
		if v != "" {
			m[k] = v
		}
	}
	add("where", t.Where)
	add("user_id", t.UserID)
	add("profile_sql", t.ProfileSQL)
	add("collection", t.Collection)
	add("namespace", t.Namespace)
	add("key", t.Key)
	add("value", t.Value)
	for _, f := range t.Profile {
		add("profile."+f.Field, f.Expr)
	}
	return m
}

// splitTable splits "schema.table" or "table" into plain identifiers.
func splitTable(s string) (schema, table string, err error) {
	schema, table, ok := strings.Cut(s, ".")
	if !ok {
		schema, table = "", s
	}
	if schema != "" && !identRE.MatchString(schema) || !identRE.MatchString(table) || strings.Contains(table, ".") {
		return "", "", fmt.Errorf("%q: want table or schema.table, plain identifiers", s)
	}
	return schema, table, nil
}
