package server

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/internal/testenv"
)

// Postgres is the oracle for validateJSON: whatever it accepts, jsonb must
// store, and what comes back must fit the same limit, so a value read can be
// written back unchanged. Inputs jsonb refuses must be refused up front.
func TestAcceptedJSONIsStorable(t *testing.T) {
	t.Parallel()
	const limit = 4096
	conn, err := pgx.Connect(context.Background(), testenv.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	cases := []string{
		`{}`, `[]`, `0`, `-0`, `1E+5`, `1e-5`, `-1.5e-3`, `123.456e2`, `1e300`, `1e-300`,
		`1e4000`, `1e-4000`, `1e-16383`, `1e-16384`, `0e-20000`, `1.0000000000e-16380`,
		`9e131071`, `1e131072`, `"\u00e9"`, `"\ud83d\ude00"`, `"\ud800"`, `"\udfff"`,
		`"\ud800\ud800"`, `"a\/b"`, `"\u0001"`, `"\u0000"`, `{"a":1,"b":[1,2,{"c":null}]}`,
		`{"a" : 1 , "b" : 2}`, strings.Repeat(`[`, 64) + strings.Repeat(`]`, 64),
		strings.Repeat(`[`, 65) + strings.Repeat(`]`, 65),
		`[` + strings.Repeat(`0,`, 1500) + `0]`, `[` + strings.Repeat(`0,`, 2100) + `0]`,
		`[` + strings.Repeat(`1e1,`, 500) + `1]`, `[` + strings.Repeat(`1e9,`, 500) + `1]`,
		object(300), object(400),
	}
	// Duplicate keys collapse in jsonb, so the bound is only tight for
	// distinct ones; refusing a near-limit object with duplicates is fine.
	for i, in := range cases {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			verr := validateJSON("f", in, false, limit)
			var out string
			perr := conn.QueryRow(context.Background(), `SELECT $1::jsonb::text`, in).Scan(&out)
			switch {
			case verr == nil && perr != nil:
				t.Fatalf("%.60q accepted, but Postgres refuses it: %v", in, perr)
			case verr == nil && len(out) > limit:
				t.Fatalf("%.60q accepted (%d bytes) but reads back as %d bytes, over the limit %d", in, len(in), len(out), limit)
			case verr != nil && perr == nil && len(out) <= limit && len(in) <= limit && !strings.Contains(verr.Error(), "nested"):
				t.Fatalf("%.60q refused (%v) though Postgres stores it in %d bytes", in, verr, len(out))
			}
		})
	}
}

// object returns a JSON object of n distinct keys, 9 bytes each.
func object(n int) string {
	var b strings.Builder
	b.WriteString("{")
	for i := range n {
		fmt.Fprintf(&b, `"k%03d":1,`, i)
	}
	b.WriteString(`"z":1}`)
	return b.String()
}
