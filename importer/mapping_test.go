package importer

import (
	"os"
	"strings"
	"testing"
)

func TestParseMapping(t *testing.T) {
	b, err := os.ReadFile("testdata/legacy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m, err := ParseMapping(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Tables) != 2 || m.Tables[0].Name != "accounts" || m.Tables[0].Entity != EntityUser ||
		len(m.Tables[0].Profile) != 3 || m.Tables[0].Profile[1] != (NamedExpr{"name", "name"}) ||
		m.Tables[1].Key != "name" || m.Tables[1].Collection != "'settings'" {
		t.Fatalf("parsed %+v", m)
	}
	if got := m.Tables[0].profileExpr(); got != "jsonb_build_object('email', (email), 'name', (name), 'created_at', (created_at))" {
		t.Fatalf("profile SQL %s", got)
	}
}

func TestParseMappingErrors(t *testing.T) {
	for _, tc := range []struct{ name, src, want string }{
		{"empty", "", "empty file"},
		{"no tables", "tables: []", "at least one table"},
		{"unknown field", "tables:\n- source: a\n  entity: user\n  user_id: id\n  profil: {a: b}", "field profil not found"},
		{"duplicate yaml key", "tables:\n- source: a\n  source: b\n  entity: user", "already defined"},
		{"no source", "tables:\n- entity: user", "tables[0]: source: required"},
		{"bad source", "tables:\n- source: 'a;drop'\n  entity: user", "plain identifiers"},
		{"no entity", "tables:\n- source: a", "table a: entity: required"},
		{"session", "tables:\n- source: a\n  entity: session", "sessions are not imported"},
		{"bad entity", "tables:\n- source: a\n  entity: usr", `entity "usr": want user, item or config`},
		{"user without id", "tables:\n- source: a\n  entity: user\n  profile: {x: y}", "table a: user_id: SQL expression required"},
		{"user without profile", "tables:\n- source: a\n  entity: user\n  user_id: id", "profile: required"},
		{"profile twice", "tables:\n- source: a\n  entity: user\n  user_id: id\n  profile: {x: y}\n  profile_sql: row_to_json(a)", "give one, not both"},
		{"profile field twice", "tables:\n- source: a\n  entity: user\n  user_id: id\n  profile:\n    x: y\n    x: z", `field "x" appears twice`},
		{"empty profile expr", "tables:\n- source: a\n  entity: user\n  user_id: id\n  profile: {x: ''}", "profile.x: SQL expression required"},
		{"item missing value", "tables:\n- source: s\n  entity: item\n  user_id: id\n  collection: \"'c'\"\n  key: k", "table s: value: SQL expression required for entity item"},
		{"config with user_id", "tables:\n- source: c\n  entity: config\n  namespace: \"'n'\"\n  key: k\n  value: v\n  user_id: u", "table c: user_id: not a field of entity config"},
		{"item with profile", "tables:\n- source: s\n  entity: item\n  user_id: id\n  collection: c\n  key: k\n  value: v\n  profile: {a: b}", "only a user mapping has a profile"},
		{"same name", "tables:\n- source: a\n  entity: config\n  namespace: n\n  key: k\n  value: v\n- source: a\n  entity: config\n  namespace: n\n  key: k\n  value: v", `name "a" is used twice`},
		{"bad key column", "tables:\n- source: a\n  entity: config\n  namespace: n\n  key: k\n  value: v\n  primary_key: ['id; x']", "primary_key"},
		{"two documents", "tables:\n- source: a\n  entity: config\n  namespace: n\n  key: k\n  value: v\n---\nx: 1", "more than one YAML document"},
		{"not a list", "tables: {a: b}", "cannot unmarshal"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseMapping([]byte(tc.src))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// FuzzParseMapping: any input is parsed or refused with an error, never a
// panic, and an accepted mapping's tables all pass validation again.
func FuzzParseMapping(f *testing.F) {
	b, _ := os.ReadFile("testdata/legacy.yaml")
	f.Add(b)
	f.Add([]byte("tables:\n- source: s.c\n  entity: config\n  namespace: \"'n'\"\n  key: k\n  value: v\n  where: k <> ''"))
	f.Add([]byte("tables:\n- source: a\n  entity: user\n  user_id: id\n  profile_sql: to_jsonb(a)"))
	f.Add([]byte("tables: [&a {source: x}, *a]"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseMapping(b)
		if err != nil {
			if m != nil {
				t.Fatal("a mapping with an error")
			}
			return
		}
		if err := m.validate(); err != nil {
			t.Fatalf("accepted mapping fails validation again: %v", err)
		}
		for _, tab := range m.Tables {
			_ = tab.fieldExprs()
		}
	})
}
