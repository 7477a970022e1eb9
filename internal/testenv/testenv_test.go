package testenv_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"

	"github.com/shardgate/shardgate/internal/testenv"
)

// NewDatabase gives a UTF8 database with synchronous_commit off, and drops
// it, open connections and all, when the test that asked for it ends.
func TestNewDatabase(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var name string
	t.Run("use", func(t *testing.T) {
		conn, err := pgx.Connect(ctx, testenv.NewDatabase(t))
		if err != nil {
			t.Fatal(err)
		}
		// Left open: the drop must force it closed. Cleanups run last
		// registered first, so close it only after the drop.
		t.Cleanup(func() { conn.Close(context.Background()) })
		var encoding, syncCommit, text string
		err = conn.QueryRow(ctx, `SELECT current_database(), pg_encoding_to_char(encoding), current_setting('synchronous_commit'), ('"\u00e9\u6f22"'::jsonb) #>> '{}'
			FROM pg_database WHERE datname = current_database()`).Scan(&name, &encoding, &syncCommit, &text)
		if err != nil {
			t.Fatal(err)
		}
		if encoding != "UTF8" || syncCommit != "off" || text != "é漢" {
			t.Errorf("database %s: encoding %s, synchronous_commit %s, JSON text %q", name, encoding, syncCommit, text)
		}
	})
	if name == "" {
		t.Fatal("no database")
	}
	admin, err := pgx.Connect(ctx, testenv.AdminDSN(t))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	var exists bool
	if err := admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)`, name).Scan(&exists); err != nil {
		t.Fatal(err)
	}
	if exists {
		t.Errorf("database %s still exists after its test ended", name)
	}
}

// Redis gives a fresh prefix and deletes every key under it, however many,
// when the test that asked for it ends; keys outside it stay.
func TestRedis(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	addr, outside := testenv.Redis(t) // cleaned when this test ends
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Do(ctx, c.B().Set().Key(outside+"keep").Value("1").Build()).Error(); err != nil {
		t.Fatal(err)
	}

	const n = 2500 // more than one SCAN page of the cleanup
	var prefix string
	t.Run("use", func(t *testing.T) {
		_, prefix = testenv.Redis(t)
		if prefix == outside {
			t.Fatalf("two calls gave the same prefix %q", prefix)
		}
		cmds := make(rueidis.Commands, 0, n)
		for i := range n {
			cmds = append(cmds, c.B().Set().Key(fmt.Sprintf("%sk%d", prefix, i)).Value("v").Build())
		}
		for _, r := range c.DoMulti(ctx, cmds...) {
			if err := r.Error(); err != nil {
				t.Fatal(err)
			}
		}
	})
	if prefix == "" {
		t.Fatal("no prefix")
	}
	var left []string
	var cursor uint64
	for {
		e, err := c.Do(ctx, c.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			t.Fatal(err)
		}
		left = append(left, e.Elements...)
		if cursor = e.Cursor; cursor == 0 {
			break
		}
	}
	if len(left) > 0 {
		t.Errorf("%d keys under %s left after their test ended, e.g. %s", len(left), prefix, left[0])
	}
	if n, err := c.Do(ctx, c.B().Exists().Key(outside+"keep").Build()).AsInt64(); err != nil || n != 1 {
		t.Errorf("key outside the prefix: exists = %d, %v", n, err)
	}
}
