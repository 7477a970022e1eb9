package events

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The invalidation hook sees every event after it is in Redis; while it
// fails, the rows stay in the outbox and the batch comes again. Payloads
// over the cap are left out of the stream, and the entry says so.
func TestRelayInvalidateHookAndPayloadCap(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 3)
	rc, prefix := newRedis(t)
	keys := Keys{prefix}
	var (
		mu    sync.Mutex
		seen  = map[string]int{}
		fails atomic.Int32
	)
	fails.Store(2)
	hook := func(ctx context.Context, evs []Event) error {
		for _, e := range evs {
			// Already in Redis when the hook runs.
			n, err := rc.Do(ctx, rc.B().Xlen().Key(keys.Stream(e.Partition)).Build()).AsInt64()
			if err != nil || n < 1 {
				t.Errorf("hook ran before the event was in its stream: %d, %v", n, err)
			}
			mu.Lock()
			seen[e.ID]++
			mu.Unlock()
		}
		if fails.Add(-1) >= 0 {
			return errors.New("cache down")
		}
		return nil
	}
	m := NewManager(RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger(), Invalidate: hook,
		ElectInterval: 50 * time.Millisecond, MaxPayloadBytes: 100})
	defer m.Close()
	ctx := testCtx(t, time.Minute)
	if _, err := s.sh.PutUser(ctx, 3, "small", []byte(`{"a":1}`), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.sh.PutUser(ctx, 3, "big", []byte(`{"a":"`+strings.Repeat("x", 200)+`"}`), nil); err != nil {
		t.Fatal(err)
	}
	m.Sync(map[string]string{"s": s.dsn})
	waitFor(t, "the outbox to drain", func() bool { return outboxCount(t, s) == 0 })
	evs := readStream(t, rc, keys, 3)
	if len(evs) != 2 {
		t.Fatalf("stream holds %d events, want 2 (no duplicates after retries)", len(evs))
	}
	mu.Lock()
	defer mu.Unlock()
	for _, e := range evs {
		if seen[e.ID] < 3 {
			t.Errorf("hook saw %s %d times, want 3 (two failures, then success)", e.UserID, seen[e.ID])
		}
		switch e.UserID {
		case "small":
			if string(e.Payload) != `{"a": 1}` || e.Omitted {
				t.Errorf("small payload: %q omitted=%v", e.Payload, e.Omitted)
			}
		case "big":
			if e.Payload != nil || !e.Omitted {
				t.Errorf("big payload: %d bytes, omitted=%v", len(e.Payload), e.Omitted)
			}
		}
	}
}

// The catalog's relay publishes config changes to the config stream, in
// commit order with versions that continue across a delete.
func TestConfigRelay(t *testing.T) {
	t.Parallel()
	dsn := testenvCatalog(t)
	rc, prefix := newRedis(t)
	m := NewManager(RelayOptions{Redis: rc, Prefix: prefix, Logger: quietLogger()})
	defer m.Close()
	m.StartConfig(dsn)
	ctx := testCtx(t, time.Minute)
	cat := openCatalog(t, dsn)
	for _, step := range []func() error{
		func() error { _, err := cat.SetConfig(ctx, "ns", "k", []byte(`1`), nil); return err },
		func() error { return cat.DeleteConfig(ctx, "ns", "k", nil) },
		func() error { _, err := cat.SetConfig(ctx, "ns", "k", []byte(`2`), nil); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	keys := Keys{prefix}
	waitFor(t, "three config events", func() bool { return len(readStream(t, rc, keys, ConfigStream)) == 3 })
	var got []string
	for _, e := range readStream(t, rc, keys, ConfigStream) {
		ns, k := e.ConfigKey()
		got = append(got, ns+"/"+k+" "+e.Op+" "+string(e.Payload)+" v"+itoa(e.Version))
	}
	if want := "[ns/k upsert 1 v1 ns/k delete  v2 ns/k upsert 2 v3]"; "["+strings.Join(got, " ")+"]" != want {
		t.Fatalf("config stream: %v, want %s", got, want)
	}
}

// A Redis that does not know the publish script yet (first use, a restart,
// SCRIPT FLUSH) gets it loaded, and the batch goes through once.
func TestRelayLoadsItsScript(t *testing.T) {
	t.Parallel()
	s := newTestShard(t, "s", 5)
	rc, prefix := newRedis(t)
	ctx := testCtx(t, time.Minute)
	for i := range 3 {
		if _, err := s.pool().Exec(ctx, insertEvent, 5, fmt.Sprint("u", i)); err != nil {
			t.Fatal(err)
		}
	}
	r := NewShardRelay("s", s.dsn, RelayOptions{Redis: rc, Prefix: prefix, BatchSize: 2, Logger: quietLogger()})
	// A script body no Redis has seen: its first EVALSHA is NOSCRIPT.
	r.script = newScript(publishScript + "\n-- " + prefix)
	rctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { r.Run(rctx); close(done) }()
	defer func() { stop(); <-done }()
	waitFor(t, "the outbox to drain", func() bool { return outboxCount(t, s) == 0 })
	if evs := readStream(t, rc, Keys{prefix}, 5); len(evs) != 3 || evs[2].Tick != 3 {
		t.Fatalf("stream: %+v", evs)
	}
}
