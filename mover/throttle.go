package mover

import (
	"context"
	"time"
)

// ThrottleOptions say when a copy slows down. The zero value of a field
// means its default.
type ThrottleOptions struct {
	// Latency is the round trip of a trivial query on the source or the
	// target above which the copy pauses (default 50ms): the shard is busy
	// serving, and the copy should not make it busier.
	Latency time.Duration
	// LagBytes is the replication lag of a move's slot above which the copy
	// pauses (default 256 MiB): the target's apply falls behind.
	LagBytes int64
	// Every is how often the probes run (default 250ms); in between the
	// copy runs at full speed.
	Every time.Duration
	// Pause is how long the copy sleeps when a probe is over its limit
	// before probing again (default 200ms).
	Pause time.Duration
	// MaxPause bounds one throttled wait (default 30s): a copy that a
	// permanently busy shard would hold forever goes on, slowly.
	MaxPause time.Duration
}

func (o ThrottleOptions) withDefaults() ThrottleOptions {
	if o.Latency <= 0 {
		o.Latency = 50 * time.Millisecond
	}
	if o.LagBytes <= 0 {
		o.LagBytes = 256 << 20
	}
	if o.Every <= 0 {
		o.Every = 250 * time.Millisecond
	}
	if o.Pause <= 0 {
		o.Pause = 200 * time.Millisecond
	}
	if o.MaxPause <= 0 {
		o.MaxPause = 30 * time.Second
	}
	return o
}

// probe measures what a throttle watches: the worse latency of the two
// shards and the lag of the slots on them.
type probe func(ctx context.Context) (latency time.Duration, lagBytes int64, err error)

// throttle paces a copy: called often, it probes at most every Every and
// sleeps while a probe is over its limits.
type throttle struct {
	opts      ThrottleOptions
	probe     probe
	last      time.Time
	throttled time.Duration // total time spent waiting
	now       func() time.Time
	sleep     func(context.Context, time.Duration) error
}

func newThrottle(opts ThrottleOptions, p probe) *throttle {
	return &throttle{opts: opts.withDefaults(), probe: p, now: time.Now, sleep: sleepCtx}
}

// pace returns at once unless a probe is due and finds a shard over its
// limit; then it sleeps, probing again, until both are under or MaxPause
// has passed. A failed probe does not hold the copy: the copy itself will
// meet the failure.
func (t *throttle) pace(ctx context.Context) error {
	if t.now().Sub(t.last) < t.opts.Every {
		return nil
	}
	start := t.now()
	for {
		lat, lag, err := t.probe(ctx)
		t.last = t.now()
		if err != nil || (lat <= t.opts.Latency && lag <= t.opts.LagBytes) || t.now().Sub(start) >= t.opts.MaxPause {
			return ctx.Err()
		}
		if err := t.sleep(ctx, t.opts.Pause); err != nil {
			return err
		}
		t.throttled += t.opts.Pause
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
