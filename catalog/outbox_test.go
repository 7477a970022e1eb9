package catalog_test

import (
	"context"
	"math"
	"strings"
	"testing"

	"github.com/shardgate/shardgate/catalog"
)

// ReadConfigOutbox reads a tick range in order, up to a limit, leaving out
// payloads over the cap, passing over what MarkConfigDelivered says is
// delivered, which stays for ReadConfigRetained and ReadConfigEvents.
func TestReadAndMarkConfigOutbox(t *testing.T) {
	t.Parallel()
	cat := openConfigCatalog(t)
	ctx := context.Background()
	big := `{"pad": "` + strings.Repeat("x", 200) + `"}`
	for _, e := range []struct{ ns, key, value string }{{"ns", "a", `1`}, {"ns", "b/c", big}, {"other", "d", `"x"`}} {
		if _, err := cat.SetConfig(ctx, e.ns, e.key, []byte(e.value), nil); err != nil {
			t.Fatal(err)
		}
	}
	pc, err := cat.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Release()
	conn := pc.Conn()
	keys := func(rows []catalog.ConfigOutboxRow) string {
		var out []string
		for _, r := range rows {
			out = append(out, r.Namespace+":"+r.Key)
		}
		return strings.Join(out, ",")
	}

	rows, err := catalog.ReadConfigOutbox(ctx, conn, math.MinInt64, math.MaxInt64, 10, 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := keys(rows); got != "ns:a,ns:b/c,other:d" {
		t.Fatalf("rows %s, want ns:a,ns:b/c,other:d in tick order", got)
	}
	if string(rows[2].Payload) != `"x"` {
		t.Errorf("payload %q, want \"x\"", rows[2].Payload)
	}
	for _, r := range rows {
		if r.EventID == "" || r.Tick < 1 || r.Op != "upsert" || r.Version != 1 || r.CommittedAt.IsZero() {
			t.Errorf("row %+v: fields missing", r)
		}
		if omitted := r.Key == "b/c"; r.Omitted != omitted || (r.Payload == nil) != omitted {
			t.Errorf("row of %s: payload %q, omitted %v", r.Key, r.Payload, r.Omitted)
		}
	}
	none, err := catalog.ReadConfigOutbox(ctx, conn, math.MinInt64, math.MaxInt64, 10, -1, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range none {
		if r.Payload != nil || !r.Omitted {
			t.Errorf("with no payloads: row of %s has payload %q, omitted %v", r.Key, r.Payload, r.Omitted)
		}
	}

	mid, err := catalog.ReadConfigOutbox(ctx, conn, rows[0].Tick, rows[2].Tick, 10, 100, rows[:1])
	if err != nil {
		t.Fatal(err)
	}
	if got := keys(mid); got != "ns:a,ns:b/c" {
		t.Fatalf("range read appended to dst: %s", got)
	}
	if one, err := catalog.ReadConfigOutbox(ctx, conn, math.MinInt64, math.MaxInt64, 1, 100, nil); err != nil || len(one) != 1 {
		t.Fatalf("limit 1: %d rows, %v", len(one), err)
	}

	if err := catalog.MarkConfigDelivered(ctx, conn, rows[1].Tick); err != nil {
		t.Fatal(err)
	}
	if err := catalog.MarkConfigDelivered(ctx, conn, rows[0].Tick); err != nil { // never down
		t.Fatal(err)
	}
	left, err := catalog.ReadConfigOutbox(ctx, conn, math.MinInt64, math.MaxInt64, 10, 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := keys(left); got != "other:d" {
		t.Fatalf("after delivering up to b/c: %s", got)
	}
	if d, err := catalog.ConfigDelivered(ctx, conn); err != nil || d != rows[1].Tick {
		t.Fatalf("delivered tick %d, %v; want %d", d, err, rows[1].Tick)
	}
	kept, err := catalog.ReadConfigRetained(ctx, conn, 0, rows[2].Tick, 10, 100, nil)
	if err != nil || keys(kept) != "ns:a,ns:b/c,other:d" {
		t.Fatalf("retained: %s, %v", keys(kept), err)
	}
	all, delivered, err := cat.ReadConfigEvents(ctx, rows[0].Tick, 10, 100)
	if err != nil || keys(all) != "ns:b/c,other:d" || delivered != rows[1].Tick {
		t.Fatalf("events after a: %s, delivered %d, %v", keys(all), delivered, err)
	}
}
