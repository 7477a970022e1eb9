// Package events publishes the transactional outbox of every shard (and the
// catalog's config outbox) to Redis Streams, and lets readers follow those
// streams from a cursor.
//
// # Order
//
// Every outbox row carries a tick from a per-partition clock row (a single
// one for config) that its writer locks from the insert until it commits
// (migration 00002). Within a partition, ticks are therefore handed out in
// commit order, and the committed ones have no gaps: a rolled-back tick is
// handed out again. A snapshot that sees tick n+1 sees tick n too (n
// committed before n+1 was handed out), so the relay publishes each
// partition's rows in tick order with one plain query and never skips a
// transaction that committed late. Ordering by xid would not do: a
// transaction gets its xid at its first write and may then wait for a row
// lock, so a later-committed write of the same key can carry the lower xid.
//
// # Streams
//
// One stream per partition, `<prefix>events:p:<partition>`, and one for
// config, `<prefix>events:config`. An event's entry ID is `<tick>-0`, so a
// stream is in tick order and Redis itself refuses a second copy of an entry
// (XADD with an ID at or below the stream's last): a relay that crashed
// after XADD and before deleting its outbox rows, or two relays briefly
// overlapping, publish nothing twice. A refused entry is checked to hold the
// same event_id, or to be trimmed; else the partition's clock went
// backwards and the relay quarantines that partition, keeping its events in
// the outbox while the others flow. Each stream's share of a batch is added
// by one script that stops at the first failure or clash, so a stream is
// always a gap-free run of ticks. Consumers still
// deduplicate by event_id: a watch resumed from an older cursor sees events
// again.
package events

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Event is one committed change.
type Event struct {
	ID          string // event_id, a UUID: the deduplication key
	Partition   int32  // ConfigStream for config events
	Tick        int64  // position in its stream
	UserID      string // empty for config
	Entity      string // user, session, item or config
	Key         string // user ID; token hash (hex); collection/key; namespace/key
	Op          string // upsert or delete
	Version     int64
	Payload     []byte // JSON; nil when absent or over the relay's cap
	Omitted     bool   // a payload existed but was over the cap
	CommittedAt time.Time
}

// Entity and op names, as stored in the outbox.
const (
	EntityUser    = "user"
	EntitySession = "session"
	EntityItem    = "item"
	EntityConfig  = "config"
	OpUpsert      = "upsert"
	OpDelete      = "delete"
)

// ConfigKey splits a config event's key into namespace and key.
func (e *Event) ConfigKey() (namespace, key string) {
	namespace, key, _ = strings.Cut(e.Key, "/")
	return namespace, key
}

// Keys names the Redis keys of the streams under a prefix.
type Keys struct{ Prefix string }

// Stream returns the key of a partition's stream, or of the config stream
// for ConfigStream.
func (k Keys) Stream(stream int32) string {
	if stream == ConfigStream {
		return k.Prefix + "events:config"
	}
	return k.Prefix + "events:p:" + strconv.FormatInt(int64(stream), 10)
}

// DefaultPrefix prefixes every Redis key unless options say otherwise.
const DefaultPrefix = "shardgate:"

// Stream entry fields.
const (
	fieldID          = "event_id"
	fieldUser        = "user_id"
	fieldPartition   = "partition"
	fieldEntity      = "entity"
	fieldKey         = "key"
	fieldOp          = "op"
	fieldVersion     = "version"
	fieldCommittedAt = "committed_at"
	fieldPayload     = "payload"
	fieldOmitted     = "payload_omitted"
)

func entryID(tick int64) string { return strconv.FormatInt(tick, 10) + "-0" }

// parseEntryID returns the tick of an entry ID `<tick>-0`.
func parseEntryID(id string) (int64, error) {
	ms, seq, ok := strings.Cut(id, "-")
	if !ok || seq != "0" {
		return 0, fmt.Errorf("stream entry ID %q is not <tick>-0", id)
	}
	t, err := strconv.ParseInt(ms, 10, 64)
	if err != nil || t <= 0 {
		return 0, fmt.Errorf("stream entry ID %q is not <tick>-0", id)
	}
	return t, nil
}

