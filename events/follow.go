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
	// (default 1000), and the events one read of the Backlog takes.
	ReadCount int
	// Backlog, if set, serves the events a stream no longer holds (a
	// cursor older than the stream, a watcher that fell behind its
	// trimming, a stream Redis lost) from Postgres, after which the watch
	// follows the stream again. Only events older than its retention then
	// end a watch (ErrCursorExpired). Without it they always do.
	Backlog Backlog
	// PartitionOf, if set, returns a user ID's partition: an entry of a
	// partition stream whose user belongs to another partition is dropped.
	PartitionOf func(userID string) int32
	// Dropped, if set, is called for each stream entry dropped because it
	// is not a well-formed event of its stream (Redis is written by
	// others too). Dropped entries are never delivered.
	Dropped func(stream int32, id string, err error)
}

// Backlog is the event log of record: the outbox rows Postgres retains.
type Backlog interface {
	// Events returns up to limit events of stream with ticks above after,
	// in tick order, and the stream's delivered tick. The events after
	// `after` are gone (older than the retention) when the first has a
	// tick above after+1, or when there is none and the delivered tick is
	// above after.
	Events(ctx context.Context, stream int32, after int64, limit int) ([]Event, int64, error)
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
// neither the streams nor the Backlog hold the events it must deliver next.
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

	cur, behind, err := f.start(ctx, keys, streams, sub.From)
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
	// ids are the XREAD positions: the last entry read per stream, which
	// is past the cursor when entries that are no events were dropped.
	ids := make([]string, len(streams))
	for i, p := range cur {
		ids[i] = entryID(p.Tick)
	}
	everyEvent := len(streams) <= PerEventCursorStreams
	// Config events come from the config stream only (entries of a
	// partition stream that claim to be config are dropped), and a user
	// filter does not apply to them.
	wanted := func(e *Event) bool { return e.Partition == ConfigStream || sub.Users == nil || sub.Users[e.UserID] }
	var lastSent time.Time
	// catchUp serves stream i from the Backlog up to where it ends.
	catchUp := func(i int) error {
		sent, err := f.catchUp(ctx, cur, i, readCount, wanted, everyEvent, emit)
		if sent {
			lastSent = time.Now()
		}
		ids[i], behind[i], anyFirst[i] = entryID(cur[i].Tick), false, false
		return err
	}
	// Streams the cursor is behind first, so a cursor older than the
	// retention ends the watch before anything is sent.
	for i := range behind {
		if behind[i] {
			if err := catchUp(i); err != nil {
				return err
			}
		}
	}
	// A first heartbeat at once gives the client a cursor to resume from
	// even if it disconnects before any event or the next heartbeat.
	if err := heartbeat(cur); err != nil {
		return err
	}
	lastSent = time.Now()
	c := f.Redis
	for {
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
			for _, en := range res[name] {
				e, err := f.decode(streams[i], en)
				if err != nil {
					f.drop(streams[i], en.ID, err)
					ids[i] = en.ID
					continue
				}
				if e.Tick <= cur[i].Tick && !anyFirst[i] {
					continue // delivered from the Backlog in this read
				}
				if e.Tick != cur[i].Tick+1 && !anyFirst[i] {
					if f.Backlog == nil {
						return fmt.Errorf("%w: stream %s went from tick %d to %d", ErrFellBehind, name, cur[i].Tick, e.Tick)
					}
					// Trimmed past this watcher, or lost by Redis: the
					// Backlog has what lies between.
					if held != nil { // it goes first, without a cursor
						if err := emit(held, nil); err != nil {
							return err
						}
						held = nil
					}
					if err := catchUp(i); err != nil {
						return err
					}
					if e.Tick <= cur[i].Tick {
						continue // the Backlog had it
					}
					if e.Tick != cur[i].Tick+1 {
						// Not in the event log either: no event of ours.
						f.drop(streams[i], en.ID, fmt.Errorf("tick %d is ahead of the event log (at %d)", e.Tick, cur[i].Tick))
						ids[i] = en.ID
						continue
					}
				}
				cur[i].Tick, ids[i], anyFirst[i] = e.Tick, en.ID, false
				if !wanted(&e) {
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

// catchUp emits stream cur[i]'s events from the Backlog, from its cursor
// to the end of the log, advancing the cursor. It reports whether it
// emitted anything. Without a cursor per event, each read's last event
// carries one.
func (f *Follower) catchUp(ctx context.Context, cur Cursor, i, limit int, wanted func(*Event) bool, everyEvent bool,
	emit func(*Event, Cursor) error) (bool, error) {
	stream := cur[i].Stream
	sent := false
	for {
		evs, delivered, err := f.Backlog.Events(ctx, stream, cur[i].Tick, limit)
		if err != nil {
			return sent, fmt.Errorf("read the event log of stream %d: %w", stream, err)
		}
		switch {
		case len(evs) == 0 && delivered > cur[i].Tick,
			len(evs) > 0 && evs[0].Tick != cur[i].Tick+1:
			return sent, fmt.Errorf("%w: stream %d's events after tick %d are gone from the stream and the event log", ErrCursorExpired, stream, cur[i].Tick)
		}
		var last *Event
		for j := range evs {
			e := &evs[j]
			cur[i].Tick = e.Tick
			if !wanted(e) {
				continue
			}
			if everyEvent {
				if err := emit(e, cur); err != nil {
					return sent, err
				}
				sent = true
				continue
			}
			if last != nil {
				if err := emit(last, nil); err != nil {
					return sent, err
				}
			}
			last = e
		}
		if last != nil {
			if err := emit(last, cur); err != nil {
				return sent, err
			}
			sent = true
		}
		if len(evs) < limit {
			return sent, nil
		}
	}
}

// decode turns a stream entry into the event it holds, if it is a
// well-formed event of that stream.
func (f *Follower) decode(stream int32, en rueidis.XRangeEntry) (Event, error) {
	e, err := decodeEntry(stream, en.ID, en.FieldValues)
	if err != nil {
		return Event{}, err
	}
	if err := checkEvent(&e, en.FieldValues, f.PartitionOf); err != nil {
		return Event{}, err
	}
	return e, nil
}

func (f *Follower) drop(stream int32, id string, err error) {
	if f.Dropped != nil {
		f.Dropped(stream, id, err)
	}
}

// start resolves the starting cursor: a stream the given cursor covers
// starts there; any other starts at the stream's last entry. It reports
// the streams that no longer hold the events right after the cursor
// (their first entry is past it, or they are empty): with a Backlog those
// are served from it first, without one the watch ends.
func (f *Follower) start(ctx context.Context, keys Keys, streams []int32, from Cursor) (Cursor, []bool, error) {
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
	behind := make([]bool, len(streams))
	for i, res := range c.DoMulti(ctx, cmds...) {
		entries, err := res.AsXRange()
		if err != nil {
			return nil, nil, fmt.Errorf("read stream %s: %w", keys.Stream(streams[i]), err)
		}
		var edge int64 // the first (cursor given) or last (from now) tick, 0 if empty
		if len(entries) > 0 {
			// Not an event ID (dropped when read): treat it as no edge.
			edge, _ = parseEntryID(entries[0].ID)
		}
		tick, ok := from.Tick(streams[i])
		switch {
		case !ok:
			tick = edge
		case edge == 0 && tick > 0, edge > tick+1:
			if f.Backlog == nil {
				return nil, nil, fmt.Errorf("%w: stream %s starts at tick %d, the cursor is at %d", ErrCursorExpired, keys.Stream(streams[i]), edge, tick)
			}
			behind[i] = true
		}
		cur[i] = Position{Stream: streams[i], Tick: tick}
	}
	return cur, behind, nil
}
