// Package layering holds tests that keep the module's layers apart.
package layering

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// shardTables are the tables of a shard database (migrations/shard).
var shardTables = []string{
	"users", "sessions", "items", "outbox", "outbox_clock", "outbox_delivered", "ownership",
	"user_tombstones", "item_tombstones", "move_markers",
}

// shardSQL matches SQL that names a shard table where a statement reads or
// writes one; "config_outbox" or "users_archive" are other tables.
var shardSQL = regexp.MustCompile(`(?i)\b(?:FROM|INTO|UPDATE|JOIN|TABLE|TRUNCATE)\s+(?:ONLY\s+)?(?:IF\s+(?:NOT\s+)?EXISTS\s+)?` +
	`(?:"?\w+"?\.)?"?(?:` + strings.Join(shardTables, "|") + `)\b`)

// sqlHomes are the folders whose code may hold shard SQL: package shards,
// the only one that runs SQL on a shard database, and the migrations that
// define the tables.
var sqlHomes = []string{"shards", "migrations"}

// Only package shards runs SQL on a shard database (DESIGN.md): no string
// literal in the module's other code names a shard table in SQL. Tests may
// (they check what the shards did); the relay's outbox reads, for one, go
// through shards.ReadOutbox.
func TestShardSQLOnlyInShards(t *testing.T) {
	root := moduleRoot(t)
	files := 0
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			name := d.Name()
			if rel != "." && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor" || isHome(rel)) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(rel, ".go") || strings.HasSuffix(rel, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		for _, v := range shardSQLIn(t, rel, src) {
			t.Errorf("%s: SQL on a shard table outside package shards: %s", v.pos, v.text)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 20 {
		t.Fatalf("checked only %d files under %s; is that the module?", files, root)
	}
}

func isHome(rel string) bool {
	for _, h := range sqlHomes {
		if rel == h {
			return true
		}
	}
	return false
}

type violation struct {
	pos  token.Position
	text string
}

// shardSQLIn returns the string literals of a Go file that hold SQL on a
// shard table, and the names of shard tables given to pgx.Identifier (as
// CopyFrom takes them).
func shardSQLIn(t *testing.T, name string, src []byte) []violation {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, name, src, parser.SkipObjectResolution)
	if err != nil {
		t.Fatalf("parse %s: %v", name, err)
	}
	var out []violation
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.BasicLit:
			if n.Kind != token.STRING {
				return true
			}
			s, err := strconv.Unquote(n.Value)
			if err != nil {
				t.Fatalf("%s: unquote %s: %v", fset.Position(n.Pos()), n.Value, err)
			}
			if m := shardSQL.FindString(s); m != "" {
				out = append(out, violation{fset.Position(n.Pos()), strings.Join(strings.Fields(m), " ")})
			}
		case *ast.CompositeLit:
			if sel, ok := n.Type.(*ast.SelectorExpr); !ok || sel.Sel.Name != "Identifier" {
				return true
			}
			for _, e := range n.Elts {
				if lit, ok := e.(*ast.BasicLit); ok && lit.Kind == token.STRING {
					if s, _ := strconv.Unquote(lit.Value); isShardTable(s) {
						out = append(out, violation{fset.Position(lit.Pos()), "pgx.Identifier " + lit.Value})
					}
				}
			}
		}
		return true
	})
	return out
}

func isShardTable(s string) bool {
	for _, tab := range shardTables {
		if s == tab {
			return true
		}
	}
	return false
}

// moduleRoot is the folder of the module's go.mod, above this package.
func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's folder")
		}
		dir = parent
	}
}

// The check itself: what it must flag and what it must let pass.
func TestShardSQLDetector(t *testing.T) {
	for _, tc := range []struct {
		src  string
		want int
	}{
		{"const q = `DELETE FROM outbox WHERE tick = $1`", 1},
		{`const q = "select * from users where user_id = $1"`, 1},
		{"const q = `INSERT INTO outbox_clock (partition, tick) VALUES ($1, 0)`", 1},
		{`var q = "UPDATE ownership SET state = 'frozen'"`, 1},
		{"const q = `SELECT 1 FROM users AS u JOIN public.sessions AS s ON s.user_id = u.user_id`", 1},
		{`const q = "CREATE TABLE IF NOT EXISTS move_markers (p int)"`, 1},
		{`var q = "TRUNCATE item_tombstones"`, 1},
		{`var id = pgx.Identifier{"items"}`, 1},
		{`var a, b = "DELETE FROM users", "DELETE FROM \"sessions\""`, 2},
		{"const q = `SELECT tick FROM config_outbox WHERE tick > $1`", 0},
		{`const q = "SELECT * FROM partitions JOIN shards USING (shard_id)"`, 0},
		{`const q = "SELECT * FROM users_archive"`, 0},
		{`const msg = "the user's sessions and items are removed too"`, 0},
		{`var id = pgx.Identifier{"config"}`, 0},
	} {
		got := shardSQLIn(t, "x.go", []byte("package x\n"+tc.src+"\n"))
		if len(got) != tc.want {
			t.Errorf("%s: %d found (%v), want %d", tc.src, len(got), got, tc.want)
		}
	}
}
