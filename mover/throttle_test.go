package mover

import (
	"context"
	"errors"
	"testing"
	"time"
)

// fakeClock drives a throttle without sleeping.
type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time { return c.now }

func (c *fakeClock) Sleep(_ context.Context, d time.Duration) error {
	c.now = c.now.Add(d)
	return nil
}

func newTestThrottle(opts ThrottleOptions, p probe) (*throttle, *fakeClock) {
	clk := &fakeClock{now: time.Unix(1000, 0)}
	t := newThrottle(opts, p)
	t.now, t.sleep = clk.Now, clk.Sleep
	return t, clk
}

func TestThrottlePausesWhileAShardIsBusy(t *testing.T) {
	busyFor := 3 // probes that find the shard busy
	probes := 0
	th, clk := newTestThrottle(ThrottleOptions{}, func(context.Context) (time.Duration, int64, error) {
		probes++
		if probes <= busyFor {
			return 80 * time.Millisecond, 0, nil // over the 50ms default
		}
		return 5 * time.Millisecond, 0, nil
	})
	start := clk.now
	if err := th.pace(context.Background()); err != nil {
		t.Fatal(err)
	}
	if probes != busyFor+1 || th.throttled != 3*200*time.Millisecond || clk.now.Sub(start) != th.throttled {
		t.Fatalf("%d probes, throttled %s, slept %s; want 4 probes and 600ms", probes, th.throttled, clk.now.Sub(start))
	}
	// Within Every of the last probe: no probe, no pause.
	if err := th.pace(context.Background()); err != nil || probes != busyFor+1 {
		t.Fatalf("a pace within Every probed again (%d probes, %v)", probes, err)
	}
	clk.now = clk.now.Add(250 * time.Millisecond)
	if err := th.pace(context.Background()); err != nil || probes != busyFor+2 {
		t.Fatalf("a pace after Every did not probe (%d probes, %v)", probes, err)
	}
}

func TestThrottleLagAndLimits(t *testing.T) {
	th, clk := newTestThrottle(ThrottleOptions{LagBytes: 1 << 20, MaxPause: time.Second}, func(context.Context) (time.Duration, int64, error) {
		return time.Millisecond, 2 << 20, nil // lag over the limit, for good
	})
	start := clk.now
	if err := th.pace(context.Background()); err != nil {
		t.Fatal(err)
	}
	// A shard that never calms down holds the copy at most MaxPause.
	if d := clk.now.Sub(start); d < time.Second || d > time.Second+200*time.Millisecond {
		t.Fatalf("a permanently lagging shard held the copy %s; want about MaxPause (1s)", d)
	}

	// A failed probe does not hold the copy.
	th2, _ := newTestThrottle(ThrottleOptions{}, func(context.Context) (time.Duration, int64, error) {
		return 0, 0, errors.New("down")
	})
	if err := th2.pace(context.Background()); err != nil || th2.throttled != 0 {
		t.Fatalf("a failed probe throttled %s (%v)", th2.throttled, err)
	}

	// A cancelled copy stops pacing.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	th3, _ := newTestThrottle(ThrottleOptions{}, func(context.Context) (time.Duration, int64, error) { return time.Second, 0, nil })
	th3.sleep = sleepCtx
	if err := th3.pace(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("pace on a cancelled context: %v", err)
	}
}
