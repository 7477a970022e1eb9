package events

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/redis/rueidis"
)

// ErrCursorExpired means the events right after a cursor are no longer in
// their stream (trimmed by retention, or Redis lost them): the reader must
// resync from the source of truth and follow from now.
var ErrCursorExpired = errors.New("the cursor is older than the stream retention")

// ErrFellBehind means a reader was so slow that the stream was trimmed past
// its position while it read.
var ErrFellBehind = errors.New("the watcher fell behind the stream retention")

// Follower reads the streams for watchers, each at its own pace: a watcher
// is one blocking XREAD loop of its own, so a slow one never holds up
// another, and its memory is bounded by one read.
type Follower struct {
	Redis  rueidis.Client
	Prefix string // default DefaultPrefix
	// Heartbeat is how long a watch may send nothing before it sends a
	// heartbeat (default 5s).
	Heartbeat time.Duration
	// ReadCount bounds the entries one read takes, across all streams
	// (default 1000).
	ReadCount int
}

// Subscription says what to follow.
type Subscription struct {
	Partitions []int32         // partition streams to read
	Config     bool            // the config stream too
	Users      map[string]bool // if non-nil, only these users' events
	From       Cursor          // streams it covers resume after it; others start from now
}

// PerEventCursorStreams is the most streams a watch may follow and still
// get a cursor with every event. A cursor holds a position per stream, so
// on a watch of every partition it runs to some 22 KB and 25 µs to encode:
// too much to repeat on every event of a busy watch. A wider watch gets its
// cursor with the last event of each read from Redis only.
const PerEventCursorStreams = 64

// Follow reads until ctx ends or emit/heartbeat fails, calling emit for
// each event (with the cursor just after it, or nil: see
// PerEventCursorStreams) and heartbeat with the current cursor whenever
// Heartbeat passes without an emit. Events of one stream come
// in tick order. It returns ErrCursorExpired or ErrFellBehind (wrapped) when
// the streams no longer hold the events it must deliver next.
func (f *Follower) Follow(ctx context.Context, sub Subscription, emit func(*Event, Cursor) error, heartbeat func(Cursor) error) error {
	prefix := f.Prefix
	if prefix == "" {
		prefix = DefaultPrefix
	}
	keys := Keys{prefix}
	hb := f.Heartbeat
	if hb <= 0 {
		hb = 5 * time.Second
	}
	var streams []int32
	if sub.Config {
		streams = append(streams, ConfigStream)
	}
	streams = append(streams, sub.Partitions...)
	slices.Sort(streams)
	streams = slices.Compact(streams)
	if len(streams) == 0 {
		return errors.New("follow: nothing to follow")
	}
	readCount := f.ReadCount
	if readCount <= 0 {
		readCount = 1000
	}
	perStream := int64(max(1, readCount/len(streams)))

	cur, err := f.start(ctx, keys, streams, sub.From)
	if err != nil {
		return err
	}
	// A stream followed from now that was empty (or missing) then may start
	// at any tick: nothing before it was asked for.
	anyFirst := make([]bool, len(streams))
	for i, p := range cur {
		_, given := sub.From.Tick(p.Stream)
		anyFirst[i] = !given && p.Tick == 0
	}
	names := make([]string, len(streams))
	for i, s := range streams {
		names[i] = keys.Stream(s)
	}
	ids := make([]string, len(streams))
	everyEvent := len(streams) <= PerEventCursorStreams
	// A first heartbeat at once gives the client a cursor to resume from
	// even if it disconnects before any event or the next heartbeat.
	if err := heartbeat(cur); err != nil {
		return err
	}
	lastSent := time.Now()
	c := f.Redis
	for {
		for i, p := range cur {
			ids[i] = fmt.Sprintf("%d-0", p.Tick)
		}
		wait := max(time.Millisecond, hb-time.Since(lastSent))
		res, err := c.Do(ctx, c.B().Xread().Count(perStream).Block(wait.Milliseconds()).Streams().Key(names...).Id(ids...).Build()).AsXRead()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil && !rueidis.IsRedisNil(err) {
			return fmt.Errorf("read streams: %w", err)
		}
		// Streams in cursor order, so a batch is emitted the same way each time.
		// Without a cursor per event, each event waits for the next one, so
		// the read's last goes out with the cursor after the whole read.
		var held *Event
		for i, name := range names {
			entries := res[name]
			for j, en := range entries {
				e, err := decodeEntry(streams[i], en.ID, en.FieldValues)
				if err != nil {
					return err
				}
				if j == 0 && e.Tick != cur[i].Tick+1 && !anyFirst[i] {
					return fmt.Errorf("%w: stream %s went from tick %d to %d", ErrFellBehind, name, cur[i].Tick, e.Tick)
				}
				cur[i].Tick, anyFirst[i] = e.Tick, false
				if e.Entity != EntityConfig && sub.Users != nil && !sub.Users[e.UserID] {
					continue
				}
				if everyEvent {
					if err := emit(&e, cur); err != nil {
						return err
					}
					lastSent = time.Now()
					continue
				}
				if held != nil {
					if err := emit(held, nil); err != nil {
						return err
					}
				}
				held = &e
			}
		}
		if held != nil {
			if err := emit(held, cur); err != nil {
				return err
			}
			lastSent = time.Now()
		}
		if time.Since(lastSent) >= hb {
			if err := heartbeat(cur); err != nil {
				return err
			}
			lastSent = time.Now()
		}
	}
}

// start resolves the starting cursor: a stream the given cursor covers
// starts there, if its next event is still in the stream; any other starts
// at the stream's last entry.
func (f *Follower) start(ctx context.Context, keys Keys, streams []int32, from Cursor) (Cursor, error) {
	c := f.Redis
	cmds := make(rueidis.Commands, len(streams))
	for i, s := range streams {
		if _, ok := from.Tick(s); ok {
			cmds[i] = c.B().Xrange().Key(keys.Stream(s)).Start("-").End("+").Count(1).Build()
		} else {
			cmds[i] = c.B().Xrevrange().Key(keys.Stream(s)).End("+").Start("-").Count(1).Build()
		}
	}
	cur := make(Cursor, len(streams))
	for i, res := range c.DoMulti(ctx, cmds...) {
		entries, err := res.AsXRange()
		if err != nil {
			return nil, fmt.Errorf("read stream %s: %w", keys.Stream(streams[i]), err)
		}
		var edge int64 // the first (cursor given) or last (from now) tick, 0 if empty
		if len(entries) > 0 {
			if edge, err = parseEntryID(entries[0].ID); err != nil {
				return nil, err
			}
		}
		tick, ok := from.Tick(streams[i])
		switch {
		case !ok:
			tick = edge
		case edge == 0 && tick > 0, edge > tick+1:
			return nil, fmt.Errorf("%w: stream %s starts at tick %d, the cursor is at %d", ErrCursorExpired, keys.Stream(streams[i]), edge, tick)
		}
		cur[i] = Position{Stream: streams[i], Tick: tick}
	}
	return cur, nil
}