// fields lists the entry's field-value pairs.
func (e *Event) fields() []string {
	f := []string{
		fieldID, e.ID,
		fieldUser, e.UserID,
		fieldPartition, strconv.FormatInt(int64(e.Partition), 10),
		fieldEntity, e.Entity,
		fieldKey, e.Key,
		fieldOp, e.Op,
		fieldVersion, strconv.FormatInt(e.Version, 10),
		fieldCommittedAt, e.CommittedAt.UTC().Format(time.RFC3339Nano),
	}
	if e.Payload != nil {
		f = append(f, fieldPayload, string(e.Payload))
	}
	if e.Omitted {
		f = append(f, fieldOmitted, "1")
	}
	return f
}

// decodeEntry turns a stream entry back into an Event.
func decodeEntry(stream int32, id string, fv map[string]string) (Event, error) {
	tick, err := parseEntryID(id)
	if err != nil {
		return Event{}, err
	}
	e := Event{
		ID: fv[fieldID], Partition: stream, Tick: tick, UserID: fv[fieldUser],
		Entity: fv[fieldEntity], Key: fv[fieldKey], Op: fv[fieldOp], Omitted: fv[fieldOmitted] == "1",
	}
	if p, ok := fv[fieldPayload]; ok {
		e.Payload = []byte(p)
	}
	if e.Version, err = strconv.ParseInt(fv[fieldVersion], 10, 64); err != nil {
		return Event{}, fmt.Errorf("stream entry %s: bad version", id)
	}
	if e.CommittedAt, err = time.Parse(time.RFC3339Nano, fv[fieldCommittedAt]); err != nil {
		return Event{}, fmt.Errorf("stream entry %s: bad committed_at", id)
	}
	return e, nil
}

// checkEvent tells whether a decoded stream entry is a well-formed event of
// its stream, as a relay writes them: the stream's own partition, an
// entity that belongs in it (config in the config stream only), a key
// that fits the entity, a user of that partition (when partitionOf is
// given), and a payload that is JSON. Anyone who can write to Redis can
// add entries, so a watcher checks before it delivers.
func checkEvent(e *Event, fv map[string]string, partitionOf func(string) int32) error {
	bad := func(what string) error { return fmt.Errorf("stream entry %d-0: %s", e.Tick, what) }
	if fv[fieldPartition] != strconv.FormatInt(int64(e.Partition), 10) {
		return bad("partition field " + strconv.Quote(fv[fieldPartition]) + " is not the stream's")
	}
	if !isUUID(e.ID) {
		return bad("event_id is not a UUID")
	}
	if e.Op != OpUpsert && e.Op != OpDelete {
		return bad("unknown op")
	}
	if e.Version <= 0 {
		return bad("version is not positive")
	}
	if e.Payload != nil && (e.Omitted || !json.Valid(e.Payload)) {
		return bad("payload is not JSON")
	}
	if e.Partition == ConfigStream {
		ns, key, ok := strings.Cut(e.Key, "/")
		switch {
		case e.Entity != EntityConfig:
			return bad("entity " + strconv.Quote(e.Entity) + " in the config stream")
		case e.UserID != "":
			return bad("a config event with a user")
		case !ok || ns == "" || key == "":
			return bad("config key is not namespace/key")
		}
		return nil
	}
	if e.UserID == "" || len(e.UserID) > 128 {
		return bad("no valid user_id")
	}
	if partitionOf != nil && partitionOf(e.UserID) != e.Partition {
		return bad("user_id belongs to another partition")
	}
	switch e.Entity {
	case EntityUser:
		if e.Key != e.UserID {
			return bad("a user event's key is not its user")
		}
	case EntitySession:
		if len(e.Key) != 64 || strings.Trim(e.Key, "0123456789abcdef") != "" {
			return bad("a session event's key is not a token hash")
		}
		if e.Payload != nil {
			return bad("a session event with a payload")
		}
	case EntityItem:
		if c, k, ok := strings.Cut(e.Key, "/"); !ok || c == "" || k == "" {
			return bad("an item event's key is not collection/key")
		}
	default:
		return bad("entity " + strconv.Quote(e.Entity) + " in a partition stream")
	}
	return nil
}

// isUUID tells whether s is a UUID in its canonical text form (as
// Postgres prints one: lower-case hex).
func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
				return false
			}
		}
	}
	return true
}
